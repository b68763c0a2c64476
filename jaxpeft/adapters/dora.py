"""DoRA (weight-decomposed LoRA) as PEFT 0.21.2 computes it (`peft/tuners/lora/dora.py`, `DoraLinearLayer`).

Imports jax and sibling adapter modules only. Shapes (flax layout): A (n_in, r), B (r, n_out), m (n_out,).
The effective kernel is W' = (W0 + s A B) diag(m / n) with n_j = ||(W0 + s A B)[:, j]||_2 (the PyTorch "row
norm" of the weight), computed in float32 and held constant for the gradient (stop_gradient, DoRA paper §4.3).
The forward adds, like PEFT, delta = (m/n - 1) (x~ W0) + (m/n) s (x~ A) B with x~ = dropout(x); the bias is not
rescaled.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxpeft.adapters.lora import Lora, LoraConfig, lora_scale
from jaxpeft.adapters.method import low_rank, register


@dataclass(frozen=True)
class DoraConfig(LoraConfig):
    """LoRA's fields (r, lora_alpha, lora_dropout, use_rslora, init_lora_weights) with DoRA's magnitude vector.

    PEFT spells this `LoraConfig(use_dora=True)`. The magnitude starts at the column norms of W0 + s A B, so with
    the default init (B = 0) the adapted model equals the base model at step 0 (up to float rounding of m / n).
    """

    def __post_init__(self) -> None:
        super().__post_init__()  # LoraConfig's: normalises and checks the fields (and sets method='lora')
        object.__setattr__(self, "method", "dora")


def weight_norm(kernel: jax.Array, a: jax.Array, b: jax.Array, scale) -> jax.Array:
    """n = ||W0 + s A B|| per output column (n_out,), float32."""
    w = kernel.astype(jnp.float32) + scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))
    return jnp.sqrt(jnp.sum(w * w, axis=0))


class Dora(Lora):
    """LoRA's targets, scale and A/B init, plus the magnitude vector."""

    name = "dora"
    config_cls = DoraConfig

    def init(self, cfg, options, kernel, bias, rng):
        trainable, extras = super().init(cfg, options, kernel, bias, rng)
        m = weight_norm(kernel, trainable["lora_A"], trainable["lora_B"], lora_scale(cfg, options))
        return {**trainable, "lora_magnitude_vector": m}, extras

    def forward(self, cfg, options, x, base_out, base_fn, kernel, bias, trainable, extras, scale, dropout):
        a, b = trainable["lora_A"], trainable["lora_B"]
        norm = jax.lax.stop_gradient(weight_norm(kernel, a, b, scale))
        mag_norm_scale = trainable["lora_magnitude_vector"] / norm
        xd = dropout(x)
        if xd is x:
            # no dropout: x W0 is the base output minus the bias (PEFT reuses base_result the same way)
            xw = base_out.astype(jnp.float32)
            if bias is not None:
                xw = xw - bias.astype(jnp.float32)
        else:
            dt = base_out.dtype
            xw = jnp.dot(xd.astype(dt), kernel.astype(dt), preferred_element_type=jnp.float32)
        lora = low_rank(xd, a, b)
        return (mag_norm_scale - 1.0) * xw + mag_norm_scale * (scale * lora)

    def merge(self, cfg, options, kernel, bias, trainable, extras, scale):
        a, b = trainable["lora_A"], trainable["lora_B"]
        w = kernel.astype(jnp.float32) + scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))
        mag_norm_scale = trainable["lora_magnitude_vector"].astype(jnp.float32) / weight_norm(kernel, a, b, scale)
        return w * mag_norm_scale[None, :], None if bias is None else bias.astype(jnp.float32)


register(Dora())
