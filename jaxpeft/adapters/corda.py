"""CorDA (context-oriented decomposition adaptation): PiSSA's residual form, but the decomposed matrix is W C, with
C the covariance of the layer's inputs on a few calibration examples, so the kept directions are those the task's
inputs excite (IPM: the top r, trained) or those it does not (KPM: the bottom r, trained; the top kept frozen).

Imports jax and sibling adapter modules only. Follows PEFT 0.21.2 `corda.py`: one example per forward, no padding,
X^ = X / |max(X)| per forward, C = mean over forwards of X^T X^; damping C' = C + delta mean(diag C) I with delta
from 0.01, doubled until ||C' C'^-1 - I||_F < 0.05; SVD of W_pt C' = U S Vh, V^ = (Vh C'^-1)^T.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxpeft.errors import AdapterError
from jaxpeft.adapters.lora import LoraConfig
from jaxpeft.adapters.method import register
from jaxpeft.adapters.pissa import ResidualLoRA, sqrt_split
from jaxpeft.adapters.svd import check_rank


@dataclass(frozen=True)
class CordaConfig(LoraConfig):
    """LoRA's fields plus corda_method: 'ipm' (instruction-previewed: adapt the top r directions) or 'kpm'
    (knowledge-preserving: adapt the bottom r). calibration_samples: how many training examples a run feeds to
    `AdaptedModel.calibrate` before creating the adapter (one per forward, unpadded)."""

    corda_method: str = "ipm"
    calibration_samples: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "method", "corda")
        if self.corda_method not in ("ipm", "kpm"):
            raise AdapterError(f"corda_method={self.corda_method!r}: supported 'ipm', 'kpm'")
        if self.calibration_samples < 1:
            raise AdapterError(f"calibration_samples={self.calibration_samples}: must be >= 1")


def input_covariance(x: jax.Array) -> jax.Array:
    """X^T X of one forward's inputs x (1, T, n_in) after X / |max(X)| (PEFT's per-forward normalisation), float32."""
    if x.ndim != 3 or x.shape[0] != 1:
        raise AdapterError(f"CorDA calibration takes one unpadded example per forward (inputs (1, T, n_in)), got "
                         f"{x.shape}: feed examples one at a time")
    xs = x[0].astype(jnp.float32)
    xs = xs / jnp.abs(jnp.max(xs))
    return xs.T @ xs


def damped_inverse(cov: jax.Array, tol: float = 0.05, start: float = 0.01, max_doublings: int = 40
                   ) -> tuple[jax.Array, jax.Array]:
    """(C', C'^-1) with C' = C + delta mean(diag C) I, delta = start * 2^j for the first j that gives
    ||C' C'^-1 - I||_F < tol."""
    n = cov.shape[0]
    eye = jnp.eye(n, dtype=jnp.float32)
    unit = jnp.mean(jnp.diag(cov)) * eye

    def attempt(delta):
        fixed = cov + delta * unit
        inv = jnp.linalg.inv(fixed)
        return fixed, inv, jnp.sqrt(jnp.sum(jnp.square(fixed @ inv - eye)))

    def cond(c):
        delta, j, err = c
        return (err >= tol) & (j < max_doublings)

    def body(c):
        delta, j, _ = c
        return delta * 2.0, j + 1, attempt(delta * 2.0)[2]

    delta0 = jnp.asarray(start, jnp.float32)
    delta, _, _ = jax.lax.while_loop(cond, body, (delta0, 0, attempt(delta0)[2]))
    fixed, inv, _ = attempt(delta)
    return fixed, inv


class Corda(ResidualLoRA):
    """CorDA: a ResidualLoRA whose lora_A, lora_B come from the SVD of W0 C' (C' the damped input covariance from
    `calibrate`): the top r directions with 'ipm', the bottom r with 'kpm'."""

    name = "corda"
    config_cls = CordaConfig
    needs_calibration = True

    def factors(self, cfg, options, kernel, rng, scale, calibration=None):
        if calibration is None or "covariance" not in calibration:
            raise AdapterError("CorDA needs calibration statistics: stats = model.calibrate(frozen, examples, name), "
                             "then model.init(rng, frozen, calibration={name: stats}) (`jaxpeft train` does both)")
        r = options.get("r", cfg.r)
        check_rank("CorDA", r, kernel)
        fixed, inv = damped_inverse(calibration["covariance"].astype(jnp.float32))
        w_pt = kernel.astype(jnp.float32).T  # (n_out, n_in), PyTorch layout
        u, s, vh = jnp.linalg.svd(w_pt @ fixed, full_matrices=False)
        v_hat = (vh @ inv).T  # (n_in, k)
        pick = slice(0, r) if cfg.corda_method == "ipm" else slice(s.shape[0] - r, s.shape[0])
        a, b = sqrt_split(v_hat[:, pick], s[pick], u[:, pick], scale)
        return {"lora_A": a, "lora_B": b}

    def calibration_stats(self, x: jax.Array) -> dict[str, jax.Array]:
        return {"covariance": input_covariance(x)}

    def calibration_placeholder(self, site) -> dict[str, jax.Array]:
        """Identity covariances, for creating the adapter's structure when its values come from a file."""
        eye = jnp.eye(site.n_in, dtype=jnp.float32)
        return {"covariance": jnp.broadcast_to(eye, (site.num_layers, *eye.shape)) if site.layered else eye}


register(Corda())
