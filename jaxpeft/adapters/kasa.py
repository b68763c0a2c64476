"""KaSA (knowledge-aware singular-value adaptation): the base weight loses its r smallest singular components
once, at init, and an SVD-shaped adapter y += s ((drop(x) A) * d) B learns in their place, with an L2 penalty on
the singular values d and an orthogonality penalty on A and B (docs/methods/kasa.md).

Imports jax and sibling adapter modules only. Shapes (flax layout): A (n_in, r), d (r,), B (r, n_out). The dropped
component is a frozen low-rank correction beside the base (left (n_in, m) = P_m diag(sigma_m), right (m, n_out)
= Q_m^T): the base tree is never rewritten.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxpeft.errors import AdapterError
from jaxpeft.adapters.lora import Lora, LoraConfig
from jaxpeft.adapters.method import low_rank, register
from jaxpeft.adapters.svd import orthogonality_gap, svd_f32

PRESETS = {
    "kasa_hf": {"truncation": "hf", "ortho_mode": "paper_rxr", "reduction": "sum"},
    "kasa_official": {"truncation": "official", "ortho_mode": "code_nxn", "reduction": "mean"},
}
CHOICES = {"truncation": ("hf", "official"), "ortho_mode": ("paper_rxr", "code_nxn"), "reduction": ("sum", "mean")}


@dataclass(frozen=True)
class KasaConfig(LoraConfig):
    """LoRA's fields (r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, targeting) plus KaSA's.

    beta: weight of R2 = sum_j d_j^2 per module. gamma: weight of R3, the orthogonality penalty.
    truncation: how many triplets the base keeps, K: 'hf' K = min(n_in, n_out) - r (Hugging Face PEFT; drops r in
        every module; r must be < min(n_in, n_out)) or 'official' K = n_in - r (the released code; drops nothing
        where n_out < n_in, e.g. GQA k/v or down_proj).
    ortho_mode: 'paper_rxr' R3 = ||A^T A - I_r||_F + ||B B^T - I_r||_F (paper, PEFT) or 'code_nxn'
        ||A A^T - I_n_in||_F + ||B^T B - I_n_out||_F (released code; floor sqrt(n - r) per term).
    reduction: 'sum' R = sum over modules of beta R2 + gamma R3 (PEFT `_get_kasa_loss`) or 'mean' R =
        (beta sum R2 + gamma sum R3) / number of modules (released code).
    preset: 'kasa_hf' (hf, paper_rxr, sum: the defaults, needed for PEFT interop) or 'kasa_official'
        (official, code_nxn, mean: reproduces the released numbers); it sets those three fields, which must
        then be left at their defaults or agree with it.
    """

    beta: float = 1e-4
    gamma: float = 1e-3
    truncation: str = "hf"
    ortho_mode: str = "paper_rxr"
    reduction: str = "sum"
    preset: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "method", "kasa")
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise AdapterError(f"preset={self.preset!r}: supported {sorted(PRESETS)} (or null)")
            defaults = PRESETS["kasa_hf"]
            for key, value in PRESETS[self.preset].items():
                given = getattr(self, key)
                if given != defaults[key] and given != value:
                    raise AdapterError(f"preset={self.preset!r} sets {key}={value!r} but the config also sets "
                                     f"{key}={given!r}: drop one of them")
                object.__setattr__(self, key, value)
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise AdapterError(f"{key}={getattr(self, key)!r}: supported {allowed}")
        if self.beta < 0 or self.gamma < 0:
            raise AdapterError(f"beta={self.beta}, gamma={self.gamma}: the regulariser weights must be >= 0")


def kept_rank(cfg: KasaConfig, r: int, n_in: int, n_out: int) -> int:
    """K: how many of the base weight's singular triplets the truncation keeps (the rest are dropped)."""
    k = min(n_in, n_out)
    if cfg.truncation == "hf":
        if r >= k:
            raise AdapterError(f"KaSA (truncation 'hf') needs r < min(n_in, n_out): r={r} on a {n_in}x{n_out} weight; "
                             "lower r or exclude this module")
        return k - r
    if r >= n_in:
        raise AdapterError(f"KaSA (truncation 'official') needs r < n_in: r={r} on a {n_in}x{n_out} weight")
    return min(k, n_in - r)


class Kasa(Lora):
    """LoRA's targets, scale and A init; B = 0, d ~ N(0, 1); the dropped spectrum as a frozen correction."""

    name = "kasa"
    config_cls = KasaConfig

    def init(self, cfg, options, kernel, bias, rng):
        trainable, _ = super().init(cfg, options, kernel, bias, rng)
        r = options.get("r", cfg.r)
        trainable["lora_diag"] = jax.random.normal(jax.random.fold_in(rng, 7), (r,), jnp.float32)
        n_in, n_out = kernel.shape
        keep = kept_rank(cfg, r, n_in, n_out)
        extras = {}
        if keep < min(n_in, n_out):
            p, sigma, q = svd_f32(kernel)
            extras = {"kasa_drop_left": p[:, keep:] * sigma[keep:], "kasa_drop_right": q[:, keep:].T}
        return trainable, extras

    def forward(self, cfg, options, x, base_out, base_fn, kernel, bias, trainable, extras, scale, dropout):
        delta = scale * low_rank(dropout(x), trainable["lora_A"], trainable["lora_B"], trainable["lora_diag"])
        if "kasa_drop_left" in extras:
            # the dropped spectrum acts as a frozen low-rank correction, never as an n_in x n_out matrix
            delta = delta - low_rank(x, extras["kasa_drop_left"], extras["kasa_drop_right"])
        return delta

    def merge(self, cfg, options, kernel, bias, trainable, extras, scale):
        w = kernel.astype(jnp.float32)
        if "kasa_drop_left" in extras:
            w = w - extras["kasa_drop_left"] @ extras["kasa_drop_right"]
        w = w + scale * ((trainable["lora_A"] * trainable["lora_diag"]) @ trainable["lora_B"])
        return w, None if bias is None else bias.astype(jnp.float32)

    # ---- the regulariser R = beta R2 + gamma R3 ----------------------------------------------------------
    def has_regularizer(self, cfg):
        return cfg.beta > 0 or cfg.gamma > 0

    def regularizer_term(self, cfg, options, trainable, extras):
        return kasa_module_terms(cfg, trainable["lora_A"], trainable["lora_B"], trainable["lora_diag"]), 1.0

    def regularizer_reduction(self, cfg):
        return cfg.reduction


def kasa_module_terms(cfg: KasaConfig, a: jax.Array, b: jax.Array, d: jax.Array) -> jax.Array:
    """beta R2 + gamma R3 of one module (float32): a (n_in, r), b (r, n_out), d (r,)."""
    r2 = jnp.sum(jnp.square(d.astype(jnp.float32)))
    if cfg.ortho_mode == "paper_rxr":
        r3 = orthogonality_gap(a, rows=False) + orthogonality_gap(b, rows=True)
    else:  # ||A A^T - I_n||_F^2 = ||A^T A - I_r||_F^2 + (n - r): the n x n Gram matrix is never formed
        n_in, r = a.shape
        n_out = b.shape[1]
        r3 = (jnp.sqrt(jnp.square(orthogonality_gap(a, rows=False)) + (n_in - r))
              + jnp.sqrt(jnp.square(orthogonality_gap(b, rows=True)) + (n_out - r)))
    return cfg.beta * r2 + cfg.gamma * r3


register(Kasa())
