"""The layer stack: one block class run over L layers with `nn.scan` (params stacked on axis 0).

Imports flax only. `scan_layers=False` fully unrolls the same scan, so the param tree is identical.
"""
from __future__ import annotations

import flax.linen as nn
import jax

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def layer_stack(block_cls: type[nn.Module], num_layers: int, *, scan: bool = True, remat: str = "none"):
    """Wrap `block_cls` (signature `(x, ctx, layer_xs, deterministic) -> (x, ys)`) into a module run over `num_layers`.

    `ctx` and the Python bool `deterministic` are broadcast to every layer; `layer_xs` and `ys` have a leading layer axis. Every variable
    collection (params, adapters, ...) is stacked on axis 0 with logical axis name 'layers', and the
    RNG stream (params, dropout, adapter init, ...) is split per layer, so layers draw different values.
    """
    cls = block_cls
    if remat != "none":
        cls = nn.remat(cls, policy=_REMAT_POLICIES[remat], prevent_cse=not scan, static_argnums=(4,))
    return nn.scan(
        cls,
        variable_axes={True: 0},
        split_rngs={True: True},
        in_axes=(nn.broadcast, 0, nn.broadcast),
        length=num_layers,
        unroll=1 if scan else num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
