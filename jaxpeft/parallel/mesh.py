"""Meshes from config (`jax.make_mesh` with Auto axes, as linen's logical rules need) and the mapping from
logical axis names ('embed', 'mlp', 'q_heads', 'layers', 'batch', ...) to `NamedSharding`s.

Imports jax only. A logical name maps to mesh axes through `rules`; a dim whose size the mapped axes do not
divide, or whose mesh axes an earlier dim already uses, stays replicated (correct, just not split).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxpeft.errors import JaxpeftError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = "batch"
"""Logical name of a batch dimension: split over data and fsdp (every device holds distinct rows)."""

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (BATCH, ("data", "fsdp")),
    ("embed", "fsdp"),          # FSDP: every weight's model dimension is split across the fsdp axis
    ("mlp", "tensor"),          # tensor parallelism: heads, MLP width and vocabulary across the tensor axis
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),           # the scanned layer axis stays whole (scan slices it per step)
    ("rank", None),             # adapter ranks are small: replicated
)


class MeshError(JaxpeftError, ValueError):
    """A mesh that cannot be built on these devices; the message names the sizes and the fix."""


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default all, across processes), axis types Auto.

    One size may be -1: it takes the devices the others leave. The product must equal the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be >= 1, with at most one -1 (the rest)")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % fixed:
            raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))}: {len(devices)} devices are not divisible by "
                            f"{fixed}; choose sizes whose product divides the device count")
        sizes[sizes.index(-1)] = len(devices) // fixed
    if math.prod(sizes) != len(devices):
        raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but there are "
                        f"{len(devices)}: make data * fsdp * tensor equal {len(devices)} (or set one of them to -1)")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _as_rules(rules: Sequence[tuple[str, Any]] | Mapping[str, Any] | None) -> dict[str, tuple[str, ...]]:
    items = DEFAULT_RULES if rules is None else (rules.items() if isinstance(rules, Mapping) else rules)
    out: dict[str, tuple[str, ...]] = {}
    for name, axes in items:
        out[name] = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return out


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple[str, Any]] | Mapping[str, Any] | None = None) -> PartitionSpec:
    """The PartitionSpec of an array of `shape` whose dims carry logical names `axes` (None = unnamed).

    Mesh axes of size 1, axes an earlier dim took, and splits that do not divide the dim are dropped.
    """
    table = _as_rules(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for name, size in zip(axes, shape):
        chosen = []
        for ax in table.get(name, ()) if name is not None else ():
            if ax in used or ax not in mesh.shape or mesh.shape[ax] == 1:
                continue
            if size % (math.prod(mesh.shape[a] for a in chosen) * mesh.shape[ax]) == 0:
                chosen.append(ax)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def sharding_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                 rules: Sequence[tuple[str, Any]] | Mapping[str, Any] | None = None) -> NamedSharding:
    """NamedSharding of `spec_for(axes, shape, mesh, rules)`."""
    return NamedSharding(mesh, spec_for(axes, shape, mesh, rules))


def tree_shardings(axes_tree: Any, abstract_tree: Any, mesh: Mesh,
                   rules: Sequence[tuple[str, Any]] | Mapping[str, Any] | None = None) -> Any:
    """A NamedSharding per leaf of `abstract_tree` (arrays or ShapeDtypeStructs) from the same-structured tree
    of logical-axis tuples `axes_tree`."""
    flat_axes = jax.tree.leaves(axes_tree, is_leaf=lambda x: isinstance(x, tuple))
    leaves, treedef = jax.tree.flatten(abstract_tree)
    if len(flat_axes) != len(leaves):
        raise ValueError(f"tree_shardings: {len(flat_axes)} axis tuples for {len(leaves)} leaves")
    return jax.tree.unflatten(treedef, [sharding_for(a, x.shape, mesh, rules) for a, x in zip(flat_axes, leaves)])


def place_host(host: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host value (numpy, or anything np.asarray takes) -> a global array with `sharding`: every process passes
    the same global value and fills only its own devices, never through one device first."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] | Mapping[str, Any] | None = None) -> NamedSharding:
    """Rows (dim 0) split over the batch axes (data, fsdp); every other dim whole. A prefix for any batch dict."""
    axes = tuple(a for a in _as_rules(rules).get(BATCH, ()) if mesh.shape.get(a, 1) > 1)
    return NamedSharding(mesh, PartitionSpec(axes if len(axes) > 1 else (axes[0] if axes else None)))
