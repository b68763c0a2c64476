"""jaxpeft.train.losses: the one cross-entropy, against a log-softmax reference, and its chunked form (values and
gradients equal to computing all logits at once, for chunk sizes that do and do not divide K)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.train.losses import chunked_row_nll, token_nll, weighted_nll

RNG = np.random.default_rng(0)
B, K, D, V = 3, 10, 6, 17
H = jnp.asarray(RNG.normal(size=(B, K, D)), jnp.float32)
W_HEAD = jnp.asarray(RNG.normal(size=(D, V)), jnp.float32)
T = jnp.asarray(RNG.integers(0, V, size=(B, K)), jnp.int32)
M = jnp.asarray(RNG.integers(0, 2, size=(B, K)), jnp.float32)


def _reference_rows(h, w):
    logp = jax.nn.log_softmax(h @ w, axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, T[..., None], axis=-1)[..., 0] * M, axis=1)


def test_token_nll_is_minus_log_softmax_at_the_target_also_for_bf16_logits():
    logits = H @ W_HEAD
    ref = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), T[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(token_nll(logits, T), ref, atol=1e-5)
    assert token_nll(logits.astype(jnp.bfloat16), T).dtype == jnp.float32
    s, n = weighted_nll(logits, T, M)
    assert float(n) == float(M.sum()) and abs(float(s) - float(jnp.sum(ref * M))) < 1e-4


@pytest.mark.parametrize("chunk", [1, 3, 5, 10, 64])
def test_chunked_rows_and_gradients_equal_all_logits_at_once(chunk):
    def chunked(h, w):
        return chunked_row_nll(h, lambda x: x @ w, T, M, chunk)

    np.testing.assert_allclose(chunked(H, W_HEAD), _reference_rows(H, W_HEAD), rtol=1e-5, atol=1e-5)
    g_ref = jax.grad(lambda h, w: jnp.sum(_reference_rows(h, w)), argnums=(0, 1))(H, W_HEAD)
    g = jax.grad(lambda h, w: jnp.sum(chunked(h, w)), argnums=(0, 1))(H, W_HEAD)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
