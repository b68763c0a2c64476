"""SORSA: A = P_r, S = sigma_r, B = Q_r^T all trainable on the residual W_res = W0 - s A0 diag(S0) B0, with an
orthonormality regulariser whose gradient, times gamma / peak lr, joins the task gradient AFTER clipping.

Imports jax and sibling adapter modules only. Shapes (flax layout): A (n_in, r), S (r,), B (r, n_out).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from jaxpeft.errors import AdapterError
from jaxpeft.adapters.lora import LoraConfig
from jaxpeft.adapters.method import low_rank, register
from jaxpeft.adapters.pissa import ResidualLoRA
from jaxpeft.adapters.svd import check_rank, orthogonality_gap, svd_f32


@dataclass(frozen=True)
class SorsaConfig(LoraConfig):
    """LoRA's targeting, r, dropout; lora_alpha None gives s = 1 (the SORSA code's default), else s = alpha / r.

    gamma: the regulariser's weight; R = mean over all A and B of ||A^T A - I||_F / ||B B^T - I||_F, and the
    optimizer sees clip(grad task) + (gamma / peak lr) grad R (the released code's placement; never the scheduled
    lr, which is 0 during warm-up).
    """

    lora_alpha: float | None = None
    gamma: float = 4e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "method", "sorsa")
        if self.gamma < 0:
            raise AdapterError(f"gamma={self.gamma}: must be >= 0")


class Sorsa(ResidualLoRA):
    """SORSA: a ResidualLoRA with lora_A = P_r, sorsa_S = sigma_r, lora_B = Q_r^T all trainable, and an orthonormality
    regulariser whose gradient joins the task gradient after clipping."""

    name = "sorsa"
    config_cls = SorsaConfig

    def scale(self, cfg, options):
        alpha = options.get("alpha", cfg.lora_alpha)
        if alpha is None:
            return 1.0
        r = options.get("r", cfg.r)
        return alpha / r ** 0.5 if cfg.use_rslora else alpha / r

    def factors(self, cfg, options, kernel, rng, scale):
        r = options.get("r", cfg.r)
        check_rank("SORSA", r, kernel)
        p, sigma, q = svd_f32(kernel)
        return {"lora_A": p[:, :r], "sorsa_S": sigma[:r], "lora_B": q[:, :r].T}

    def middle(self, cfg, trainable):
        return trainable["sorsa_S"]

    def adapter_out(self, cfg, trainable, x):
        return low_rank(x, trainable["lora_A"], trainable["lora_B"], trainable["sorsa_S"])

    def adapter_matrix(self, cfg, trainable):
        return (trainable["lora_A"] * trainable["sorsa_S"]) @ trainable["lora_B"]

    def residual_factors(self, cfg, trainable):
        return trainable["lora_A"] * trainable["sorsa_S"], trainable["lora_B"]

    def has_regularizer(self, cfg):
        return cfg.gamma > 0

    def regularizer_term(self, cfg, options, trainable, extras):
        return orthogonality_gap(trainable["lora_A"], rows=False) + orthogonality_gap(trainable["lora_B"], rows=True), 2.0

    def regularizer_reduction(self, cfg):
        return "mean"

    def regularizer_placement(self, cfg):
        return "post_clip"

    def post_clip_scale(self, cfg, peak_lr):
        return cfg.gamma / peak_lr


register(Sorsa())
