"""Pooling used by classification heads (imports jax only)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def last_token_pool(h_btd: jax.Array, mask_bt: jax.Array | None) -> jax.Array:
    """(B, T, D) -> (B, D): the hidden state of each row's last non-pad token by the attention mask.

    Hugging Face picks the rightmost token whose id != pad_token_id instead; the two agree unless the
    pad token also appears as a real token (e.g. SmolLM2, where pad = eos). Works for left and right padding.
    """
    if mask_bt is None:
        return h_btd[:, -1]
    t = mask_bt.shape[1]
    idx = jnp.max(jnp.where(mask_bt.astype(bool), jnp.arange(t)[None, :], 0), axis=1)
    return jnp.take_along_axis(h_btd, idx[:, None, None], axis=1)[:, 0]
