"""Cross-entropy, once: the token-level negative log-likelihood every task, evaluation, benchmark and test uses,
at once or with the head run chunk by chunk (never a whole (B, K, V) logits tensor, also in the backward pass).

Imports jax only. All arithmetic in float32 whatever the logits' dtype.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def token_nll(logits_bkv: jax.Array, targets_bk: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per position: (B, K, V) logits, (B, K) int targets -> (B, K) float32.
    Works for any leading shape ((B, V) logits with (B,) targets for sequence classification)."""
    logits = logits_bkv.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets_bk[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def weighted_nll(logits_bkv: jax.Array, targets_bk: jax.Array, weights_bk: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """(sum of weight * nll, sum of weights): the token-weighted loss's numerator and denominator."""
    w = weights_bk.astype(jnp.float32)
    return jnp.sum(token_nll(logits_bkv, targets_bk) * w), jnp.sum(w)


def chunked_row_nll(hidden_bkd: jax.Array, head: Callable[[jax.Array], jax.Array], targets_bk: jax.Array,
                    weights_bk: jax.Array, chunk: int) -> jax.Array:
    """Per-row sum of weight * nll (B,), running head(h (B, C, D)) -> (B, C, V) logits `chunk` positions at a
    time under jax.checkpoint: at most (B, chunk, V) logits exist at once, forward or backward."""
    b, k, _ = hidden_bkd.shape
    chunk = max(1, min(chunk, k))
    pad = -k % chunk
    weights = weights_bk.astype(jnp.float32)
    if pad:  # padded positions weigh 0
        hidden_bkd = jnp.pad(hidden_bkd, ((0, 0), (0, pad), (0, 0)))
        targets_bk, weights = jnp.pad(targets_bk, ((0, 0), (0, pad))), jnp.pad(weights, ((0, 0), (0, pad)))
    n = (k + pad) // chunk

    def split(x):  # (B, n * C, ...) -> (n, B, C, ...)
        return jnp.swapaxes(x.reshape((b, n, chunk) + x.shape[2:]), 0, 1)

    @jax.checkpoint
    def one(h_bcd, t_bc, w_bc):
        return jnp.sum(token_nll(head(h_bcd), t_bc) * w_bc, axis=1)

    def body(total_b, xs):
        return total_b + one(*xs), None

    total_b, _ = jax.lax.scan(body, jnp.zeros((b,), jnp.float32), (split(hidden_bkd), split(targets_bk),
                                                                   split(weights)))
    return total_b
