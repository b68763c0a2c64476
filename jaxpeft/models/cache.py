"""`KVCache`: the explicit, donatable key/value cache pytree for decoder backbones (imports jax/flax only)."""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, stacked on the layer axis.

    k, v: (L, B, S, H_kv, d_h) in the compute dtype; S = max_len slots.
    key_valid: (B, S) bool, slots holding real (non-pad) tokens.
    index: () int32, the next slot to write (same for every row: prompts are left-padded).
    next_pos: (B,) int32, the RoPE / learned position of each row's next token.
    """

    k: jax.Array
    v: jax.Array
    key_valid: jax.Array
    index: jax.Array
    next_pos: jax.Array

    @classmethod
    def init(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32) -> KVCache:
        """An empty cache of `max_len` slots."""
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   key_valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32),
                   next_pos=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def step_inputs(cache: KVCache | None, mask_bt: jax.Array, positions_bt: jax.Array | None):
    """Slots, key validity and positions for T new tokens.

    Returns (q_slots_t (T,), key_valid_bs (B, S), positions_bt (B, T), new cache fields or None).
    Without a cache S = T and slots start at 0. Default positions count only non-pad tokens
    (cumsum of the mask), so left padding does not shift RoPE or learned positions.
    """
    t = mask_bt.shape[1]
    mask_bt = mask_bt.astype(bool)
    counts_bt = jnp.cumsum(mask_bt.astype(jnp.int32), axis=1)
    if cache is None:
        if positions_bt is None:
            positions_bt = jnp.maximum(counts_bt - 1, 0)
        return jnp.arange(t), mask_bt, positions_bt, None
    if positions_bt is None:
        positions_bt = jnp.maximum(cache.next_pos[:, None] + counts_bt - 1, 0)
    key_valid = jax.lax.dynamic_update_slice(cache.key_valid, mask_bt, (0, cache.index))
    q_slots = cache.index + jnp.arange(t)
    fields = dict(key_valid=key_valid, index=cache.index + t, next_pos=cache.next_pos + counts_bt[:, -1])
    return q_slots, key_valid, positions_bt, fields


def write_kv(k_cache: jax.Array, v_cache: jax.Array, k_bthd: jax.Array, v_bthd: jax.Array, index: jax.Array):
    """Write T new keys/values of one layer at slot `index`; returns the full (B, S, H_kv, d_h) pair."""
    k_all = jax.lax.dynamic_update_slice(k_cache, k_bthd.astype(k_cache.dtype), (0, index, 0, 0))
    v_all = jax.lax.dynamic_update_slice(v_cache, v_bthd.astype(v_cache.dtype), (0, index, 0, 0))
    return k_all, v_all
