"""Where a run's arrays live: the mesh from the config, the shardings of the frozen base, the adapter state,
the optimizer state and the batches, and the moves between host and devices (also across processes).

Imports jax, jaxpeft.parallel and jaxpeft.adapters.axes. Nothing here changes a value: on one device
every sharding is that device, and the numbers equal an unsharded run's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxpeft.adapters.axes import state_axes
from jaxpeft.parallel import batch_sharding, place_host, replicated, tree_shardings


def _fits(sharding: NamedSharding, shape: tuple[int, ...]) -> bool:
    """Every split dim of `shape` divides by its mesh axes (a param's sharding applies to this shape)."""
    for dim, axes in zip(shape, sharding.spec):
        names = () if axes is None else ((axes,) if isinstance(axes, str) else axes)
        if dim % int(np.prod([sharding.mesh.shape[a] for a in names] or [1])):
            return False
    return True


@dataclass(frozen=True)
class Placement:
    """A run's mesh and logical-axis rules (None = jaxpeft.parallel.DEFAULT_RULES)."""

    mesh: Mesh
    rules: tuple[tuple[str, Any], ...] | None = None

    @property
    def replicated(self) -> NamedSharding:
        """A whole copy on every device of the mesh."""
        return replicated(self.mesh)

    @property
    def batch(self) -> NamedSharding:
        """Rows split over (data, fsdp): a sharding prefix for a whole batch dict."""
        return batch_sharding(self.mesh, self.rules)

    @property
    def batch_divisor(self) -> int:
        """Global batch sizes must be multiples of this (the devices the rows are split over)."""
        spec = self.batch.spec[0] if self.batch.spec else None
        axes = () if spec is None else ((spec,) if isinstance(spec, str) else spec)
        return int(np.prod([self.mesh.shape[a] for a in axes])) if axes else 1

    def like(self, tree: Any) -> Any:
        """The shardings `tree`'s leaves already have (jax arrays) or replicated (host values)."""
        return jax.tree.map(lambda x: getattr(x, "sharding", None) or self.replicated, tree)

    def state_shardings(self, model: Any, abstract_state: Any) -> Any:
        """Shardings of an AdapterState (arrays or ShapeDtypeStructs): each variable like its base weight."""
        return tree_shardings(state_axes(model, abstract_state), abstract_state, self.mesh, self.rules)

    def opt_shardings(self, abstract_opt: Any, trainable_shardings: Any) -> Any:
        """The optimizer state shards like the params it tracks (Adam's moments, also inside optax.partition):
        a state leaf whose tree path ends with a param's path and has its shape takes that param's sharding;
        counters, factored (Adafactor) statistics and the rest are replicated."""
        params = {jax.tree_util.keystr(p): s for p, s in
                  jax.tree_util.tree_flatten_with_path(trainable_shardings,
                                                       is_leaf=lambda x: isinstance(x, NamedSharding))[0]}

        def one(path, leaf):
            key = jax.tree_util.keystr(path)
            for p, s in params.items():
                if key.endswith(p) and len(s.spec) <= leaf.ndim and _fits(s, leaf.shape):
                    return s
            return self.replicated
        return jax.tree_util.tree_map_with_path(one, abstract_opt)

    def put(self, tree: Any, shardings: Any) -> Any:
        """Host or device values -> global arrays with `shardings` (a tree or one sharding as a prefix); every
        process passes the same global values and fills only its own devices."""
        def one(x, s):
            host = np.asarray(x) if not isinstance(x, jax.Array) or x.is_fully_addressable else None
            if host is None:  # already global: let XLA move it
                return jax.jit(lambda a: a, out_shardings=s)(x)
            return place_host(host, s)
        if isinstance(shardings, NamedSharding):
            return jax.tree.map(lambda x: one(x, shardings), tree)
        return jax.tree.map(one, tree, shardings)

    def global_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A host batch planned identically on every process (same bucket, same rows) -> global arrays, rows
        split over the batch axes; each process takes the rows of its own devices."""
        rows = next(iter(batch.values())).shape[0]
        if rows % self.batch_divisor:
            raise ValueError(f"a batch of {rows} rows cannot be split over {self.batch_divisor} data-parallel "
                             f"devices: make the batch size a multiple of {self.batch_divisor}")
        return self.put(batch, self.batch)

    def to_host(self, tree: Any) -> Any:
        """Global arrays -> numpy on every process (gathered through a replicated copy: small trees only)."""
        rep = jax.jit(lambda t: t, out_shardings=self.replicated)(tree)
        return jax.tree.map(np.asarray, rep)
