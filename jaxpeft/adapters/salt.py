"""SALT (singular-value adaptation with low-rank transformation): the top r_t singular values get a trainable
scale and shift, the rest of the spectrum a trainable low-rank update X Y, and W' = U ReLU(Sigma') V^T is rebuilt
on every forward.

Imports jax and sibling adapter modules only. Frozen per module: U (n_in, k), sigma (k,), V^T (k, n_out) -- the
FULL SVD, because the element-wise ReLU over the whole k x k Sigma' makes the change full-rank. SALT is therefore
the one method in the SVD family whose frozen extras are as large as the base weight (docs/methods/svd_family.md).
Trainable: a, b (r_t,) (init 1, 0), X (k - r_t, r) (kaiming-uniform for ReLU: U(+-sqrt(6 / r))), Y (r, k - r_t) = 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxpeft.errors import AdapterError
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.lora import DEFAULT_TARGETS
from jaxpeft.adapters.method import DenseMethod, mm, register
from jaxpeft.adapters.svd import svd_f32


@dataclass(frozen=True)
class SaltConfig(AdapterConfig):
    """r: rank of the low-rank update X Y of the tail spectrum (r_lora). r_top: how many top singular values get
    the scale-and-shift (r_t); top_ratio, when set, replaces it with max(1, floor(top_ratio * k)) per module.
    reg_multiplier: weight of R = sum over modules of ||(a - 1) sigma_top + b||_2 + ||X Y||_F (0.01 in the
    released train.py; 0 switches it off)."""

    r: int = 8
    r_top: int = 8
    top_ratio: float | None = None
    reg_multiplier: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "method", "salt")
        if self.r < 1 or self.r_top < 1:
            raise AdapterError(f"r={self.r}, r_top={self.r_top}: both must be >= 1")
        if self.top_ratio is not None and not 0.0 < self.top_ratio < 1.0:
            raise AdapterError(f"top_ratio={self.top_ratio}: must be in (0, 1) (or null to use r_top)")
        if self.reg_multiplier < 0:
            raise AdapterError(f"reg_multiplier={self.reg_multiplier}: must be >= 0")


def top_rank(cfg: SaltConfig, k: int) -> int:
    """r_t for a weight with k = min(n_in, n_out) singular values."""
    r_t = max(1, math.floor(cfg.top_ratio * k)) if cfg.top_ratio is not None else cfg.r_top
    if r_t >= k:
        raise AdapterError(f"SALT needs r_top < min(n_in, n_out): r_top={r_t} with k={k}; lower r_top or top_ratio")
    return r_t


class Salt(DenseMethod):
    """SALT: frozen full SVD of W0 (salt_U, salt_sigma, salt_Vt); trainable scale and shift salt_a, salt_b (r_t,) of
    the top singular values and salt_X, salt_Y of the tail; the output changes by x U (ReLU(Sigma') - Sigma) V^T."""

    name = "salt"
    config_cls = SaltConfig

    def default_targets(self, arch):
        return DEFAULT_TARGETS[arch]

    def init(self, cfg, options, kernel, bias, rng):
        p, sigma, q = svd_f32(kernel)
        k = sigma.shape[0]
        r_t, r = top_rank(cfg, k), options.get("r", cfg.r)
        bound = math.sqrt(6.0 / r)
        trainable = {"salt_a": jnp.ones((r_t,), jnp.float32), "salt_b": jnp.zeros((r_t,), jnp.float32),
                     "salt_X": jax.random.uniform(rng, (k - r_t, r), jnp.float32, -bound, bound),
                     "salt_Y": jnp.zeros((r, k - r_t), jnp.float32)}
        return trainable, {"salt_U": p, "salt_sigma": sigma, "salt_Vt": q.T}

    def _sigma_change(self, trainable, extras):
        """(top (r_t,), tail (k - r_t, k - r_t)): ReLU(Sigma') - diag(sigma), split into its two blocks (the cross
        blocks of Sigma' are 0 and stay 0 under ReLU)."""
        sigma = extras["salt_sigma"]
        r_t = trainable["salt_a"].shape[0]
        top = jax.nn.relu(trainable["salt_a"] * sigma[:r_t] + trainable["salt_b"]) - sigma[:r_t]
        tail_sigma = jnp.diag(sigma[r_t:])
        tail = jax.nn.relu(tail_sigma + trainable["salt_X"] @ trainable["salt_Y"]) - tail_sigma
        return top, tail

    def forward(self, cfg, options, x, base_out, base_fn, kernel, bias, trainable, extras, scale, dropout):
        top, tail = self._sigma_change(trainable, extras)
        r_t = top.shape[0]
        xu = mm(x, extras["salt_U"])  # (..., k)
        z = jnp.concatenate([xu[..., :r_t] * top, xu[..., r_t:] @ tail], axis=-1)
        return mm(z.astype(x.dtype), extras["salt_Vt"])

    def merge(self, cfg, options, kernel, bias, trainable, extras, scale):
        top, tail = self._sigma_change(trainable, extras)
        r_t = top.shape[0]
        u, vt = extras["salt_U"], extras["salt_Vt"]
        delta = (u[:, :r_t] * top) @ vt[:r_t] + (u[:, r_t:] @ tail) @ vt[r_t:]
        return kernel.astype(jnp.float32) + delta, None if bias is None else bias.astype(jnp.float32)

    def has_regularizer(self, cfg):
        return cfg.reg_multiplier > 0

    def regularizer_term(self, cfg, options, trainable, extras):
        r_t = trainable["salt_a"].shape[0]
        shift = (trainable["salt_a"] - 1.0) * extras["salt_sigma"][:r_t] + trainable["salt_b"]
        xy = trainable["salt_X"] @ trainable["salt_Y"]
        return cfg.reg_multiplier * (jnp.sqrt(jnp.sum(shift ** 2)) + jnp.sqrt(jnp.sum(xy ** 2))), 1.0


register(Salt())
