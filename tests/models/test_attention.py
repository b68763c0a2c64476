"""jaxpeft.models.attention.attend: attention dropout with grouped query heads equals the repeated-K/V
reference with the same dropout mask, and without dropout the fused path is plain softmax attention."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.models.attention import attend

RNG = np.random.default_rng(0)
B, T, S, H, HKV, D = 2, 5, 7, 6, 2, 4
Q = jnp.asarray(RNG.normal(size=(B, T, H, D)), jnp.float32)
K = jnp.asarray(RNG.normal(size=(B, S, HKV, D)), jnp.float32)
V = jnp.asarray(RNG.normal(size=(B, S, HKV, D)), jnp.float32)
MASK = jnp.asarray(RNG.random((B, 1, T, S)) > 0.3).at[:, :, :, 0].set(True)


def reference(rate, key):
    """K and V repeated per query head, the dropout mask drawn over (B, H, T, S)."""
    k, v = jnp.repeat(K, H // HKV, axis=2), jnp.repeat(V, H // HKV, axis=2)
    logits = jnp.where(MASK, jnp.einsum("bthd,bshd->bhts", Q, k) * 0.5, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if rate:
        keep = jax.random.bernoulli(key, 1.0 - rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - rate), 0.0)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_grouped_attention_equals_repeated_kv_with_the_same_dropout_mask(rate):
    key = jax.random.key(3)
    got = attend(Q, K, V, MASK, 0.5, dropout_rate=rate, dropout_rng=key if rate else None)
    np.testing.assert_allclose(got, reference(rate, key), atol=1e-5)
    if rate:  # the mask matters: another key gives another result
        other = attend(Q, K, V, MASK, 0.5, dropout_rate=rate, dropout_rng=jax.random.key(4))
        assert float(jnp.max(jnp.abs(other - got))) > 1e-2
