"""The name map, one per architecture, kept as data: flax param path <-> HF key <-> layer index <-> layout rule
<-> logical axes. The loader, adapter targeting, PEFT export/import and sharding all read it.

Imports jax/flax and sibling model modules only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft.models.config import ModelConfig
from jaxpeft.models.registry import build_model


@dataclass(frozen=True)
class ArchNames:
    """How one architecture's flax module paths spell in Hugging Face.

    base_prefix: prefix of backbone keys inside HF task models ('model.', 'transformer.', 'bert.', ...);
        bare backbone files (e.g. a `BertModel` save) omit it.
    stack: (flax path of the scanned layer stack, HF module path with '{i}' for the layer index).
    heads: flax top-level modules that live outside the backbone in HF task models.
    conv1d: kernels already stored (n_in, n_out) in HF (GPT-2 Conv1D); every other kernel is transposed.
    aliases: HF renames of flax leaf paths that do not follow the mechanical rule.
    """

    base_prefix: str
    stack: tuple[str, str]
    heads: tuple[str, ...]
    conv1d: tuple[str, ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()


ARCH_NAMES: dict[str, ArchNames] = {
    "llama": ArchNames("model.", ("layers", "layers.{i}"), ("lm_head", "score")),
    "qwen2": ArchNames("model.", ("layers", "layers.{i}"), ("lm_head", "score")),
    "gemma3_text": ArchNames("model.", ("layers", "layers.{i}"), ("lm_head", "score")),
    "gpt2": ArchNames("transformer.", ("h", "h.{i}"), ("lm_head", "score", "classifier"),
                      conv1d=("h/attn/c_attn", "h/attn/c_proj", "h/mlp/c_fc", "h/mlp/c_proj")),
    "bert": ArchNames("bert.", ("encoder/layer", "encoder.layer.{i}"), ("classifier",)),
    "roberta": ArchNames("roberta.", ("encoder/layer", "encoder.layer.{i}"), ("classifier",)),
}

# HF files that carry buffers, not parameters: never an error, never loaded.
IGNORED_HF_KEYS = re.compile(r"(^|\.)(position_ids|rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")

_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


@dataclass(frozen=True)
class ParamEntry:
    """One parameter leaf.

    flax_path: '/'-joined path in the params tree, e.g. 'layers/self_attn/q_proj/kernel'.
    hf_key: HF state-dict key inside the task model, '{i}' standing for the layer index when `layered`.
    layered: stacked on a leading layer axis (one HF tensor per layer).
    transpose: HF stores the transpose (PyTorch Linear (out, in)); False for embeddings, norms, Conv1D.
    shape: flax shape, layer axis included. axes: logical axis names, 'layers' first when layered.
    """

    flax_path: str
    hf_key: str
    layered: bool
    transpose: bool
    shape: tuple[int, ...]
    axes: tuple[str, ...]

    @property
    def flax_module(self) -> str:
        """The leaf's module path: flax_path without its last component."""
        return self.flax_path.rsplit("/", 1)[0]

    @property
    def hf_module(self) -> str:
        """The HF module key (template): hf_key without its last component ('weight', 'bias', ...)."""
        return self.hf_key.rsplit(".", 1)[0]

    def hf_keys(self, num_layers: int) -> list[str]:
        """The concrete HF keys, one per layer when layered."""
        return [self.hf_key.format(i=i) for i in range(num_layers)] if self.layered else [self.hf_key]


def hf_key_for(arch: str, flax_path: str) -> tuple[str, bool, bool]:
    """(HF key template, layered, transpose) for one flax param path of `arch`."""
    names = ARCH_NAMES[arch]
    module, leaf = flax_path.rsplit("/", 1)
    for src, dst in names.aliases:
        if flax_path == src:
            return dst, dst.find("{i}") >= 0, leaf == "kernel" and module not in names.conv1d
    hf_leaf = _LEAF_TO_HF[leaf]
    transpose = leaf == "kernel" and module not in names.conv1d
    stack_flax, stack_hf = names.stack
    if module == stack_flax or module.startswith(stack_flax + "/"):
        rest = module[len(stack_flax):].lstrip("/").replace("/", ".")
        return names.base_prefix + ".".join(p for p in (stack_hf, rest, hf_leaf) if p), True, transpose
    top = module.split("/", 1)[0]
    prefix = "" if top in names.heads else names.base_prefix
    return prefix + module.replace("/", ".") + "." + hf_leaf, False, transpose


@lru_cache(maxsize=64)
def name_map(cfg: ModelConfig, task: str = "causal_lm") -> tuple[ParamEntry, ...]:
    """Every parameter of `build_model(cfg, task)` with its HF key, layout rule and logical axes.

    Derived from the module's own abstract init (`jax.eval_shape`, no weights allocated) and ARCH_NAMES.
    """
    module = build_model(cfg, task)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    entries = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
        flax_path = "/".join(p.key for p in path)
        axes = tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else (None,) * leaf.ndim
        value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
        hf_key, layered, transpose = hf_key_for(cfg.arch, flax_path)
        entries.append(ParamEntry(flax_path, hf_key, layered, transpose, tuple(value.shape), axes))
    return tuple(entries)


def module_names(cfg: ModelConfig, task: str = "causal_lm") -> dict[str, str]:
    """Dense-module map for adapter targeting: flax module path -> HF module path ('{i}' for the layer)."""
    return {e.flax_module: e.hf_module for e in name_map(cfg, task) if e.flax_path.endswith("/kernel")}
