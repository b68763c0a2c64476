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
