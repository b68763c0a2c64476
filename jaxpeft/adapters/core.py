"""`AdaptedModel`: named adapters attached to any linen model by intercepting its dense layers.

Imports flax/jax, jaxpeft.models and sibling adapter modules; never training code. The base params are
never rewritten or copied: adapters live in their own variable collections ('adapter:<name>' trainable,
'adapter_extras:<name>' frozen), stacked per layer by the backbone's scan, and the interception is entered
inside the traced function, so the active adapter set is a static argument and the per-example adapter
index an array: nothing about them hides in jit's cache.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.method import method_for
from jaxpeft.adapters.targeting import DenseModule, ModuleTarget, dense_modules, generic_dense_modules, resolve_targets
from jaxpeft.models.config import ModelConfig
from jaxpeft.models.layers import Dense

AdapterState = dict[str, dict[str, Any]]
"""{'trainable': {name: {'dense': tree, 'saved': {module: params}}}, 'extras': {name: tree}}."""

ALL = "__all__"
_INIT_CACHE: dict[Any, Any] = {}


def trainable_collection(name: str) -> str:
    return f"adapter:{name}"


def extras_collection(name: str) -> str:
    return f"adapter_extras:{name}"


@dataclass(frozen=True)
class AdapterSpec:
    """One named adapter: its config and the modules it adapts (resolved once, static)."""

    name: str
    config: AdapterConfig
    targets: tuple[ModuleTarget, ...]


@dataclass(frozen=True)
class AdaptedModel:
    """A linen model plus named adapters. Immutable and hashable: use it as a static jit argument.

    module: a jaxpeft backbone (targets are HF module paths from its name map), or any linen model whose
    dense layers are `flax.linen.Dense` / `jaxpeft.models.layers.Dense` (targets are its '.'-joined flax
    module paths; build it with `AdaptedModel.wrap_any`).
    """

    module: nn.Module
    model_cfg: ModelConfig | None
    task: str | None
    adapters: tuple[AdapterSpec, ...] = ()
    modules: tuple[DenseModule, ...] = ()
    init_inputs: tuple[tuple[tuple[int, ...], str], ...] = (((1, 2), "int32"),)
    """(shape, dtype) of the positional inputs used to trace the model when adapters are created."""

    @classmethod
    def wrap(cls, module: nn.Module, model_cfg: ModelConfig | None = None, task: str | None = None) -> AdaptedModel:
        """A jaxpeft backbone with no adapters yet."""
        cfg, task = model_cfg or module.cfg, task or module.task
        return cls(module, cfg, task, modules=dense_modules(cfg, task))

    @classmethod
    def wrap_any(cls, module: nn.Module, *example_inputs: Any) -> AdaptedModel:
        """Any linen model, traced once on `example_inputs` (arrays or ShapeDtypeStructs) to find its dense
        layers. Method defaults do not apply: give `target_modules` explicitly."""
        shapes = tuple((tuple(x.shape), str(jnp.dtype(x.dtype))) for x in example_inputs)
        abstract = jax.eval_shape(module.init, jax.random.key(0),
                                  *[jax.ShapeDtypeStruct(s, d) for s, d in shapes])["params"]
        return cls(module, None, None, modules=generic_dense_modules(abstract), init_inputs=shapes)

    # ---- adapter set -------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.adapters)

    def spec(self, name: str) -> AdapterSpec:
        for s in self.adapters:
            if s.name == name:
                return s
        raise KeyError(f"no adapter named {name!r}; this model has {list(self.names)}")

    def add(self, name: str, config: AdapterConfig, *, strict: bool = True) -> AdaptedModel:
        """A copy with adapter `name` added. strict=False: list entries matching nothing are allowed (PEFT import)."""
        if name in self.names:
            raise ValueError(f"an adapter named {name!r} exists already; delete it first or pick another name")
        if not name or any(c in name for c in "/:"):
            raise ValueError(f"adapter name {name!r}: must be non-empty without '/' or ':'")
        method = method_for(config)
        if config.method == "full":  # no interception: whole modules are trained (see init)
            return dataclasses.replace(self, adapters=self.adapters + (AdapterSpec(name, config, ()),))
        targets = config.target_modules
        if targets is None:
            if self.model_cfg is None:
                raise ValueError(f"adapter {name!r}: this is not a jaxpeft backbone, so there are no default "
                                 "targets; set target_modules (module paths such as 'blocks.mlp.fc1')")
            targets = method.default_targets(self.model_cfg.arch)

        arch = self.model_cfg.arch if self.model_cfg is not None else None

        def options(hf_name: str) -> dict[str, Any]:
            return {**config.options_for(hf_name), **method.extra_options(config, hf_name, arch=arch)}

        resolved = resolve_targets(self.modules, targets, exclude=config.exclude_modules,
                                   layers=config.layers_to_transform, options=options, strict=strict)
        for t in resolved:
            ranks = {dict(o).get("r", getattr(config, "r", None)) for o in t.layer_options}
            if len(ranks) > 1:
                raise ValueError(f"rank_pattern gives {t.hf_module} different ranks per layer ({sorted(ranks)}); "
                                 "per-layer ranks of one stacked module are not supported: use one rank per module")
        return dataclasses.replace(self, adapters=self.adapters + (AdapterSpec(name, config, resolved),))

    def delete(self, name: str) -> AdaptedModel:
        """A copy without adapter `name` (drop its entries from your AdapterState with `drop_adapter`)."""
        self.spec(name)
        return dataclasses.replace(self, adapters=tuple(s for s in self.adapters if s.name != name))

    # ---- init ----------------------------------------------------------------------------------------
    def init(self, rng: jax.Array, frozen: Mapping[str, Any], names: Sequence[str] | None = None) -> AdapterState:
        """Create the adapters' variables from the frozen base (methods may read W0, e.g. DoRA, SVD inits)."""
        specs = [s for s in self.adapters if names is None or s.name in names]
        if not specs:
            raise ValueError("no adapter to initialise: add one with AdaptedModel.add(name, config)")
        dense_specs = [s for s in specs if s.targets]
        cols = [c for s in dense_specs for c in (trainable_collection(s.name), extras_collection(s.name))]

        def run(frozen, rng):
            if not dense_specs:
                return {}
            icpt = _Interceptor(dense_specs, None, None, deterministic=True, init_mode=True)
            with nn.intercept_methods(icpt):
                inputs = [jnp.zeros(shape, dtype) for shape, dtype in self.init_inputs]
                _, variables = self.module.apply({"params": frozen}, *inputs, mutable=cols, rngs={"adapter": rng})
            return variables

        key = (self, tuple(s.name for s in specs))
        if key not in _INIT_CACHE:  # one compile per adapter set, not per call
            _INIT_CACHE[key] = jax.jit(run)
        variables = _INIT_CACHE[key](frozen, rng)
        state: AdapterState = {"trainable": {}, "extras": {}}
        for s in specs:
            extras = _set_layer_values(s, variables.get(extras_collection(s.name), {}))
            saved = {}
            modules = s.config.modules_to_save or (tuple(frozen) if s.config.method == "full" else ())
            for mod in modules:
                if mod not in frozen:
                    raise ValueError(f"modules_to_save entry {mod!r} is not a top-level module of this model "
                                     f"(have {sorted(frozen)})")
                saved[mod] = jax.tree.map(jnp.array, frozen[mod])  # a trainable copy; the base stays as is
            state["trainable"][s.name] = {"dense": _plain(variables.get(trainable_collection(s.name), {})),
                                          "saved": saved}
            state["extras"][s.name] = extras
        return state

    # ---- apply ---------------------------------------------------------------------------------------
    def apply(self, frozen: Mapping[str, Any], state: AdapterState | None, *args: Any,
              active: str | Sequence[str] | None = ALL, adapter_index: jax.Array | None = None,
              deterministic: bool = True, rngs: Mapping[str, jax.Array] | None = None,
              method: Any = None, **kwargs: Any) -> Any:
        """Run the model with adapters.

        active: ALL (every adapter in `state`), a name, a tuple of names (their deltas add up, as PEFT does
            with several active adapters), or None / () for the exact base model. Static.
        adapter_index: (B,) int array choosing per example which of `active` to use (-1 = none): different
            rows of one batch use different adapters without copying the base.
        """
        names = self._active(state, active)
        params = dict(frozen)
        specs = [self.spec(n) for n in names]
        saved = [state["trainable"][n].get("saved") or {} for n in names] if names else []
        if any(saved):
            if adapter_index is not None or len(names) > 1:
                raise ValueError("modules_to_save cannot be combined with several active adapters or a "
                                 "per-example adapter_index")
            params.update(saved[0])
        variables: dict[str, Any] = {"params": params}
        specs = [s for s in specs if s.targets]
        for n in (s.name for s in specs):
            variables[trainable_collection(n)] = state["trainable"][n]["dense"]
            variables[extras_collection(n)] = state["extras"][n]
        kw = dict(kwargs, deterministic=deterministic) if _accepts_deterministic(self.module, method) else kwargs
        if not specs:
            return self.module.apply(variables, *args, rngs=rngs, method=method, **kw)
        with nn.intercept_methods(_Interceptor(specs, names, adapter_index, deterministic, init_mode=False)):
            return self.module.apply(variables, *args, rngs=rngs, method=method, **kw)

    def _active(self, state: AdapterState | None, active: str | Sequence[str] | None) -> tuple[str, ...]:
        if active is None or (not isinstance(active, str) and len(active) == 0):
            return ()
        if active == ALL:
            return tuple(n for n in self.names if state and n in state["trainable"])
        names = (active,) if isinstance(active, str) else tuple(active)
        for n in names:
            self.spec(n)
            if state is None or n not in state["trainable"]:
                raise KeyError(f"adapter {n!r} has no weights in the given state (initialise or load it)")
        return names

    # ---- reporting -----------------------------------------------------------------------------------
    def summary(self, state: AdapterState | None = None) -> str:
        """Every adapted module with its layers and trainable shapes."""
        lines = []
        for s in self.adapters:
            lines.append(f"adapter {s.name!r} ({s.config.method}):")
            tr = (state or {}).get("trainable", {}).get(s.name, {}).get("dense", {})
            for t in s.targets:
                node = _get_path(tr, t.flax_module) or {}
                shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(node.items()))
                layers = f"layers {_ranges(t.layers)}" if t.layered else "no layer axis"
                lines.append(f"  {t.hf_module}  [{t.n_in}->{t.n_out}; {layers}]  {shapes}")
            for mod in (state or {}).get("trainable", {}).get(s.name, {}).get("saved", {}) or s.config.modules_to_save:
                lines.append(f"  {mod}  (trained in full)")
        return "\n".join(lines)


class _Interceptor:
    """Intercepts Dense.__call__ of targeted modules; adds each active adapter's delta."""

    def __init__(self, specs: Sequence[AdapterSpec], names: tuple[str, ...] | None, adapter_index: jax.Array | None,
                 deterministic: bool, init_mode: bool):
        self.by_path: dict[str, list[tuple[int, AdapterSpec, ModuleTarget]]] = {}
        for k, s in enumerate(specs):
            for t in s.targets:
                self.by_path.setdefault(t.flax_module, []).append((k, s, t))
        self.adapter_index = adapter_index
        self.deterministic = deterministic
        self.init_mode = init_mode

    def __call__(self, next_fun, args, kwargs, context):
        m = context.module
        if context.method_name != "__call__" or not isinstance(m, (Dense, nn.Dense)):
            return next_fun(*args, **kwargs)
        hits = self.by_path.get("/".join(m.path))
        if not hits:
            return next_fun(*args, **kwargs)
        x = args[0]
        base = next_fun(*args, **kwargs)
        kernel = m.get_variable("params", "kernel")
        bias = m.get_variable("params", "bias") if m.use_bias else None
        y = base
        for k, spec, target in hits:
            method = method_for(spec.config)
            col, xcol = trainable_collection(spec.name), extras_collection(spec.name)
            options = target.options
            if self.init_mode:
                trainable, extras = method.init(spec.config, options, kernel, bias, m.make_rng("adapter"))
                extras = dict(extras, layer_mask=jnp.ones((), jnp.float32),
                              scale=jnp.asarray(method.scale(spec.config, options), jnp.float32))
                for key, v in trainable.items():
                    m.put_variable(col, key, v)
                for key, v in extras.items():
                    m.put_variable(xcol, key, v)
            trainable = dict(m.variables.get(col, {}))
            extras = dict(m.variables.get(xcol, {}))
            rate = getattr(spec.config, "lora_dropout", 0.0)

            def dropout(z, rate=rate):
                return nn.Dropout(rate)(z, deterministic=self.deterministic) if rate and not self.deterministic else z

            delta = method.forward(spec.config, options, x, base, lambda z: _dense(m, z, kernel, bias), kernel,
                                   bias, trainable, extras, extras["scale"], dropout)
            w = extras["layer_mask"].astype(jnp.float32)
            if self.adapter_index is not None:
                rows = (self.adapter_index == k).astype(jnp.float32)
                w = w * rows.reshape(rows.shape + (1,) * (delta.ndim - 1))
            y = y + (w * delta).astype(y.dtype)
        return y


def _dense(m: nn.Module, x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """What the dense layer computes, for methods that rerun the base layer on a changed input ((IA)^3 FF)."""
    dtype = m.dtype or jnp.result_type(x, kernel)
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    return y if bias is None else y + bias.astype(dtype)


def _accepts_deterministic(module: nn.Module, method: Any) -> bool:
    import inspect

    fn = getattr(type(module), method) if isinstance(method, str) else (method or type(module).__call__)
    try:
        return "deterministic" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _plain(tree: Any) -> Any:
    return jax.tree.map(lambda x: x, dict(tree) if isinstance(tree, Mapping) else tree)


def _get_path(tree: Mapping[str, Any], path: str) -> Any:
    node: Any = tree
    for p in path.split("/"):
        if not isinstance(node, Mapping) or p not in node:
            return None
        node = node[p]
    return node


def _set_layer_values(spec: AdapterSpec, extras: Mapping[str, Any]) -> dict[str, Any]:
    """Write the per-layer layer_mask and scale (alpha_pattern per layer) into the stacked extras."""
    extras = jax.tree.map(lambda x: x, _to_dict(extras))
    method = method_for(spec.config)
    for t in spec.targets:
        node = _get_path(extras, t.flax_module)
        if t.layered:
            mask = jnp.zeros((t.num_layers,), jnp.float32).at[jnp.asarray(t.layers)].set(1.0)
            scales = [method.scale(spec.config, dict(t.layer_options[0]))] * t.num_layers
            for i, opts in zip(t.layers, t.layer_options):
                scales[i] = method.scale(spec.config, dict(opts))
            node["layer_mask"] = mask
            node["scale"] = jnp.asarray(scales, jnp.float32)
    return extras


def _to_dict(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def _ranges(layers: tuple[int, ...]) -> str:
    return ",".join(str(i) for i in layers)


def drop_adapter(state: AdapterState, name: str) -> AdapterState:
    """A copy of `state` without adapter `name`."""
    return {k: {n: v for n, v in group.items() if n != name} for k, group in state.items()}
