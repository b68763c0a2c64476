"""LoRA and rsLoRA: y = x W0 + b + s (drop(x) A) B, s = alpha / r (alpha / sqrt(r) with rsLoRA).

Imports jax and the adapter method base only. Shapes (flax layout): A (n_in, r), B (r, n_out).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.errors import AdapterError
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.method import DenseMethod, low_rank, register

DEFAULT_TARGETS = {
    "llama": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"), "gemma3_text": ("q_proj", "v_proj"),
    "bert": ("query", "value"), "roberta": ("query", "value"), "gpt2": ("c_attn",),
}
INIT_CHOICES = (True, False, "gaussian")


@dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    """LoRA hyper-parameters (PEFT defaults).

    r: rank; lora_alpha: alpha; lora_dropout: dropout on the adapter input; use_rslora: s = alpha/sqrt(r);
    init_lora_weights: True (A ~ U(+-1/sqrt(n_in)) as PyTorch kaiming_uniform(a=sqrt 5), B = 0),
    'gaussian' (A ~ N(0, 1/r^2), B = 0) or False (B random too: a non-zero adapter, for tests).
    """

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: bool | str = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "method", "lora")
        _check_lora(self)


def _check_lora(cfg: Any) -> None:
    if cfg.r < 1:
        raise AdapterError(f"r={cfg.r}: the LoRA rank must be >= 1")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise AdapterError(f"lora_dropout={cfg.lora_dropout}: must be in [0, 1)")
    if cfg.init_lora_weights not in INIT_CHOICES:
        raise AdapterError(f"init_lora_weights={cfg.init_lora_weights!r}: supported {INIT_CHOICES}")


def lora_scale(cfg: Any, options: dict[str, Any]) -> float:
    """s = alpha / r, or alpha / sqrt(r) with use_rslora; r and alpha from the module's options (rank_pattern,
    alpha_pattern) when they set them, else the config's."""
    r, alpha = options.get("r", cfg.r), options.get("alpha", cfg.lora_alpha)
    return alpha / math.sqrt(r) if cfg.use_rslora else alpha / r


def init_lora_ab(cfg: Any, options: dict[str, Any], n_in: int, n_out: int, rng: jax.Array):
    """(A (n_in, r), B (r, n_out)) float32 by cfg.init_lora_weights."""
    r = options.get("r", cfg.r)
    ka, kb = jax.random.split(rng)
    if cfg.init_lora_weights == "gaussian":
        a = jax.random.normal(ka, (n_in, r)) / r
    else:
        bound = 1.0 / math.sqrt(n_in)
        a = jax.random.uniform(ka, (n_in, r), minval=-bound, maxval=bound)
    if cfg.init_lora_weights is False:
        bound = 1.0 / math.sqrt(r)
        b = jax.random.uniform(kb, (r, n_out), minval=-bound, maxval=bound)
    else:
        b = jnp.zeros((r, n_out))
    return a.astype(jnp.float32), b.astype(jnp.float32)


class Lora(DenseMethod):
    """LoRA / rsLoRA: trainable lora_A (n_in, r) and lora_B (r, n_out); the output changes by s (drop(x) A) B."""

    name = "lora"
    config_cls = LoraConfig

    def default_targets(self, arch: str) -> tuple[str, ...]:
        return DEFAULT_TARGETS[arch]

    def scale(self, cfg, options):
        return lora_scale(cfg, options)

    def init(self, cfg, options, kernel, bias, rng):
        a, b = init_lora_ab(cfg, options, kernel.shape[0], kernel.shape[1], rng)
        return {"lora_A": a, "lora_B": b}, {}

    def forward(self, cfg, options, x, base_out, base_fn, kernel, bias, trainable, extras, scale, dropout):
        return scale * low_rank(dropout(x), trainable["lora_A"], trainable["lora_B"])

    def merge(self, cfg, options, kernel, bias, trainable, extras, scale):
        delta = scale * (trainable["lora_A"] @ trainable["lora_B"])
        return kernel.astype(jnp.float32) + delta, None if bias is None else bias.astype(jnp.float32)


register(Lora())
