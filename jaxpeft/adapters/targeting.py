"""Resolve an adapter config's targets to concrete modules, matched on canonical per-layer module paths.

Imports jax and jaxpeft.models (the name map) only. For jaxpeft backbones the canonical path is the Hugging
Face module path (`model.layers.3.self_attn.q_proj`); for any other linen model it is the flax module path
with '.' separators, a layer index inserted after the first component for kernels stacked by `nn.scan`
(`blocks.3.mlp.fc1`). The same plan serves scanned and unrolled models: per-layer choices become per-layer
values (a layer mask, per-layer scales) carried with the adapter.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from jaxpeft.errors import AdapterError
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
        """The concrete module path at `layer` (the template's '{i}' filled in; the path itself when not layered)."""
        return self.hf_module.format(i=layer) if self.layered else self.hf_module

    @property
    def options(self) -> dict[str, Any]:
        """Options shared by every selected layer (the first layer's; use layer_options for per-layer values)."""
        return dict(self.layer_options[0])


@dataclass(frozen=True)
class DenseModule:
    """A targetable dense layer: flax module path, canonical name template ('{i}' = layer), kernel shape."""

    flax_module: str
    hf_module: str
    layered: bool
    num_layers: int
    n_in: int
    n_out: int


def dense_modules(cfg: ModelConfig, task: str) -> tuple[DenseModule, ...]:
    """Every targetable dense module of a jaxpeft backbone, from its name map (HF module names).

    Names are paths inside the HF model PEFT wraps: task models carry the backbone prefix
    ('bert.encoder.layer.{i}...'), bare backbones (task 'base', e.g. `BertModel`) do not ('encoder.layer.{i}...').
    """
    from jaxpeft.models.namemap import ARCH_NAMES

    prefix = ARCH_NAMES[cfg.arch].base_prefix
    out = []
    for e in name_map(cfg, task):
        if e.flax_path.endswith("/kernel"):
            name = e.hf_module[len(prefix):] if task == "base" and e.hf_module.startswith(prefix) else e.hf_module
            out.append(DenseModule(e.flax_module, name, e.layered, e.shape[0] if e.layered else 1,
                                   e.shape[-2], e.shape[-1]))
    return tuple(out)


def generic_dense_modules(abstract_params: Any) -> tuple[DenseModule, ...]:
    """Every 'kernel' leaf of any linen model's params (2-D: a plain layer; 3-D: stacked by nn.scan)."""
    import flax.linen as nn
    import jax

    out = []
    leaves = jax.tree_util.tree_flatten_with_path(abstract_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    for path, leaf in leaves:
        keys = [str(getattr(p, "key", p)) for p in path]
        shape = (leaf.value if isinstance(leaf, nn.Partitioned) else leaf).shape
        if keys[-1] != "kernel" or len(shape) not in (2, 3):
            continue
        mod = keys[:-1]
        layered = len(shape) == 3
        name = ".".join(mod[:1] + ["{i}"] + mod[1:]) if layered else ".".join(mod)
        out.append(DenseModule("/".join(mod), name, layered, shape[0] if layered else 1, shape[-2], shape[-1]))
    if not out:
        raise AdapterError("this model has no dense layer to adapt (no 2-D or scan-stacked 3-D 'kernel' param)")
    return tuple(out)


def matches(spec: str | tuple[str, ...] | None, name: str) -> bool:
    """PEFT semantics: a string is a regex matched in full; a list matches a name equal to an entry or
    ending with '.' + entry."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def concrete_names(m: DenseModule) -> list[tuple[int | None, str]]:
    """(layer index, concrete canonical name) for every layer of `m`; [(None, name)] when it is not layered."""
    if m.layered:
        return [(i, m.hf_module.format(i=i)) for i in range(m.num_layers)]
    return [(None, m.hf_module)]


def resolve_targets(mods: tuple[DenseModule, ...], targets: str | tuple[str, ...], *,
                    exclude: str | tuple[str, ...] | None = None, layers: tuple[int, ...] | None = None,
                    options=lambda hf_name: {}, strict: bool = True) -> tuple[ModuleTarget, ...]:
    """The modules `targets` selects, each with its selected layers and per-layer options.

    mods: the model's dense modules (`dense_modules` or `generic_dense_modules`). options(name) -> dict gives
    per-module overrides. strict: every list entry (or the regex) must match at least one module, else
    ValueError naming the entry and close candidates; not strict (PEFT file import): only the whole selection
    must be non-empty.
    """
    all_names = [n for m in mods for _, n in concrete_names(m)]
    num_layers = max((m.num_layers for m in mods if m.layered), default=0)
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise AdapterError(f"layers_to_transform={list(layers)}: layer indices {bad} out of range "
                             f"(the model has {num_layers} layers, 0..{max(num_layers - 1, 0)})")
    if strict:
        entries = [targets] if isinstance(targets, str) else list(targets)
        for entry in entries:
            spec = entry if isinstance(targets, str) else (entry,)
            if not any(matches(spec, n) for n in all_names):
                raise AdapterError(_no_match_message(entry, all_names, regex=isinstance(targets, str)))
    out = []
    for m in mods:
        chosen, opts = [], []
        for i, name in concrete_names(m):
            if not matches(targets, name) or matches(exclude, name):
                continue
            if layers is not None and (i is None or i not in layers):
                continue
            chosen.append(i)
            opts.append(tuple(sorted(options(name).items())))
        if chosen:
            out.append(ModuleTarget(m.flax_module, m.hf_module, m.layered, m.num_layers,
                                    tuple(i for i in chosen if i is not None), m.n_in, m.n_out, tuple(opts)))
    if not out:
        raise AdapterError(f"target_modules={targets!r} (exclude_modules={exclude!r}, layers_to_transform={layers}) "
                         f"selects no module of this model; module names look like {_examples(all_names)}")
    return tuple(out)


def partial_layer_targets(sites: tuple[Any, ...]) -> list[str]:
    """'<module template>: layers [...] of N' for each targeted layered module adapted in only some layers (a
    regex or exclude list that matched a module in only some layers); ModuleTargets only, other sites skipped."""
    return [f"{t.hf_module.replace('{i}', '*')}: layers {list(t.layers)} of {t.num_layers}" for t in sites
            if isinstance(t, ModuleTarget) and t.layered and len(t.layers) < t.num_layers]


def _examples(names: list[str]) -> str:
    layer0 = [n for n in names if ".1." not in n and not re.search(r"\.[1-9]\d*\.", n)]
    return ", ".join(layer0[:12])


def _no_match_message(entry: str, names: list[str], regex: bool = False) -> str:
    if regex:
        return (f"target_modules={entry!r} is one regex string, matched against whole module paths, and matches "
                f"none (paths look like {_examples(names)}); for suffix matching write a list instead, e.g. "
                f"target_modules: [{entry}]")
    suffixes = sorted({".".join(n.split(".")[-k:]) for n in names for k in (1, 2)
                       if len(n.split(".")) >= k and not n.split(".")[-k].isdigit()})
    close = difflib.get_close_matches(entry, suffixes, n=5, cutoff=0.5)
    hint = f"close candidates: {', '.join(close)}" if close else f"module names look like {_examples(names)}"
    return (f"target_modules entry {entry!r} matches no module of this model; {hint}. "
            "Entries are suffixes of module paths (e.g. 'q_proj', 'attention.self.query') or one regex "
            "string matched against the whole path")


@dataclass(frozen=True)
class HookSite:
    """One attention layer's `PrefixHook` (the interception point of prefix methods).

    flax_module: path of the hook module ('layers/self_attn/prefix'); layered: stacked by scan; layers: the
    selected layer indices; num_kv_heads, head_dim: the entry shape it returns; hidden: the last dim of the
    tensor it receives.
    """

    flax_module: str
    layered: bool
    num_layers: int
    layers: tuple[int, ...]
    num_kv_heads: int
    head_dim: int
    hidden: int

    @property
    def hf_module(self) -> str:
        """The hook's module path with '.' separators ('layers.self_attn.prefix')."""
        return self.flax_module.replace("/", ".")


def find_hook_sites(module: Any, init_inputs: tuple[tuple[tuple[int, ...], str], ...],
                    dense: tuple[DenseModule, ...]) -> tuple[HookSite, ...]:
    """Every `PrefixHook` the model calls, found by tracing its init abstractly (no FLOPs, no weights).

    A site is layered when it shares its first path component with a scan-stacked dense module.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxpeft.models.attention import PrefixHook

    found: dict[str, tuple[int, int, int]] = {}

    def record(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, PrefixHook) and context.method_name == "__call__":
            found["/".join(m.path)] = (m.num_kv_heads, m.head_dim, args[0].shape[-1])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(module.init, jax.random.key(0), *[jax.ShapeDtypeStruct(s, jnp.dtype(d)) for s, d in init_inputs])
    out = []
    for path, (hkv, dh, hidden) in sorted(found.items()):
        top = path.split("/")[0]
        stacked = [m for m in dense if m.layered and m.flax_module.split("/")[0] == top]
        n = stacked[0].num_layers if stacked else 1
        out.append(HookSite(path, bool(stacked), n, tuple(range(n)) if stacked else (), hkv, dh, hidden))
    return tuple(out)


def select_hook_sites(sites: tuple[HookSite, ...], layers: tuple[int, ...] | None) -> tuple[HookSite, ...]:
    """The sites with `layers_to_transform` applied (ValueError when the model has no hook or the layers are out
    of range)."""
    import dataclasses

    if not sites:
        raise AdapterError("this model has no prefix hook: prefix methods (prefix tuning, P-tuning v2, APT) need "
                         "attention layers that call jaxpeft.models.attention.PrefixHook (every jaxpeft backbone "
                         "does); use a dense-layer method such as LoRA for this model")
    out = []
    for s in sites:
        if layers is None:
            out.append(s)
            continue
        n = s.num_layers if s.layered else 1
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise AdapterError(f"layers_to_transform={list(layers)}: layer indices {bad} out of range (the model has "
                             f"{n} layers, 0..{n - 1})")
        out.append(dataclasses.replace(s, layers=tuple(sorted(set(layers)))))
    return tuple(out)
