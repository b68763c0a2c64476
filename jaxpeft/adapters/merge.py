"""Merge an adapter into the base weights for inference, and unmerge back to the exact original leaves.

Imports jax and sibling adapter modules only. Merge computes in float32, casts to each leaf's storage
dtype, and replaces only the adapted leaves (every other leaf is shared by reference). Unmerge returns the
kept originals, so the base comes back bit-exactly (subtracting the delta again would not be exact).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.errors import AdapterError
from jaxpeft.adapters.core import AdaptedModel, AdapterState
from jaxpeft.adapters.method import get_path, method_for

Originals = dict[str, Any]
"""{'/'-joined flax param path: the original leaf} for every leaf merge replaced."""


def merge(model: AdaptedModel, frozen: Mapping[str, Any], state: AdapterState, name: str
          ) -> tuple[dict[str, Any], Originals]:
    """(merged params, originals): `model.module.apply({'params': merged}, ...)` without adapters
    reproduces `model.apply(frozen, state, ..., active=name)` (dropout off)."""
    spec = model.spec(name)
    method = method_for(spec.config)
    if spec.wrapper is not None:
        raise AdapterError(f"adapter {name!r} ({spec.wrapper.method}) cannot be merged: its gate mixes the base and the "
                         "adapted model's hidden states per token, which no single set of weights reproduces")
    if method.kind != "dense":
        raise AdapterError(f"adapter {name!r} ({spec.config.method}) cannot be merged: a {method.kind} method adds "
                         "key/value entries to attention, not a change of any weight; run it unmerged (its cost is "
                         "l extra keys per layer), or use a dense method such as LoRA when you need merged weights")
    dense = state["trainable"][name]["modules"]
    extras = state["extras"][name]["modules"]
    merged = _shallow_copy(frozen)
    originals: Originals = {}
    for t in spec.targets:
        module = get_path(merged, t.flax_module)
        kernel = module["kernel"]
        bias = module.get("bias")
        tr, ex = get_path(dense, t.flax_module), get_path(extras, t.flax_module)
        options = t.options

        def one(k, b, tr, ex):
            k2, b2 = method.merge(spec.config, options, k, b, tr, {n: v for n, v in ex.items()}, ex["scale"])
            keep = ex["layer_mask"] == 0
            k2 = jnp.where(keep, k.astype(jnp.float32), k2)
            b2 = None if b2 is None else jnp.where(keep, b.astype(jnp.float32), b2)
            return k2, b2

        fn = jax.vmap(one) if t.layered else one
        new_k, new_b = jax.jit(fn)(kernel, bias, tr, ex)
        originals[t.flax_module + "/kernel"] = kernel
        module["kernel"] = new_k.astype(kernel.dtype)
        if bias is not None and new_b is not None:
            originals[t.flax_module + "/bias"] = bias
            module["bias"] = new_b.astype(bias.dtype)
    for mod, value in state["trainable"][name]["saved"].items():
        originals[mod] = merged[mod]
        merged[mod] = value
    return merged, originals


def unmerge(merged: Mapping[str, Any], originals: Originals) -> dict[str, Any]:
    """The params before `merge`, bit-exact: the kept original leaves put back."""
    out = _shallow_copy(merged)
    for path, leaf in originals.items():
        *parents, last = path.split("/")
        node = out
        for p in parents:
            node = node[p]
        node[last] = leaf
    return out


def _shallow_copy(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Copy the dict structure; array leaves are shared, not copied."""
    return {k: _shallow_copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}

