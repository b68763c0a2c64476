"""`DenseMethod`: what a dense-layer adapter method provides (init, forward, merge), and the method registry.

Imports jax and jaxpeft.adapters.config only. A new method is one module defining a DenseMethod subclass
plus one `register` call.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import jax

from jaxpeft.adapters.config import AdapterConfig

Vars = dict[str, jax.Array]


class DenseMethod:
    """An adapter on dense layers `y = x @ W0 + b` (W0: (n_in, n_out)).

    Subclasses set `name` and `config_cls` and implement `init`, `forward` and `merge`. The core calls
    them per adapted module and per layer (under scan each call sees one layer's slice). The core keeps
    a per-layer `layer_mask` and the per-layer `scale` for them in the adapter's frozen extras.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[AdapterConfig]]

    def default_targets(self, arch: str) -> tuple[str, ...]:
        raise NotImplementedError

    def scale(self, cfg: AdapterConfig, options: dict[str, Any]) -> float:
        """The adapter output scale for one module/layer (1.0 when the method has none)."""
        return 1.0

    def extra_options(self, cfg: AdapterConfig, hf_name: str, arch: str | None = None) -> dict[str, Any]:
        """Per-module options beyond rank/alpha patterns (e.g. (IA)^3's feed-forward flag); arch is None for
        models that are not jaxpeft backbones."""
        return {}

    def init(self, cfg: AdapterConfig, options: dict[str, Any], kernel: jax.Array, bias: jax.Array | None,
             rng: jax.Array) -> tuple[Vars, Vars]:
        """(trainable, frozen_extras) for one layer of one module; kernel (n_in, n_out) is the frozen W0."""
        raise NotImplementedError

    def forward(self, cfg: AdapterConfig, options: dict[str, Any], x: jax.Array, base_out: jax.Array,
                base_fn: Callable[[jax.Array], jax.Array], kernel: jax.Array, bias: jax.Array | None,
                trainable: Vars, extras: Vars, scale: jax.Array, dropout: Callable[[jax.Array], jax.Array]
                ) -> jax.Array:
        """The change to the output, delta = y - base_out (same shape as base_out = base_fn(x)); x (..., n_in).

        The core adds mask * delta, so a masked layer or row gets base_out + 0 * delta: the base output up to
        XLA's fusion choices (~1e-6 in f32); only `active=None` runs the untouched base graph, bit-exact."""
        raise NotImplementedError

    def merge(self, cfg: AdapterConfig, options: dict[str, Any], kernel: jax.Array, bias: jax.Array | None,
              trainable: Vars, extras: Vars, scale: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """(kernel', bias') in float32 such that x @ kernel' + bias' equals forward without dropout."""
        raise NotImplementedError


METHODS: dict[str, DenseMethod] = {}


def register(method: DenseMethod) -> DenseMethod:
    """Add a method to the registry under `method.name`."""
    METHODS[method.name] = method
    return method


def method_for(cfg: AdapterConfig) -> DenseMethod:
    if cfg.method not in METHODS:
        raise ValueError(f"unknown adapter method {cfg.method!r}; registered: {sorted(METHODS)}")
    return METHODS[cfg.method]
