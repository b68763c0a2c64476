"""P-tuning v2 (Liu et al. 2022): prefix tuning for NLU on frozen encoders, with prefix dropout and optional
per-layer prefix lengths (the form APT's gate probe produces, 'PT-2*').

Imports jax and the prefix method only. Per-layer lengths are padded to the longest (the layer stack is scanned):
a frozen per-layer 'slot_mask' (L, l_max) hides the padding, and only real slots are counted. The head
(classifier or token head) is trained through `modules_to_save`; the backbone, BERT's pooler included, stays
frozen. There is no PEFT format for this method (PEFT has no per-layer lengths or prefix dropout): runs save the
jaxpeft adapter format.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from jaxpeft.errors import AdapterError
from jaxpeft.adapters.method import register
from jaxpeft.adapters.prefix import PrefixTuning, PrefixTuningConfig


@dataclass(frozen=True)
class PTuningV2Config(PrefixTuningConfig):
    """P-tuning v2: prefix tuning with the NLU recipe's defaults.

    prefix_dropout: 0.1 (the recipe's hidden_dropout_prob on the whole prefix). init_std: 0.02 (the prefix is
    created inside a Hugging Face model, which initialises it N(0, 0.02)). prefix_projection: off by default;
    its hidden width (encoder_hidden_size) defaults to 512 as the recipe's prefix_hidden_size.
    prefix_lengths: one length per layer (0 = no prefix in that layer), padded to the longest with a mask;
    None = num_virtual_tokens in every layer.
    """

    prefix_dropout: float = 0.1
    init_std: float = 0.02
    encoder_hidden_size: int | None = 512
    prefix_lengths: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.prefix_lengths, list):
            object.__setattr__(self, "prefix_lengths", tuple(self.prefix_lengths))
        super().__post_init__()
        object.__setattr__(self, "method", "ptuning_v2")
        check_lengths(self)


def check_lengths(cfg) -> None:
    """ValueError when prefix_lengths is set but empty, has an entry that is not an int >= 0, has no entry > 0,
    or comes with prefix_projection."""
    if cfg.prefix_lengths is not None:
        if not cfg.prefix_lengths or any(not isinstance(n, int) or n < 0 for n in cfg.prefix_lengths) \
                or max(cfg.prefix_lengths) < 1:
            raise AdapterError(f"prefix_lengths={list(cfg.prefix_lengths)}: one length >= 0 per layer, at least one > 0")
        if cfg.prefix_projection:
            raise AdapterError("prefix_lengths with prefix_projection: per-layer lengths apply to plain prefixes only")


class PTuningV2(PrefixTuning):
    """P-tuning v2: prefix tuning with optional per-layer lengths, padded to the longest and hidden by a frozen
    slot_mask (L, l_max); saved in the jaxpeft format (no PEFT format)."""

    name = "ptuning_v2"
    config_cls = PTuningV2Config
    has_peft_format = False

    def num_slots(self, cfg):
        return max(cfg.prefix_lengths) if cfg.prefix_lengths is not None else cfg.num_virtual_tokens

    def layer_lengths(self, cfg, site) -> tuple[int, ...]:
        """The prefix length of every layer of the site (ValueError when prefix_lengths has the wrong count)."""
        n = site.num_layers if site.layered else 1
        if cfg.prefix_lengths is None:
            return (cfg.num_virtual_tokens,) * n
        if len(cfg.prefix_lengths) != n:
            raise AdapterError(f"prefix_lengths has {len(cfg.prefix_lengths)} entries but the model has {n} layers: "
                             "give one length per layer")
        return tuple(cfg.prefix_lengths)

    def layer_extras(self, cfg, site):
        if not site.layered:
            return {}
        lengths = jnp.asarray(self.layer_lengths(cfg, site))
        return {"slot_mask": (jnp.arange(self.num_slots(cfg))[None, :] < lengths[:, None]).astype(jnp.float32)}

    def real_slots(self, cfg, site):
        lengths = self.layer_lengths(cfg, site)
        return sum(lengths[i] for i in site.layers) if site.layered else lengths[0]


register(PTuningV2())
