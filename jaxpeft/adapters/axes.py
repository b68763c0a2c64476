"""Logical axes of adapter variables, derived from the base weight each one adapts, so adapters shard like
their base (`jaxpeft.parallel.tree_shardings` turns them into NamedShardings).

Imports jax, jaxpeft.models.namemap and the adapter core's types. Rule for a dense target with kernel axes
(in, out): a leaf dim of the kernel's input size in first place takes `in` (LoRA A, SVD U), one of its output
size in last place takes `out` (LoRA B, SVD V^T, (IA)^3 and DoRA vectors); the layer axis stays 'layers';
ranks and everything else ('rank') are replicated. Prefix entries, gates and shared MLPs keep only 'layers'.
"""
from __future__ import annotations

from typing import Any

import jax

from jaxpeft.models.namemap import name_map

Axes = tuple[str | None, ...]


def _kernel_axes(model: Any) -> dict[str, Axes]:
    """{flax module path: logical axes of its kernel / embedding without the layer axis} of a jaxpeft backbone."""
    if model.model_cfg is None:
        return {}
    out = {}
    for e in name_map(model.model_cfg, model.task):
        axes = e.axes[1:] if e.layered else e.axes
        out[e.flax_module] = axes
        out[e.flax_path] = axes
    return out


def _dense_leaf_axes(shape: tuple[int, ...], layered: bool, num_layers: int, n_in: int, n_out: int,
                     kernel: Axes | None) -> Axes:
    lead: Axes = ("layers",) if layered and shape and shape[0] == num_layers else ()
    rest = shape[len(lead):]
    k_in, k_out = (kernel if kernel is not None and len(kernel) == 2 else (None, None))
    axes: list[str | None] = ["rank"] * len(rest)
    if len(rest) == 1:
        axes[0] = k_out if rest[0] == n_out else (k_in if rest[0] == n_in else "rank")
    elif len(rest) >= 2:
        if rest[0] == n_in:
            axes[0] = k_in
        if rest[-1] == n_out:
            axes[-1] = k_out
    return lead + tuple(axes)


def state_axes(model: Any, state: dict[str, Any]) -> dict[str, Any]:
    """A tree shaped like `state` ({'trainable', 'extras'}, arrays or ShapeDtypeStructs) whose leaves are the
    logical-axis tuples of the matching variables (length = the variable's rank)."""
    kernels = _kernel_axes(model)
    out: dict[str, Any] = {}
    for part, by_name in state.items():
        out[part] = {}
        for name, node in by_name.items():
            spec = model.spec(name)
            targets = {t.flax_module: t for t in spec.targets}
            hooks = {h.flax_module: h for h in spec.hooks}

            def leaf_axes(path: tuple[Any, ...], leaf: Any, group: str) -> Axes:
                keys = [str(getattr(p, "key", p)) for p in path]
                shape = tuple(leaf.shape)
                if group == "saved":  # a trained copy of a base module: exactly the base's axes
                    base = kernels.get("/".join(keys))
                    return base if base is not None and len(base) == len(shape) else ("rank",) * len(shape)
                if group == "modules":
                    module = "/".join(keys[:-1])
                    t = targets.get(module)
                    if t is not None:
                        return _dense_leaf_axes(shape, t.layered, t.num_layers, t.n_in, t.n_out, kernels.get(module))
                    h = next((h for m, h in hooks.items() if module == m or module.startswith(m + "/")), None)
                    if h is not None and h.layered and shape and shape[0] == h.num_layers:
                        return ("layers",) + ("rank",) * (len(shape) - 1)
                return ("rank",) * len(shape)

            out[part][name] = {group: jax.tree_util.tree_map_with_path(
                lambda p, x, g=group: leaf_axes(p, x, g), sub) for group, sub in node.items()}
    return out
