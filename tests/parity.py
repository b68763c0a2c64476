"""The one assertion helper for every parity test: errors over non-pad positions only."""
from __future__ import annotations

import numpy as np


def parity_errors(actual, expected, mask=None) -> tuple[float, float]:
    """(max-abs error, norm-relative error ||a - e|| / ||e||) over positions where mask is true.

    actual, expected: (B, T, ...) or (B, ...); mask: (B, T) (or None = every position).
    """
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"shape mismatch: {a.shape} vs {e.shape}"
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        a, e = a[m], e[m]
    diff = a - e
    return float(np.max(np.abs(diff))), float(np.linalg.norm(diff) / max(np.linalg.norm(e), 1e-30))


def assert_close(actual, expected, mask=None, *, max_abs: float, rel: float | None = None, what: str = "") -> None:
    """Fail unless max-abs error <= max_abs (and norm-relative error <= rel when given) on masked positions."""
    err, rerr = parity_errors(actual, expected, mask)
    assert np.isfinite(err), f"{what}: non-finite values"
    assert err <= max_abs, f"{what}: max-abs error {err:.3e} > {max_abs:.1e} (norm-relative {rerr:.3e})"
    if rel is not None:
        assert rerr <= rel, f"{what}: norm-relative error {rerr:.3e} > {rel:.1e} (max-abs {err:.3e})"


def assert_token_head_dropout(cfg, head: str, p: float, seed: int = 0):
    """A token_cls model of `cfg` whose other dropouts are 0, with random weights and an identity `head` (kernel I,
    bias 0): train mode must leave the final hidden states alone and zero a fraction p of the head's input, scaling
    the rest by 1 / (1 - p), as HF's token-classification heads do. Returns the dropped mask (B, T, D)."""
    import functools

    import jax
    import jax.numpy as jnp

    from jaxpeft.loading.convert import unflatten_params
    from jaxpeft.models import build_model
    from jaxpeft.models.namemap import name_map

    module = build_model(cfg, "token_cls")
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, cfg.vocab_size, (8, 16)).astype(np.int32)
    params = unflatten_params({e.flax_path: jnp.asarray(e.flax_path.endswith("scale") + 0.2 * rng.randn(*e.shape),
                                                        jnp.float32) for e in name_map(cfg, "token_cls")})
    d = cfg.hidden_size
    params = dict(params, **{head: {"kernel": jnp.eye(d), "bias": jnp.zeros(d)}})

    @functools.partial(jax.jit, static_argnums=0)
    def run(deterministic, key):
        out = module.apply({"params": params}, ids, deterministic=deterministic, rngs={"dropout": key})
        return out.hidden, out.logits

    h, det = map(np.asarray, run(True, jax.random.key(1)))
    h_train, y = map(np.asarray, run(False, jax.random.key(1)))
    np.testing.assert_array_equal(h_train, h)  # dropout only at the head
    assert_close(det, h, max_abs=1e-5, what=f"identity {head}, eval mode")
    dropped = y == 0
    assert abs(dropped.mean() - p) < 0.04, dropped.mean()  # 8 x 16 x 32 units: std of the fraction ~0.007
    assert_close(y[~dropped] * (1 - p), h[~dropped], max_abs=1e-5, what="kept units scaled by 1 / (1 - p)")
    other = np.asarray(run(False, jax.random.key(2))[1])
    assert not np.array_equal(other == 0, dropped), "the mask must come from the dropout rng"
    return dropped
