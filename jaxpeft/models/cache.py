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
    prefix_valid: (L, B, P) bool or None: which of the P reserved prefix slots (slots [0, P)) hold a prefix
        entry in each layer. Prefix methods write their entries there once, at prefill; decode steps read them
        like any cached key (they are never concatenated again).
    prefix_ready: static; False until the prefill has written the prefix slots.
    """

    k: jax.Array
    v: jax.Array
    key_valid: jax.Array
    index: jax.Array
    next_pos: jax.Array
    prefix_valid: jax.Array | None = None
    prefix_ready: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def init(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32, *, prefix_slots: int = 0, position_offset_b: jax.Array | None = None) -> KVCache:
        """An empty cache of `prefix_slots + max_len` slots.

        prefix_slots: P slots reserved before the tokens for prefix entries (writing starts at slot P).
        position_offset_b: (B,) int, the position of each row's first token (prefix tuning with
        position_offset l starts the real tokens at l, as Hugging Face does with past_key_values).
        """
        slots = prefix_slots + max_len
        shape = (num_layers, batch, slots, num_kv_heads, head_dim)
        next_pos = (jnp.zeros((batch,), jnp.int32) if position_offset_b is None
                    else jnp.asarray(position_offset_b, jnp.int32).reshape(batch))
        # prefix slots are 'valid' keys for the shared masks; each layer's prefix_valid decides per layer
        key_valid = jnp.zeros((batch, slots), bool).at[:, :prefix_slots].set(True)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), key_valid=key_valid,
                   index=jnp.asarray(prefix_slots, jnp.int32), next_pos=next_pos,
                   prefix_valid=jnp.zeros((num_layers, batch, prefix_slots), bool) if prefix_slots else None)

    @property
    def max_len(self) -> int:
        """S: the slots per row, reserved prefix slots included (k.shape[2])."""
        return self.k.shape[2]

    @property
    def prefix_slots(self) -> int:
        """P: the slots reserved for prefix entries (0 without prefix_valid)."""
        return 0 if self.prefix_valid is None else self.prefix_valid.shape[2]

    def layer_inputs(self) -> dict[str, jax.Array]:
        """Per-layer scan inputs: the layer's k/v and, with reserved slots, its prefix validity (keyed by phase)."""
        xs = {"kv": (self.k, self.v)}
        if self.prefix_valid is not None:
            xs["prefix_ready" if self.prefix_ready else "prefix_pending"] = self.prefix_valid
        return xs

    def updated(self, ys: dict[str, jax.Array], fields: dict[str, jax.Array]) -> KVCache:
        """The cache after one forward: the layers' new k/v (and prefix validity) plus `step_inputs`' fields."""
        extra = {}
        if self.prefix_valid is not None:
            extra = dict(prefix_valid=ys["prefix_valid"], prefix_ready=True)
        return self.replace(k=ys["kv"][0], v=ys["kv"][1], **fields, **extra)


def layer_prefix_state(layer_xs: dict[str, jax.Array]) -> tuple[str, jax.Array] | None:
    """('pending' | 'ready', (B, P) validity) for `attach_prefix`, from one layer's scan inputs."""
    for phase in ("pending", "ready"):
        if f"prefix_{phase}" in layer_xs:
            return phase, layer_xs[f"prefix_{phase}"]
    return None


def step_inputs(cache: KVCache | None, mask_bt: jax.Array, positions_bt: jax.Array | None,
                position_offset_b: jax.Array | None = None):
    """Slots, key validity and positions for T new tokens.

    Returns (q_slots_t (T,), key_valid_bs (B, S), positions_bt (B, T), new cache fields or None).
    Without a cache S = T and slots start at 0. Default positions count only non-pad tokens
    (cumsum of the mask), so left padding does not shift RoPE or learned positions; position_offset_b (B,)
    shifts them without a cache (with a cache the offset lives in `cache.next_pos`).
    """
    t = mask_bt.shape[1]
    mask_bt = mask_bt.astype(bool)
    counts_bt = jnp.cumsum(mask_bt.astype(jnp.int32), axis=1)
    if cache is None:
        if positions_bt is None:
            positions_bt = jnp.maximum(counts_bt - 1, 0)
            if position_offset_b is not None:
                positions_bt = positions_bt + jnp.asarray(position_offset_b, positions_bt.dtype)[:, None]
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
