"""Frozen/trainable partitions, optimizers that hold state for trainable leaves only, parameter counts.

Imports jax/optax and sibling adapter modules only. The recommended path differentiates only the trainable
tree (so frozen leaves never reach the optimizer); `partitioned_optimizer` serves trees that mix both
(full fine-tuning, users' own trees): frozen leaves get `optax.set_to_zero()` updates and no state.
`optax.masked` alone is not enough: it passes raw gradients through for masked-out leaves.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft.adapters.core import AdaptedModel, AdapterState


def split_state(state: AdapterState) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainable, extras): the tree to differentiate and optimise, and the adapters' frozen extras."""
    return state["trainable"], state["extras"]


def join_state(trainable: Mapping[str, Any], extras: Mapping[str, Any]) -> AdapterState:
    """Inverse of split_state."""
    return {"trainable": dict(trainable), "extras": dict(extras)}


def partitioned_optimizer(tx: optax.GradientTransformation, is_trainable: Any | Callable[[Any], Any]
                          ) -> optax.GradientTransformation:
    """`tx` on trainable leaves, zero updates and no optimizer state on frozen ones (for mixed trees).

    is_trainable: a pytree of bools matching the params, or a function params -> such a tree.
    """
    def labels(params):
        mask = is_trainable(params) if callable(is_trainable) else is_trainable
        return jax.tree.map(lambda t: "train" if t else "freeze", mask)

    return optax.partition({"train": tx, "freeze": optax.set_to_zero()}, labels)


def count_parameters(model: AdaptedModel, state: AdapterState, frozen: Mapping[str, Any],
                     name: str | None = None) -> tuple[int, int]:
    """(trainable, all) parameter counts as PEFT's `get_nb_trainable_parameters` reports them.

    Layers excluded by `layers_to_transform` hold stacked placeholder weights, and per-layer prefix lengths pad
    shorter layers: neither is counted (each method counts its real parameters). Shared (not per-layer)
    variables count once.
    `all` = base parameters + trainable parameters, as PEFT counts them (a modules_to_save copy adds to the
    original module); for full fine-tuning `all` is the base size.
    """
    from jaxpeft.adapters.method import method_for

    names = [name] if name else list(state["trainable"])
    trainable = 0
    for n in names:
        spec = model.spec(n)
        group = state["trainable"][n]
        method = method_for(spec.config)
        for t in spec.sites:
            node = group["modules"]
            for p in t.flax_module.split("/"):
                node = node.get(p, {}) if isinstance(node, Mapping) else {}
            trainable += method.count(spec.config, t, dict(node))
        trainable += sum(int(np.prod(x.shape)) for x in jax.tree.leaves(group.get("shared", {})))
        trainable += sum(int(np.prod(x.shape)) for x in jax.tree.leaves(group["saved"]))
    base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))
    full = sum(int(np.prod(x.shape)) for n in names if model.spec(n).config.method == "full"
               for x in jax.tree.leaves(state["trainable"][n]["saved"]))
    return trainable, base + trainable - full


def trainable_parameters_line(model: AdaptedModel, state: AdapterState, frozen: Mapping[str, Any],
                              name: str | None = None) -> str:
    """PEFT's `print_trainable_parameters` line."""
    t, a = count_parameters(model, state, frozen, name)
    return f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}"


def tree_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of a pytree (optimizer state accounting)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def cast_tree(tree: Any, dtype: Any) -> Any:
    """Cast floating leaves (e.g. frozen weights to bfloat16 storage); integer leaves stay."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
