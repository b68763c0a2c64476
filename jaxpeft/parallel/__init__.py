"""Device meshes, logical-axis shardings and multi-process helpers (jax.sharding / jax.distributed only).

Imports jax alone, so models, loading, adapters and training can all use it.
"""
from jaxpeft.parallel.mesh import (BATCH, DEFAULT_RULES, MESH_AXES, MeshError, batch_sharding, make_mesh,
                                   place_host, replicated, sharding_for, spec_for, tree_shardings)

__all__ = ["BATCH", "DEFAULT_RULES", "MESH_AXES", "MeshError", "batch_sharding", "make_mesh", "place_host",
           "replicated",
           "sharding_for", "spec_for", "tree_shardings"]
