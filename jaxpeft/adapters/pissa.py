"""PiSSA: LoRA whose A and B start as the principal singular directions of W0 (A = P_r diag(sqrt(sigma_r / s)),
B = diag(sqrt(sigma_r / s)) Q_r^T), trained on the residual W_res = W0 - s A0 B0 so the model starts as the base.

Imports jax and sibling adapter modules only. `ResidualLoRA` is the shared form of every method that starts from
a low-rank piece of W0 and trains it on the residual (PiSSA, CorDA, SORSA): the subtracted piece s L0 R0 is a
frozen low-rank correction (L0 (n_in, r), R0 (r, n_out)) beside the base, never a rewritten or copied kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxpeft.errors import AdapterError
from jaxpeft.adapters.lora import Lora, LoraConfig
from jaxpeft.adapters.method import low_rank, register
from jaxpeft.adapters.svd import check_rank, randomized_svd_f32, svd_f32


MAX_NITER = 64
"""The most randomized-SVD subspace iterations PissaConfig accepts (each is unrolled into the traced init)."""


@dataclass(frozen=True)
class PissaConfig(LoraConfig):
    """LoRA's fields; init_lora_weights is replaced by the SVD init.

    niter: None = exact SVD (PEFT init_lora_weights='pissa'); k = randomized SVD with k subspace iterations
    (PEFT 'pissa_niter_k', 0 <= k <= 64), much faster on large weights and close to exact for k >= 4.
    """

    niter: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "method", "pissa")
        if self.niter is not None and not 0 <= self.niter <= MAX_NITER:
            raise AdapterError(f"niter={self.niter}: the number of subspace iterations must be in [0, {MAX_NITER}] "
                               "(the iterations are unrolled into the init program; a few, e.g. 4, come close to the "
                               "exact SVD); null: the exact SVD")


class ResidualLoRA(Lora):
    """LoRA on W_res = W0 - s L0 R0: trainable lora_A, lora_B (and any extra factor a subclass adds), the frozen
    correction `res_left` (n_in, r) = L0, `res_right` (r, n_out) = R0 copied from the initial factors."""

    def factors(self, cfg, options, kernel, rng, scale) -> dict[str, jax.Array]:
        """The initial trainable factors of one layer (lora_A (n_in, r), lora_B (r, n_out), ...)."""
        raise NotImplementedError

    def adapter_out(self, cfg, trainable, x):
        """(x A) B in float32 for x (..., n_in); subclasses with a middle factor override it."""
        return low_rank(x, trainable["lora_A"], trainable["lora_B"])

    def adapter_matrix(self, cfg, trainable):
        """A B (n_in, n_out), float32."""
        return trainable["lora_A"] @ trainable["lora_B"]

    def residual_factors(self, cfg, trainable) -> tuple[jax.Array, jax.Array]:
        """(L0, R0) with L0 R0 = the initial adapter_matrix."""
        return trainable["lora_A"], trainable["lora_B"]

    def init(self, cfg, options, kernel, bias, rng, calibration=None):
        extra = {"calibration": calibration} if self.needs_calibration else {}
        trainable = self.factors(cfg, options, kernel, rng, self.scale(cfg, options), **extra)
        left, right = self.residual_factors(cfg, trainable)
        return trainable, {"res_left": left, "res_right": right}

    def forward(self, cfg, options, x, base_out, base_fn, kernel, bias, trainable, extras, scale, dropout):
        return scale * (self.adapter_out(cfg, trainable, dropout(x))
                        - low_rank(x, extras["res_left"], extras["res_right"]))

    def merge(self, cfg, options, kernel, bias, trainable, extras, scale):
        delta = self.adapter_matrix(cfg, trainable) - extras["res_left"] @ extras["res_right"]
        return kernel.astype(jnp.float32) + scale * delta, None if bias is None else bias.astype(jnp.float32)

    def lora_equivalent(self, cfg, trainable, extras) -> tuple[jax.Array, jax.Array]:
        """(A' (n_in, 2r), B' (2r, n_out)) with A' B' = A B - L0 R0: the same change as a plain LoRA of rank 2r on
        the ORIGINAL base (what PEFT loads against W0)."""
        a = trainable["lora_A"] * self.middle(cfg, trainable)
        return (jnp.concatenate([a, extras["res_left"]], axis=1),
                jnp.concatenate([trainable["lora_B"], -extras["res_right"]], axis=0))

    def middle(self, cfg, trainable) -> jax.Array:
        """The diagonal between A and B (ones for plain A B)."""
        return jnp.ones((trainable["lora_A"].shape[1],), jnp.float32)


def sqrt_split(p_r: jax.Array, sigma_r: jax.Array, q_r: jax.Array, scale) -> tuple[jax.Array, jax.Array]:
    """(A, B) = (P_r diag(sqrt(sigma_r / s)), diag(sqrt(sigma_r / s)) Q_r^T), so that s A B = P_r diag(sigma_r) Q_r^T."""
    root = jnp.sqrt(sigma_r / scale)
    return p_r * root, root[:, None] * q_r.T


class Pissa(ResidualLoRA):
    """PiSSA: a ResidualLoRA whose lora_A, lora_B start from W0's top-r SVD (exact, or randomized with niter)."""

    name = "pissa"
    config_cls = PissaConfig

    def factors(self, cfg, options, kernel, rng, scale):
        r = options.get("r", cfg.r)
        check_rank("PiSSA", r, kernel)
        if cfg.niter is None:
            p, sigma, q = svd_f32(kernel)
        else:
            p, sigma, q = randomized_svd_f32(kernel, r, cfg.niter, rng)
        a, b = sqrt_split(p[:, :r], sigma[:r], q[:, :r], scale)
        return {"lora_A": a, "lora_B": b}


register(Pissa())
