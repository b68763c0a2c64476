"""Attention pieces shared by all backbones: explicit masks, RoPE, the prefix extension point, the core op.

Imports jax/flax only. Masks are built explicitly from slot indices (never `is_causal`, which aligns the
causal mask top-left when there are fewer queries than keys: wrong for prefixes and KV-cache decoding).
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


class Prefix(NamedTuple):
    """Extra key/value entries placed before a layer's own keys.

    k_blhd, v_blhd: (B, l, H_kv, d_h) prefix keys and values (no RoPE applied to them).
    mask_bl: (B, l) bool, which prefix entries every query may see.
    """

    k_blhd: jax.Array
    v_blhd: jax.Array
    mask_bl: jax.Array


class PrefixHook(nn.Module):
    """Extension point: per-layer extra key/value entries that may depend on the layer's input.

    Returns None (no prefix). Prefix tuning, P-tuning v2 and APT intercept this module's `__call__`
    and return a `Prefix`, creating their parameters in their own variable collection.
    """

    num_kv_heads: int
    head_dim: int

    @nn.compact
    def __call__(self, x_btd: jax.Array, mask_bt: jax.Array, pool_mask_bt: jax.Array) -> Prefix | None:
        """x_btd: (B, T, D) the tensor the attention block receives (the normed layer input in pre-norm
        decoders and GPT-2, the raw layer input in post-norm BERT/RoBERTa); mask_bt: (B, T) bool, the non-pad
        tokens; pool_mask_bt: (B, T) bool, the tokens a prefix may condition on (decoders: prompt AND non-pad,
        so a gate never reads later tokens; encoders: all non-pad tokens)."""
        del x_btd, mask_bt, pool_mask_bt
        return None


def attention_mask(q_slots_t: jax.Array, key_valid_bs: jax.Array, *, causal: bool,
                   window: int | None = None) -> jax.Array:
    """(B, 1, T, S) bool mask: key slot s visible to the query at slot q_slots_t[t].

    key_valid_bs: (B, S) bool, keys that hold real tokens. causal: s <= q. window (HF `sliding_window` W):
    additionally q - s < W.
    """
    s_idx = jnp.arange(key_valid_bs.shape[1])
    mask = key_valid_bs[:, None, None, :]
    if causal:
        mask = mask & (s_idx[None, :] <= q_slots_t[:, None])[None, None]
    if window is not None:
        mask = mask & ((q_slots_t[:, None] - s_idx[None, :]) < window)[None, None]
    return mask


def rope_tables(positions_bt: jax.Array, head_dim: int, theta: float, scaling: float = 1.0):
    """(cos, sin), each (B, T, head_dim) float32, HF half-split convention; `scaling` = linear factor."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)) / scaling
    freqs = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # (B, T, d_h/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_bthd: jax.Array, cos_btd: jax.Array, sin_btd: jax.Array) -> jax.Array:
    """Rotate (B, T, H, d_h) by the tables (HF `rotate_half`), in float32, cast back."""
    x = x_bthd.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_btd[:, :, None, :] + rotated * sin_btd[:, :, None, :]
    return out.astype(x_bthd.dtype)


def attach_prefix(call_hook, k_bshd: jax.Array, v_bshd: jax.Array, mask_b1ts: jax.Array,
                  prefix_state: tuple[str, jax.Array] | None = None, *, sliding: jax.Array | None = None,
                  window: int | None = None, token_index_bt: jax.Array | None = None):
    """Run a layer's prefix hook and put its entries where attention reads them.

    call_hook() -> Prefix | None. Returns (k, v, mask, prefix_valid_bp or None).
    - No cache (prefix_state None): prefix keys/values are concatenated before the layer's own, and every
      query sees the valid entries.
    - KV cache with P reserved prefix slots (prefix_state = ('pending', (B, P)) at prefill, ('ready', (B, P))
      at decode): at prefill the hook runs once and its entries are written into slots [0, l) of the cache
      (the k/v given here are the whole cache arrays); at decode the hook is not called and the slots are
      read from the cache. The (B, P) validity of this layer's slots masks them in both cases.
    - Sliding-window layers (`sliding` true, window W; token_index_bt (B, T) = each token's index among its row's
      real tokens): entry j of an l-entry prefix sits just before the first real token, so the token with index r
      sees it while l + r - j < W, as Hugging Face's cache does on unpadded rows. Pads do not count (Hugging Face
      counts left pads as slots), so a row's result does not depend on the batch's padding.
    """
    if prefix_state is None:
        prefix = call_hook()
        if prefix is None:
            return k_bshd, v_bshd, mask_b1ts, None
        b, _, t, _ = mask_b1ts.shape
        n = prefix.mask_bl.shape[1]
        pmask = jnp.broadcast_to(prefix.mask_bl.astype(bool)[:, None, None, :], (b, 1, t, n))
        pmask = pmask & _prefix_window(n, sliding, window, token_index_bt)
        return (jnp.concatenate([prefix.k_blhd.astype(k_bshd.dtype), k_bshd], axis=1),
                jnp.concatenate([prefix.v_blhd.astype(v_bshd.dtype), v_bshd], axis=1),
                jnp.concatenate([pmask, mask_b1ts], axis=-1), None)
    phase, valid_bp = prefix_state
    slots = valid_bp.shape[1]
    if phase == "pending":
        prefix = call_hook()
        if prefix is None:
            valid_bp = jnp.zeros_like(valid_bp)
        else:
            n = prefix.mask_bl.shape[1]
            if n > slots:
                raise ValueError(f"the prefix has {n} entries but the KV cache reserves {slots} prefix slots: "
                                 "create the cache with AdaptedModel.init_cache")
            k_bshd = jax.lax.dynamic_update_slice(k_bshd, prefix.k_blhd.astype(k_bshd.dtype), (0, 0, 0, 0))
            v_bshd = jax.lax.dynamic_update_slice(v_bshd, prefix.v_blhd.astype(v_bshd.dtype), (0, 0, 0, 0))
            valid_bp = jnp.pad(prefix.mask_bl.astype(bool), ((0, 0), (0, slots - n)))
    b, _, t, _ = mask_b1ts.shape
    pmask = jnp.broadcast_to(valid_bp[:, None, None, :] & _prefix_window(slots, sliding, window, token_index_bt),
                             (b, 1, t, slots))
    return k_bshd, v_bshd, jnp.concatenate([pmask, mask_b1ts[..., slots:]], axis=-1), valid_bp


def _prefix_window(n: int, sliding: jax.Array | None, window: int | None, token_index_bt: jax.Array | None):
    """(B, 1, T, n) bool (or True): which of n prefix entries a sliding layer's window still covers."""
    if window is None or sliding is None or token_index_bt is None:
        return jnp.asarray(True)
    near = (n + token_index_bt[:, :, None] - jnp.arange(n)[None, None, :]) < window  # (B, T, n)
    return jnp.where(sliding, near, True)[:, None]


def no_prefix_in_cache(prefix: Prefix | None) -> None:
    """Raise when a hook returned entries for a cache that reserves no prefix slots."""
    if prefix is not None:
        raise ValueError("a prefix adapter is active but the KV cache reserves no prefix slots: create the cache "
                         "with AdaptedModel.init_cache (or KVCache.init(..., prefix_slots=l))")


def attend(q_bthd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array, mask_b1ts: jax.Array, scale: float, *,
           dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Scaled dot-product attention with GQA; (B, T, H, d_h) x (B, S, H_kv, d_h) -> (B, T, H, d_h).

    Uses `jax.nn.dot_product_attention` unless attention dropout is active; then a grouped einsum (K/V are not
    repeated per query head). Fully masked query rows (left padding) give finite garbage; callers ignore those
    positions.
    """
    if dropout_rate == 0.0 or dropout_rng is None:
        return jax.nn.dot_product_attention(q_bthd, k_bshd, v_bshd, mask=mask_b1ts, scale=scale)
    b, t, h, d = q_bthd.shape
    hkv = k_bshd.shape[2]
    g = h // hkv  # query heads per K/V head: grouped, K and V are never repeated (head h reads K/V head h // g)
    q_btkgd = q_bthd.reshape(b, t, hkv, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k_bshd).astype(jnp.float32) * scale
    logits = jnp.where(mask_b1ts[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    # the mask is drawn in the (B, H, T, S) layout of the heads, so the realisation does not depend on grouping
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, (b, h, t, probs.shape[-1]))
    keep = keep.reshape(probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0).astype(v_bshd.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v_bshd).reshape(b, t, h, d)
