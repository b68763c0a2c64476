"""Resolve an adapter config's targets to concrete modules, matched on canonical per-layer HF module paths.

Imports jaxpeft.models (the name map) only. The same plan serves scanned and unrolled backbones: per-layer
choices become per-layer values (a layer mask, per-layer scales) carried with the adapter.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from jaxpeft.models.config import ModelConfig
from jaxpeft.models.namemap import name_map


@dataclass(frozen=True)
class ModuleTarget:
    """One adapted dense module.

    flax_module: path in the params tree ('layers/self_attn/q_proj'); hf_module: HF path template
    ('model.layers.{i}.self_attn.q_proj'); layered: stacked on the layer axis; layers: selected layer
    indices (empty when not layered); n_in, n_out: kernel shape; layer_options: per selected layer,
    the config overrides for it (rank_pattern, alpha_pattern, feed-forward flag), as sorted item tuples.
    """

    flax_module: str
    hf_module: str
    layered: bool
    num_layers: int
    layers: tuple[int, ...]
    n_in: int
    n_out: int
    layer_options: tuple[tuple[tuple[str, Any], ...], ...]

    def hf_name(self, layer: int | None) -> str:
        return self.hf_module.format(i=layer) if self.layered else self.hf_module

    @property
    def options(self) -> dict[str, Any]:
        """Options shared by every selected layer (the first layer's; use layer_options for per-layer values)."""
        return dict(self.layer_options[0])


@dataclass(frozen=True)
class DenseModule:
    flax_module: str
    hf_module: str
    layered: bool
    n_in: int
    n_out: int


def dense_modules(cfg: ModelConfig, task: str) -> list[DenseModule]:
    """Every targetable dense module of the model, from the name map."""
    out = []
    for e in name_map(cfg, task):
        if e.flax_path.endswith("/kernel"):
            out.append(DenseModule(e.flax_module, e.hf_module, e.layered, e.shape[-2], e.shape[-1]))
    return out


def matches(spec: str | tuple[str, ...] | None, name: str) -> bool:
    """PEFT semantics: a string is a regex matched in full; a list matches a name equal to an entry or
    ending with '.' + entry."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def concrete_names(m: DenseModule, num_layers: int) -> list[tuple[int | None, str]]:
    if m.layered:
        return [(i, m.hf_module.format(i=i)) for i in range(num_layers)]
    return [(None, m.hf_module)]


def resolve_targets(cfg: ModelConfig, task: str, targets: str | tuple[str, ...], *,
                    exclude: str | tuple[str, ...] | None = None, layers: tuple[int, ...] | None = None,
                    options=lambda hf_name: {}, strict: bool = True) -> tuple[ModuleTarget, ...]:
    """The modules `targets` selects, each with its selected layers and per-layer options.

    options(hf_name) -> dict gives per-module overrides. strict: every list entry (or the regex) must match
    at least one module, else ValueError naming the entry and close candidates; not strict (PEFT file
    import): only the whole selection must be non-empty.
    """
    mods = dense_modules(cfg, task)
    all_names = [n for m in mods for _, n in concrete_names(m, cfg.num_layers)]
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < cfg.num_layers]
        if bad:
            raise ValueError(f"layers_to_transform={list(layers)}: layer indices {bad} out of range "
                             f"(the model has {cfg.num_layers} layers, 0..{cfg.num_layers - 1})")
    if strict:
        entries = [targets] if isinstance(targets, str) else list(targets)
        for entry in entries:
            spec = entry if isinstance(targets, str) else (entry,)
            if not any(matches(spec, n) for n in all_names):
                raise ValueError(_no_match_message(entry, all_names, cfg))
    out = []
    for m in mods:
        chosen, opts = [], []
        for i, name in concrete_names(m, cfg.num_layers):
            if not matches(targets, name) or matches(exclude, name):
                continue
            if layers is not None and (i is None or i not in layers):
                continue
            chosen.append(i)
            opts.append(tuple(sorted(options(name).items())))
        if chosen:
            out.append(ModuleTarget(m.flax_module, m.hf_module, m.layered, cfg.num_layers if m.layered else 1,
                                    tuple(i for i in chosen if i is not None), m.n_in, m.n_out, tuple(opts)))
    if not out:
        raise ValueError(f"target_modules={targets!r} (exclude_modules={exclude!r}, layers_to_transform={layers}) "
                         f"selects no module of this {cfg.arch} model; module names look like "
                         f"{_examples(all_names)}")
    return tuple(out)


def _examples(names: list[str]) -> str:
    layer0 = [n for n in names if ".1." not in n and not re.search(r"\.[1-9]\d*\.", n)]
    return ", ".join(layer0[:12])


def _no_match_message(entry: str, names: list[str], cfg: ModelConfig) -> str:
    suffixes = sorted({".".join(n.split(".")[-k:]) for n in names for k in (1, 2)})
    close = difflib.get_close_matches(entry, suffixes, n=5, cutoff=0.5)
    hint = f"close candidates: {', '.join(close)}" if close else f"module names look like {_examples(names)}"
    return (f"target_modules entry {entry!r} matches no module of this {cfg.arch} model; {hint}. "
            "Entries are suffixes of Hugging Face module paths (e.g. 'q_proj', 'attention.self.query') or one "
            "regex string matched against the whole path")
