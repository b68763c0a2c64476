"""Method kinds and the registry: `Method` (what every method may provide), `DenseMethod` (intercepts dense
layers: LoRA family, SVD family) and `PrefixMethod` (intercepts attention `PrefixHook`s: prefix tuning,
P-tuning v2, APT).

Imports jax, jaxpeft.models.attention (the `Prefix` record) and jaxpeft.adapters.config only. A new method is one
module defining a subclass plus one `register` call.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpeft.errors import AdapterError
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.models.attention import Prefix

Vars = dict[str, jax.Array]


class Method:
    """What every method kind may provide besides its interception.

    kind: 'dense' or 'prefix' (which extension point the core intercepts for it).
    Shared variables are not per layer (e.g. a prefix reparameterisation MLP): they live in the adapter state
    under 'shared', outside the scanned stack, and `expand` turns them into per-layer variables (stacked on the
    layer axis) at every apply, inside the traced function, so gradients reach them.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[AdapterConfig]]
    kind: ClassVar[str] = "dense"
    has_peft_format: ClassVar[bool] = True
    """False: `export_peft` refuses it and runs save the documented jaxpeft format instead."""
    needs_calibration: ClassVar[bool] = False
    """True: `init` takes `calibration=` (this layer's statistics from `AdaptedModel.calibrate`, e.g. CorDA's input
    covariance) and the adapter cannot be created without them (dense methods only)."""

    def init_shared(self, cfg: AdapterConfig, sites: tuple[Any, ...], rng: jax.Array) -> tuple[Vars, Vars]:
        """(trainable, frozen) shared variables, created once (not per layer)."""
        return {}, {}

    def expand(self, cfg: AdapterConfig, sites: tuple[Any, ...], shared: Vars, shared_extras: Vars
               ) -> dict[str, Vars]:
        """{flax module path: per-layer variables (L, ...)} computed from the shared ones (default none)."""
        return {}

    def layer_extras(self, cfg: AdapterConfig, site: Any) -> dict[str, jax.Array]:
        """Frozen per-layer values written over the stacked extras after init: {name: (L, ...)}."""
        return {}

    # ---- method losses ---------------------------------------------------------------------------------
    def has_regularizer(self, cfg: AdapterConfig) -> bool:
        """True when the method adds a regulariser R of its variables to training (the core then adds it once
        per optimizer step, after the task loss is normalised)."""
        return False

    def regularizer_term(self, cfg: AdapterConfig, options: dict[str, Any], trainable: Vars, extras: Vars
                         ) -> tuple[jax.Array, jax.Array | float]:
        """(term, weight) of one adapted module in one layer (the core maps it over the layer axis and drops
        layers outside layers_to_transform). The adapter's R is sum(term) / sum(weight) with reduction 'mean',
        sum(term) with 'sum'."""
        raise NotImplementedError

    def regularizer_reduction(self, cfg: AdapterConfig) -> str:
        """'sum' or 'mean' (see regularizer_term)."""
        return "sum"

    def regularizer_placement(self, cfg: AdapterConfig) -> str:
        """'loss': R is added to the loss (its gradient goes through clipping with the task gradient);
        'post_clip': R's gradient, times post_clip_scale, is added to the task gradient after clipping and
        before the optimizer's update (SORSA)."""
        return "loss"

    def post_clip_scale(self, cfg: AdapterConfig, peak_lr: float) -> float:
        """The factor on grad R for 'post_clip' placement, given the configured peak learning rate."""
        return 1.0

    # ---- training hooks ----------------------------------------------------------------------------------
    def has_train_hook(self, cfg: AdapterConfig) -> bool:
        """True when the method updates state after every optimizer step (AdaLoRA's rank allocator)."""
        return False

    def init_hook_state(self, cfg: AdapterConfig, sites: tuple[Any, ...], trainable: Any, extras: Any) -> Any:
        """The hook's state (a pytree; checkpointed with the optimizer state) for one adapter's groups."""
        raise NotImplementedError

    def after_step(self, cfg: AdapterConfig, sites: tuple[Any, ...], step: jax.Array, total_steps: int,
                   trainable: Any, grads: Any, extras: Any, hook: Any) -> tuple[Any, Any]:
        """(trainable, hook) after optimizer step `step` (0-based, traced) from the updated trainable group, the
        step's gradients (before clipping) and the adapter's extras group."""
        raise NotImplementedError

    def hook_extras(self, cfg: AdapterConfig, sites: tuple[Any, ...], hook: Any) -> dict[str, Vars]:
        """{flax module path: {name: array}} of hook state to save with the adapter (e.g. a rank mask)."""
        return {}

    def count(self, cfg: AdapterConfig, site: Any, node: Vars) -> int:
        """Trainable parameters of one site (all its layers), excluding padding; default: the selected layers."""
        import numpy as np

        size = sum(int(np.prod(v.shape)) for v in node.values())
        return size // site.num_layers * len(site.layers) if site.layered else size


class DenseMethod(Method):
    """An adapter on dense layers `y = x @ W0 + b` (W0: (n_in, n_out)).

    Subclasses set `name` and `config_cls` and implement `init`, `forward` and `merge`. The core calls
    them per adapted module and per layer (under scan each call sees one layer's slice). The core keeps
    a per-layer `layer_mask` and the per-layer `scale` for them in the adapter's frozen extras.
    """

    kind = "dense"

    def calibration_stats(self, x: jax.Array) -> Vars:
        """Statistics of one forward's inputs x (1, T, n_in) to one module; `AdaptedModel.calibrate` averages them
        over the forwards."""
        raise NotImplementedError

    def calibration_placeholder(self, site: Any) -> Vars:
        """Statistics of the right shapes ((L, ...) for a layered site) that let `init` build the adapter's
        structure when its values are loaded from a file afterwards."""
        raise NotImplementedError

    def default_targets(self, arch: str) -> tuple[str, ...]:
        """target_modules when the config gives none: module-name suffixes for a jaxpeft backbone of architecture
        `arch` (e.g. ('q_proj', 'v_proj') for 'llama')."""
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


class PrefixMethod(Method):
    """An adapter that gives attention layers extra key/value entries (intercepts `PrefixHook`).

    Per layer (under scan each call sees one layer's slice) `init_layer` creates variables and `prefix`
    returns a `Prefix` for the batch. The core keeps a per-layer `layer_mask` (layers_to_transform) in the
    frozen extras and hides the entries of rows that do not use the adapter (per-example adapter index).
    A prefix cannot be merged into weights.
    """

    kind = "prefix"

    def num_slots(self, cfg: AdapterConfig) -> int:
        """l: the entries per layer (the longest layer's, with per-layer lengths)."""
        raise NotImplementedError

    def position_offset(self, cfg: AdapterConfig) -> int:
        """How far the real tokens' positions shift (0 or l; Hugging Face PEFT shifts by l)."""
        return 0

    def init_layer(self, cfg: AdapterConfig, site: Any, x_btd: jax.Array, rng: jax.Array) -> tuple[Vars, Vars]:
        """(trainable, frozen) variables of one layer; x_btd (B, T, D) is what the hook receives."""
        raise NotImplementedError

    def prefix(self, cfg: AdapterConfig, site: Any, x_btd: jax.Array, mask_bt: jax.Array, pool_mask_bt: jax.Array,
               trainable: Vars, extras: Vars, dropout: Callable[[jax.Array], jax.Array],
               sow: Callable[[str, jax.Array], None]) -> Prefix:
        """The layer's entries: k_blhd, v_blhd (B, l, H_kv, d_h), mask_bl (B, l). `sow(name, value)` records a
        probe value (e.g. gates) when the caller asked for probes."""
        raise NotImplementedError

    def fold(self, cfg: AdapterConfig, sites: tuple[Any, ...], trainable: dict[str, Any], extras: dict[str, Any]
             ) -> tuple[AdapterConfig, dict[str, Any], dict[str, Any]]:
        """The same adapter without training-time machinery (e.g. a reparameterisation MLP folded into plain
        prefixes): (config, trainable, extras) of one adapter's state. Default: unchanged."""
        return cfg, trainable, extras


def mm(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w in x's (compute) dtype with float32 accumulation, float32 result: bf16 runs keep their activations in
    bf16 (the small adapter factor is cast, never x); float32 runs are unchanged."""
    return jnp.matmul(x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def low_rank(x: jax.Array, left: jax.Array, right: jax.Array, middle: jax.Array | None = None) -> jax.Array:
    """((x left) * middle) right -> float32 (..., n_out) for x (..., n_in) in the compute dtype, left (n_in, r),
    middle (r,) or None, right (r, n_out): both matmuls in x's dtype with float32 accumulation (`mm`)."""
    xa = mm(x, left)
    if middle is not None:
        xa = xa * middle
    return mm(xa.astype(x.dtype), right)


def merge_paths(tree: Any, additions: dict[str, Vars]) -> Any:
    """`tree` (nested dicts) with {'/'-joined module path: {name: array}} added; dicts are copied, arrays shared."""
    def copy(node: Any) -> Any:
        return {k: copy(v) for k, v in node.items()} if isinstance(node, Mapping) else node

    if not additions:
        return tree
    out = copy(tree)
    for path, leaves in additions.items():
        node = out
        for part in path.split("/"):
            node = node.setdefault(part, {})
        node.update(leaves)
    return out


def get_path(tree: Any, path: str) -> Any:
    """tree['a']['b'] for the '/'-joined module path 'a/b' (KeyError when a part is missing)."""
    for part in path.split("/"):
        tree = tree[part]
    return tree


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry under `method.name`."""
    METHODS[method.name] = method
    return method


def method_for(cfg: AdapterConfig) -> Any:
    """The registered Method for `cfg.method` (ValueError listing the registered names when there is none)."""
    if cfg.method not in METHODS:
        raise AdapterError(f"unknown adapter method {cfg.method!r}; registered: {sorted(METHODS)}")
    return METHODS[cfg.method]
