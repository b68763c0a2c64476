"""(IA)^3: learned rescaling vectors, as PEFT 0.21.2 computes them (`peft/tuners/ia3/layer.py`).

Imports jax and sibling adapter modules only. Non-feed-forward target: y = (x W0 + b) * l, l: (n_out,) (the
bias is scaled too). Feed-forward target: y = (x * l) W0 + b, l: (n_in,). No dropout, no scale. Init l = 1.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.errors import AdapterError
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.method import DenseMethod, register
from jaxpeft.adapters.targeting import matches

# PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING (peft 0.21.2)
DEFAULT_TARGETS = {
    "llama": ("k_proj", "v_proj", "down_proj"), "qwen2": ("q_proj", "v_proj", "down_proj"),
    "gemma3_text": ("q_proj", "v_proj", "down_proj"), "bert": ("key", "value", "output.dense"),
    "roberta": ("key", "value", "output.dense"), "gpt2": ("c_attn", "mlp.c_proj"),
}
_UNSET: Any = object()
DEFAULT_FEEDFORWARD = {
    "llama": ("down_proj",), "qwen2": ("down_proj",), "gemma3_text": ("down_proj",), "bert": ("output.dense",),
    "roberta": ("output.dense",), "gpt2": ("mlp.c_proj",),
}


@dataclass(frozen=True)
class IA3Config(AdapterConfig):
    """(IA)^3 options (PEFT defaults).

    feedforward_modules: which targets scale their input instead of their output; same forms as target_modules
        (a list of suffixes or one regex matched in full). None = PEFT's default for the architecture (also when
        target_modules is given). Must be a subset of target_modules when both are lists, as in PEFT.
        List entries match as PEFT matches them: the module path ends with the entry (no '.' boundary), so on
        BERT 'output.dense' also makes 'attention.output.dense' feed-forward.
    init_ia3_weights: True: l = 1 (the adapted model equals the base at step 0); False: random non-zero
        l = 1 + N(0, 0.2^2) (for tests).
    """

    feedforward_modules: tuple[str, ...] | str | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "method", "ia3")
        ff = self.feedforward_modules
        if isinstance(ff, (list, set, frozenset)):
            ff = tuple(sorted(ff)) if isinstance(ff, (set, frozenset)) else tuple(ff)
            object.__setattr__(self, "feedforward_modules", ff)
        if isinstance(ff, str):
            try:
                re.compile(ff)
            except re.error as e:
                raise AdapterError(f"feedforward_modules={ff!r} is not a valid regex: {e}") from None
        if isinstance(ff, tuple) and isinstance(self.target_modules, tuple):
            extra = sorted(set(ff) - set(self.target_modules))
            if extra:
                raise AdapterError(f"feedforward_modules {extra} are not in target_modules={list(self.target_modules)}: "
                                 "feedforward_modules must be a subset of target_modules")
        if not isinstance(self.init_ia3_weights, bool):
            raise AdapterError(f"init_ia3_weights={self.init_ia3_weights!r}: must be True or False")


def is_feedforward(spec: tuple[str, ...] | str, hf_name: str) -> bool:
    """PEFT's `_check_target_module_feedforward`: a regex matches in full, a list entry matches by plain suffix."""
    if isinstance(spec, str):
        return matches(spec, hf_name)
    return any(hf_name.endswith(t) for t in spec)


class IA3(DenseMethod):
    """(IA)^3: one trainable vector ia3_l per module, scaling its output (n_out,) or, for a feed-forward target,
    its input (n_in,)."""

    name = "ia3"
    config_cls = IA3Config

    def default_targets(self, arch: str) -> tuple[str, ...]:
        return DEFAULT_TARGETS[arch]

    def default_feedforward(self, arch: str) -> tuple[str, ...]:
        """PEFT's default feed-forward modules (the targets whose input is scaled) for architecture `arch`."""
        return DEFAULT_FEEDFORWARD[arch]

    def extra_options(self, cfg, hf_name, arch: Any = _UNSET):
        """{'feedforward': bool} for one module. arch: the backbone's architecture, None for a model that is not
        a jaxpeft backbone (then feedforward_modules must be given, as PEFT requires for unknown model types)."""
        if cfg.feedforward_modules is not None:
            return {"feedforward": is_feedforward(cfg.feedforward_modules, hf_name)}
        if arch is None:
            raise AdapterError("IA3Config.feedforward_modules=None: this model is not a jaxpeft backbone, so there is "
                             "no default; set feedforward_modules (a subset of target_modules, possibly empty)")
        if arch is not _UNSET:
            if arch not in DEFAULT_FEEDFORWARD:
                raise AdapterError(f"IA3Config.feedforward_modules=None: no PEFT default for arch {arch!r}; set it")
            return {"feedforward": is_feedforward(DEFAULT_FEEDFORWARD[arch], hf_name)}
        # Called without the architecture: the default feed-forward names of the supported architectures never
        # name another architecture's module (down_proj, mlp.c_proj, output.dense), so the union of the defaults
        # flags exactly the arch's own (checked in the tests).
        return {"feedforward": any(is_feedforward(ff, hf_name) for ff in DEFAULT_FEEDFORWARD.values())}

    def init(self, cfg, options, kernel, bias, rng):
        n = kernel.shape[0] if options.get("feedforward") else kernel.shape[1]
        if cfg.init_ia3_weights:
            ell = jnp.ones((n,), jnp.float32)
        else:
            ell = 1.0 + 0.2 * jax.random.normal(rng, (n,), jnp.float32)
        return {"ia3_l": ell}, {}

    def forward(self, cfg, options, x, base_out, base_fn, kernel, bias, trainable, extras, scale, dropout):
        ell = trainable["ia3_l"]
        if options.get("feedforward"):
            # base_fn(x * l) - base_out = (x * (l - 1)) W0, computed directly: exact zero at l = 1, no cancellation
            dt = base_out.dtype
            xs = (x.astype(jnp.float32) * (ell - 1.0)).astype(dt)
            return jnp.dot(xs, kernel.astype(dt), preferred_element_type=jnp.float32)
        return base_out.astype(jnp.float32) * (ell - 1.0)

    def merge(self, cfg, options, kernel, bias, trainable, extras, scale):
        ell = trainable["ia3_l"].astype(jnp.float32)
        k = kernel.astype(jnp.float32)
        b = None if bias is None else bias.astype(jnp.float32)
        if options.get("feedforward"):
            return ell[:, None] * k, b
        return k * ell[None, :], None if b is None else b * ell


register(IA3())
