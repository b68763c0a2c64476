"""SVFit: only the top r singular values of W0 are trained, y = x (W_e + P_r diag(sigma') Q_r^T) + b with
W_e = W0 - P_r diag(sigma_r) Q_r^T; sigma' starts at sigma_r, so the model starts as the base.

Imports jax and sibling adapter modules only. Frozen: P_r (n_in, r), Q_r^T (r, n_out), sigma_r (r,); trainable
sigma' (r,). The change x P_r diag(sigma' - sigma_r) Q_r^T is applied beside the base, never by rewriting W0.
Scaling and init beyond this are unverified in the literature (secondary sources only).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from jaxpeft.errors import AdapterError
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.lora import DEFAULT_TARGETS
from jaxpeft.adapters.method import DenseMethod, low_rank, register
from jaxpeft.adapters.svd import check_rank, svd_f32


@dataclass(frozen=True)
class SvfitConfig(AdapterConfig):
    """r: how many of the largest singular values are trained per module (the only trainable parameters)."""

    r: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "method", "svfit")
        if self.r < 1:
            raise AdapterError(f"r={self.r}: must be >= 1")


class Svfit(DenseMethod):
    """SVFit: trainable svfit_sigma (r,) on W0's frozen top-r singular vectors svfit_P (n_in, r), svfit_Qt (r, n_out);
    the output changes by x P_r diag(sigma' - sigma_r) Q_r^T."""

    name = "svfit"
    config_cls = SvfitConfig

    def default_targets(self, arch):
        return DEFAULT_TARGETS[arch]

    def init(self, cfg, options, kernel, bias, rng):
        r = options.get("r", cfg.r)
        check_rank("SVFit", r, kernel)
        p, sigma, q = svd_f32(kernel)
        return {"svfit_sigma": sigma[:r]}, {"svfit_P": p[:, :r], "svfit_Qt": q[:, :r].T, "svfit_sigma0": sigma[:r]}

    def forward(self, cfg, options, x, base_out, base_fn, kernel, bias, trainable, extras, scale, dropout):
        change = trainable["svfit_sigma"] - extras["svfit_sigma0"]
        return low_rank(x, extras["svfit_P"], extras["svfit_Qt"], change)

    def merge(self, cfg, options, kernel, bias, trainable, extras, scale):
        change = trainable["svfit_sigma"] - extras["svfit_sigma0"]
        w = kernel.astype(jnp.float32) + (extras["svfit_P"] * change) @ extras["svfit_Qt"]
        return w, None if bias is None else bias.astype(jnp.float32)


register(Svfit())
