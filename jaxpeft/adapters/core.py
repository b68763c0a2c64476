"""`AdaptedModel`: named adapters attached to any linen model by intercepting its layers: dense layers
(LoRA family, SVD family) and attention prefix hooks (prefix tuning, P-tuning v2, APT).

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

from jaxpeft.errors import AdapterError
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.method import merge_paths, method_for
from jaxpeft.adapters.targeting import (DenseModule, HookSite, ModuleTarget, dense_modules, find_hook_sites,
                                       generic_dense_modules, resolve_targets, select_hook_sites)
from jaxpeft.models.attention import Prefix, PrefixHook
from jaxpeft.models.cache import KVCache
from jaxpeft.models.config import ModelConfig
from jaxpeft.models.layers import Dense

AdapterState = dict[str, dict[str, Any]]
"""The same layout for every method kind:
{'trainable': {name: {'modules': tree, 'shared': tree, 'saved': {module: params}}},
 'extras': {name: {'modules': tree, 'shared': tree}}}.
'modules' holds the per-site variables the interceptions create, keyed by flax module path and stacked on the
layer axis like the base ('layers/self_attn/q_proj/lora_A', 'layers/self_attn/prefix/prefix_k'); 'shared' holds
variables outside the scanned stack (e.g. a prefix reparameterisation MLP); 'saved' holds modules trained in
full (modules_to_save). 'trainable' is what is differentiated and optimised; 'extras' is frozen."""

ALL = "__all__"
_INIT_CACHE: dict[Any, Any] = {}
_HOOK_SITES: dict[Any, tuple[HookSite, ...]] = {}


def trainable_collection(name: str) -> str:
    """The flax variable collection of adapter `name`'s trainable variables: 'adapter:<name>'."""
    return f"adapter:{name}"


def extras_collection(name: str) -> str:
    """The flax variable collection of adapter `name`'s frozen extras: 'adapter_extras:<name>'."""
    return f"adapter_extras:{name}"


def calibration_collection(name: str) -> str:
    """The flax variable collection `calibrate` fills with adapter `name`'s input statistics: 'calibration:<name>'."""
    return f"calibration:{name}"


@dataclass(frozen=True)
class AdapterSpec:
    """One named adapter: its config and the modules it adapts (resolved once, static)."""

    name: str
    config: AdapterConfig
    targets: tuple[ModuleTarget, ...]
    hooks: tuple[HookSite, ...] = ()
    wrapper: AdapterConfig | None = None
    """A method that wraps this one at the model level (IMSM); `config` is then the inner method's."""

    @property
    def full_config(self) -> AdapterConfig:
        """The config the user gave: the wrapper's (with the inner one inside) or the method's own."""
        return self.wrapper if self.wrapper is not None else self.config

    @property
    def kind(self) -> str:
        """The method kind of `config`: 'dense' or 'prefix' (for a wrapped adapter, the inner method's)."""
        return method_for(self.config).kind

    @property
    def sites(self) -> tuple[Any, ...]:
        """Every intercepted site: dense targets and prefix hooks."""
        return self.targets + self.hooks


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
        """The adapters' names, in the order they were added."""
        return tuple(s.name for s in self.adapters)

    def spec(self, name: str) -> AdapterSpec:
        """The AdapterSpec of adapter `name` (KeyError naming this model's adapters when there is none)."""
        for s in self.adapters:
            if s.name == name:
                return s
        raise KeyError(f"no adapter named {name!r}; this model has {list(self.names)}")

    def add(self, name: str, config: AdapterConfig, *, strict: bool = True) -> AdaptedModel:
        """A copy with adapter `name` added. strict=False: list entries matching nothing are allowed (PEFT import)."""
        if name in self.names:
            raise AdapterError(f"an adapter named {name!r} exists already; delete it first or pick another name")
        if not name or any(c in name for c in "/:"):
            raise AdapterError(f"adapter name {name!r}: must be non-empty without '/' or ':'")
        method = method_for(config)
        if method.kind == "wrapper":  # the inner method's interceptions, under this adapter's name
            inner = self.add(name, config.inner, strict=strict).spec(name)
            if self.model_cfg is None or not self.model_cfg.is_decoder:
                raise AdapterError(f"adapter {name!r} ({config.method}): it mixes the final hidden states of a decoder "
                                 "language model; this model is not a jaxpeft decoder backbone: use IMSM with a "
                                 "decoder (llama, qwen2, gemma3, gpt2) in a causal_lm task, or the inner method alone")
            return dataclasses.replace(self, adapters=self.adapters + (dataclasses.replace(inner, wrapper=config),))
        if config.method == "full":  # no interception: whole modules are trained (see init)
            return dataclasses.replace(self, adapters=self.adapters + (AdapterSpec(name, config, ()),))
        if method.kind == "prefix":
            if config.target_modules is not None:
                raise AdapterError(f"adapter {name!r} ({config.method}): prefix methods attach to every attention "
                                 "layer's prefix hook; use layers_to_transform to choose layers, not target_modules")
            hooks = select_hook_sites(self.hook_sites(), config.layers_to_transform)
            return dataclasses.replace(self, adapters=self.adapters + (AdapterSpec(name, config, (), hooks),))
        targets = config.target_modules
        if targets is None:
            if self.model_cfg is None:
                raise AdapterError(f"adapter {name!r}: this is not a jaxpeft backbone, so there are no default "
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
                raise AdapterError(f"rank_pattern gives {t.hf_module} different ranks per layer ({sorted(ranks)}); "
                                 "per-layer ranks of one stacked module are not supported: use one rank per module")
            (r,) = ranks
            if strict and isinstance(r, int) and r > min(t.n_in, t.n_out):
                raise AdapterError(f"r={r} is above the dimensions of {t.hf_module} ({t.n_in} -> {t.n_out}): an update "
                                   f"of that weight has rank at most {min(t.n_in, t.n_out)}; lower adapter.r, or give "
                                   "this module a smaller rank with rank_pattern, or exclude it")
        return dataclasses.replace(self, adapters=self.adapters + (AdapterSpec(name, config, resolved),))

    def hook_sites(self) -> tuple[HookSite, ...]:
        """The model's attention prefix hooks (traced once per model, abstractly)."""
        key = (self.module, self.init_inputs)
        if key not in _HOOK_SITES:
            _HOOK_SITES[key] = find_hook_sites(self.module, self.init_inputs, self.modules)
        return _HOOK_SITES[key]

    def delete(self, name: str) -> AdaptedModel:
        """A copy without adapter `name` (drop its entries from your AdapterState with `drop_adapter`)."""
        self.spec(name)
        return dataclasses.replace(self, adapters=tuple(s for s in self.adapters if s.name != name))

    # ---- init ----------------------------------------------------------------------------------------
    def init(self, rng: jax.Array, frozen: Mapping[str, Any], names: Sequence[str] | None = None, *,
             calibration: Mapping[str, Any] | None = None) -> AdapterState:
        """Create the adapters' variables from the frozen base (methods may read W0, e.g. DoRA, SVD inits).

        calibration: {adapter name: the tree `calibrate` returned}, for methods that need input statistics (CorDA).
        """
        specs = [s for s in self.adapters if names is None or s.name in names]
        if not specs:
            raise AdapterError("no adapter to initialise: add one with AdaptedModel.add(name, config)")
        site_specs = [s for s in specs if s.sites]
        cols = [c for s in site_specs for c in (trainable_collection(s.name), extras_collection(s.name))]
        calib = {calibration_collection(n): v for n, v in (calibration or {}).items()}
        for s in site_specs:
            if method_for(s.config).needs_calibration and calibration_collection(s.name) not in calib:
                raise AdapterError(f"adapter {s.name!r} ({s.config.method}) needs calibration statistics: "
                                 f"stats = model.calibrate(frozen, examples, {s.name!r}), then "
                                 f"model.init(rng, frozen, calibration={{{s.name!r}: stats}})")

        def run(frozen, rng, calib):
            if not site_specs:
                return {}
            icpt = _Interceptor(site_specs, None, None, deterministic=True, init_mode=True)
            with nn.intercept_methods(icpt):
                inputs = [jnp.zeros(shape, dtype) for shape, dtype in self.init_inputs]
                _, variables = self.module.apply({"params": frozen, **calib}, *inputs, mutable=cols,
                                                 rngs={"adapter": rng})
            return variables

        key = (self, tuple(s.name for s in specs))
        if key not in _INIT_CACHE:  # one compile per adapter set, not per call
            _INIT_CACHE[key] = jax.jit(run)
        site_rng, shared_rng = jax.random.split(rng)
        variables = _INIT_CACHE[key](frozen, site_rng, calib)
        state: AdapterState = {"trainable": {}, "extras": {}}
        for k, s in enumerate(specs):
            method = method_for(s.config)
            extras = _set_layer_values(s, variables.get(extras_collection(s.name), {}))
            shared, shared_extras = method.init_shared(s.config, s.sites, jax.random.fold_in(shared_rng, k))
            if s.wrapper is not None:  # the wrapper's own parameters (IMSM's gate) sit beside the inner method's
                from jaxpeft.adapters.imsm import GATE_KEY, init_gate

                gate = init_gate(s.wrapper, self.model_cfg.hidden_size, jax.random.fold_in(shared_rng, 1000 + k))
                shared = {**shared, GATE_KEY: gate} if gate else shared
            saved = {}
            modules = s.config.modules_to_save or (tuple(frozen) if s.config.method == "full" else ())
            for mod in modules:
                if mod not in frozen:
                    raise AdapterError(f"modules_to_save entry {mod!r} is not a top-level module of this model "
                                       f"(have {sorted(frozen)}): name one of those, e.g. the task head")
                saved[mod] = jax.tree.map(jnp.array, frozen[mod])  # a trainable copy; the base stays as is
            state["trainable"][s.name] = {"modules": _plain(variables.get(trainable_collection(s.name), {})),
                                          "shared": _to_dict(shared), "saved": saved}
            state["extras"][s.name] = {"modules": extras, "shared": _to_dict(shared_extras)}
        return state

    def calibrate(self, frozen: Mapping[str, Any], examples: Sequence[Any], name: str) -> dict[str, Any]:
        """Input statistics of adapter `name`'s targeted layers for methods that need them at init (CorDA):
        {flax module path: {stat: (L, ...)}}, the mean over forwards of `method.calibration_stats`.

        examples: token-id sequences (or (1, T) arrays), run one per forward without padding, as PEFT does; each
        distinct length compiles once. Pass the result to `init(..., calibration={name: stats})`.
        """
        spec = self.spec(name)
        method = method_for(spec.config)
        if not method.needs_calibration:
            raise AdapterError(f"adapter {name!r} ({spec.config.method}) takes no calibration statistics")
        if not examples:
            raise AdapterError(f"calibrate: no examples for adapter {name!r}; pass at least one token sequence")
        col = calibration_collection(name)

        def run(frozen, ids):
            with nn.intercept_methods(_Calibrator(spec)):
                _, variables = self.module.apply({"params": frozen}, ids, jnp.ones_like(ids), mutable=[col])
            return variables[col]

        key = (self, name, "calibrate")
        if key not in _INIT_CACHE:
            _INIT_CACHE[key] = jax.jit(run)
        total = None
        for ex in examples:
            ids = jnp.asarray(ex, jnp.int32)
            if ids.ndim > 2 or (ids.ndim == 2 and ids.shape[0] != 1):
                raise AdapterError(f"calibrate: an example of shape {ids.shape}; calibration takes one unpadded example "
                                 "per forward (a token sequence or a (1, T) array), as PEFT does")
            ids = ids.reshape(1, -1)
            stats = _INIT_CACHE[key](frozen, ids)
            total = stats if total is None else jax.tree.map(jnp.add, total, stats)
        return _to_dict(jax.tree.map(lambda x: x / len(examples), total))

    def placeholder_calibration(self, name: str) -> dict[str, Any] | None:
        """Calibration statistics of the right shapes for adapter `name` (None when it needs none): init with them
        builds the structure that a saved adapter's arrays then overwrite (loading never re-calibrates)."""
        spec = self.spec(name)
        method = method_for(spec.config)
        if not method.needs_calibration:
            return None
        return merge_paths({}, {t.flax_module: method.calibration_placeholder(t) for t in spec.targets})

    # ---- apply ---------------------------------------------------------------------------------------
    def apply(self, frozen: Mapping[str, Any], state: AdapterState | None, *args: Any,
              active: str | Sequence[str] | None = ALL, adapter_index: jax.Array | None = None,
              deterministic: bool = True, rngs: Mapping[str, jax.Array] | None = None,
              method: Any = None, capture: bool = False, siamese_form: str | None = None,
              head_positions_bk: jax.Array | None = None, run_head: bool = True, **kwargs: Any) -> Any:
        """Run the model with adapters.

        active: ALL (every adapter in `state`), a name, a tuple of names (their deltas add up, as PEFT does
            with several active adapters), or None / () for the exact base model. Static.
        adapter_index: (B,) int array choosing per example which of `active` to use (-1 = none): different
            rows of one batch use different adapters without copying the base (a prefix adapter's entries are
            hidden from, and its position shift not applied to, the rows that do not use it).
        capture: also return the probe values methods record (e.g. APT's gates): (output, {'probes': tree}).
        siamese_form: for a wrapper that runs two streams (IMSM): 'separate' (two calls; training: only the
            adapter's stream has a backward) or 'doubled' (one batch of 2B rows, the base rows with adapter index -1;
            decoding: the weights are read once). Default: the cache's form when decoding, else 'separate'.
        head_positions_bk: (B, K) int positions: the head runs only there (logits (B, K, V)), e.g. the positions a
            causal-LM loss scores, instead of full-vocabulary logits at every position (decoders only).
        run_head: with head_positions_bk, False returns logits=None and hidden = the (B, K, D) states the head
            would read (IMSM: after the gate); `head(frozen, state, h)` then gives their logits, e.g. chunk by chunk.
        Prefix adapters with a position offset shift the model's default positions (`position_offset_b`);
        decoding with a cache takes the shift from the cache (`init_cache`).
        """
        names = self._active(state, active)
        wrapped = [self.spec(n) for n in names if self.spec(n).wrapper is not None]
        if wrapped:
            return self._apply_siamese(frozen, state, wrapped[0], names, args, adapter_index, deterministic, rngs,
                                       method, capture, kwargs, siamese_form, head_positions_bk, run_head)
        if head_positions_bk is None:
            return self._apply_plain(frozen, state, names, args, adapter_index, deterministic, rngs, method, capture,
                                     kwargs)
        if method not in (None, "__call__") or self.model_cfg is None or not self.model_cfg.is_decoder:
            raise AdapterError("head_positions_bk: a gathered head needs a jaxpeft decoder backbone run whole")
        out = self._apply_plain(frozen, state, names, args, adapter_index, deterministic, rngs, "hidden_states",
                                capture, kwargs)
        (h, cache), probes = out if capture else (out, None)
        h_bkd = jnp.take_along_axis(h, head_positions_bk[..., None].astype(jnp.int32), axis=1)
        logits = self.head(frozen, state, h_bkd, active=names) if run_head else None
        from jaxpeft.models.outputs import ModelOutput

        result = ModelOutput(logits=logits, hidden=h if run_head else h_bkd, cache=cache)
        return (result, probes) if capture else result

    def head(self, frozen: Mapping[str, Any], state: AdapterState | None, h_bkd: jax.Array,
             active: str | Sequence[str] | None = ALL, mask_bk: jax.Array | None = None) -> jax.Array:
        """The model's head (a decoder's LM head, modules_to_save copies of it included) on final hidden states
        h_bkd (B, K, D) -> (B, K, V) float32 logits; mask_bk (default all ones) is what a pooling head reads."""
        names = self._active(state, active)
        params = dict(frozen)
        for n in names:
            params.update((state["trainable"][n].get("saved") or {}) if state else {})
        mask = jnp.ones(h_bkd.shape[:2], bool) if mask_bk is None else mask_bk
        return self.module.apply({"params": params}, h_bkd, mask, method="head")

    def _apply_plain(self, frozen, state, names, args, adapter_index, deterministic, rngs, method, capture, kwargs):
        """apply() of adapters that intercept layers (a wrapper's inner method included)."""
        params = dict(frozen)
        specs = [self.spec(n) for n in names]
        saved = [state["trainable"][n].get("saved") or {} for n in names] if names else []
        if any(saved):
            if adapter_index is not None or len(names) > 1:
                owners = [n for n, sv in zip(names, saved) if sv]
                raise AdapterError(f"adapter(s) {owners} train their own copy of {sorted(set().union(*saved))} "
                                   "(modules_to_save, e.g. a classification head): one forward cannot use several "
                                   "such copies at once, so several active adapters or a per-example adapter_index "
                                   "cannot include them; run each adapter's rows in their own batch (active=NAME), "
                                   "or merge those adapters one at a time")
            params.update(saved[0])
        variables: dict[str, Any] = {"params": params}
        site_specs = [s for s in specs if s.sites]
        for s in site_specs:
            tr, ex = state["trainable"][s.name], state["extras"][s.name]
            expanded = method_for(s.config).expand(s.config, s.sites, tr.get("shared", {}), ex.get("shared", {}))
            variables[trainable_collection(s.name)] = merge_paths(tr["modules"], expanded)
            variables[extras_collection(s.name)] = ex["modules"]
        kw = dict(kwargs, deterministic=deterministic) if _accepts(self.module, method, "deterministic") else kwargs
        offset = self.position_offsets(names, adapter_index, args[0].shape[0] if args else None)
        if offset is not None and "cache" not in kwargs and "positions_bt" not in kwargs:
            if not _accepts(self.module, method, "position_offset_b"):
                raise AdapterError("this model takes no position_offset_b input, so it cannot shift positions for a "
                                 "prefix: set position_offset=0 in the prefix adapter's config")
            kw["position_offset_b"] = offset
        mutable = ["probes"] if capture else False
        if not site_specs:
            return self.module.apply(variables, *args, rngs=rngs, method=method, mutable=mutable, **kw)
        with nn.intercept_methods(_Interceptor(site_specs, names, adapter_index, deterministic, init_mode=False,
                                               capture=capture)):
            return self.module.apply(variables, *args, rngs=rngs, method=method, mutable=mutable, **kw)

    def _apply_siamese(self, frozen, state, spec, names, args, adapter_index, deterministic, rngs, method, capture,
                       kwargs, form, head_positions_bk=None, run_head=True):
        """IMSM: the base stream (W0 exactly: no adapter, no dropout, no gradient) and the inner adapter's stream
        read the same frozen tree; the gate mixes their final hidden states before the frozen head."""
        from jaxpeft.adapters.imsm import GATE_KEY, IMSMCache, gate_dropout, gate_values, mix, query_mean

        if len(names) != 1 or adapter_index is not None:
            raise AdapterError(f"adapter {spec.name!r} ({spec.wrapper.method}) runs alone: activate only it, without "
                             "a per-example adapter_index")
        if method not in (None, "__call__"):
            raise AdapterError(f"adapter {spec.name!r} ({spec.wrapper.method}) runs the whole model (method=None)")
        cfg = spec.wrapper
        kwargs = dict(kwargs)
        cache = kwargs.pop("cache", None)
        ids = args[0]
        mask = (args[1] if len(args) > 1 else kwargs.get("attention_mask_bt"))
        mask = jnp.ones(ids.shape, bool) if mask is None else mask.astype(bool)
        prompt = kwargs.get("prompt_mask_bt")
        query_bt = mask if prompt is None else mask & prompt.astype(bool)
        form = form or ("doubled" if cache is not None and cache.base is None else "separate")
        h_base, h_tuned, c_base, c_tuned, probes = self._siamese_streams(frozen, state, names, args, kwargs, cache,
                                                                         deterministic, rngs, capture, form)
        q_base, q_tuned = query_mean(h_base, query_bt), query_mean(h_tuned, query_bt)
        if cache is not None:  # the query means come from the prompt at prefill, then stay
            keep = cache.q_valid_b[:, None]
            q_base = jnp.where(keep, cache.q_base_bd, q_base)
            q_tuned = jnp.where(keep, cache.q_tuned_bd, q_tuned)
        if head_positions_bk is not None:  # the gate and the head only where the logits are needed
            idx = head_positions_bk[..., None].astype(jnp.int32)
            h_base, h_tuned = (jnp.take_along_axis(x, idx, axis=1) for x in (h_base, h_tuned))
            mask = jnp.ones(head_positions_bk.shape, bool)
        drop = gate_dropout(cfg, deterministic, None if rngs is None else rngs.get("dropout"))
        gate = state["trainable"][spec.name]["shared"].get(GATE_KEY, {})
        g = gate_values(cfg, gate, h_base, h_tuned, q_base, q_tuned, drop)
        h = mix(g, h_base, h_tuned)
        logits = None
        if run_head or head_positions_bk is None:
            logits = self.head(frozen, state, h, active=names, mask_bk=mask)
        new_cache = None
        if cache is not None:
            new_cache = IMSMCache(c_base, c_tuned, q_base, q_tuned, cache.q_valid_b | jnp.any(query_bt, axis=1))
        from jaxpeft.models.outputs import ModelOutput

        out = ModelOutput(logits=logits, hidden=h, cache=new_cache)
        if capture:
            probes = dict(probes or {})
            probes.setdefault("probes", {})[f"{spec.name}:gate"] = g
            return out, probes
        return out

    def _siamese_streams(self, frozen, state, names, args, kwargs, cache, deterministic, rngs, capture, form):
        """(h_base (B, T, D) without gradient, h_tuned, base cache, tuned cache, probes) in either form."""
        if form == "separate":
            if cache is not None and cache.base is None:
                raise AdapterError("this decode state holds one doubled cache: decode with siamese_form='doubled'")
            kw_b = kwargs if cache is None else dict(kwargs, cache=cache.base)
            kw_t = kwargs if cache is None else dict(kwargs, cache=cache.tuned)
            h_base, c_base = self._apply_plain(frozen, None, (), args, None, True, None, "hidden_states", False, kw_b)
            out = self._apply_plain(frozen, state, names, args, None, deterministic, rngs, "hidden_states", capture,
                                    kw_t)
            (h_tuned, c_tuned), probes = out if capture else (out, None)
            return jax.lax.stop_gradient(h_base), h_tuned, c_base, c_tuned, probes
        if form != "doubled":
            raise AdapterError(f"siamese_form={form!r}: 'separate' or 'doubled'")
        if not deterministic:
            raise AdapterError("siamese_form='doubled' runs both streams in one batch, so dropout would reach the base "
                             "stream: use it with deterministic=True (decoding), 'separate' for training")
        if cache is not None and cache.base is not None:
            raise AdapterError("this decode state holds two caches: decode with siamese_form='separate'")
        b = args[0].shape[0]

        def twice(x):
            return jnp.concatenate([x, x], axis=0) if hasattr(x, "shape") and x.shape[:1] == (b,) else x

        kw = {k: twice(v) for k, v in kwargs.items()}
        if cache is not None:
            kw["cache"] = cache.tuned
        index = jnp.concatenate([jnp.full((b,), -1, jnp.int32), jnp.zeros((b,), jnp.int32)])
        out = self._apply_plain(frozen, state, names, tuple(twice(a) for a in args), index, True, rngs,
                                "hidden_states", capture, kw)
        (h, c), probes = out if capture else (out, None)
        return jax.lax.stop_gradient(h[:b]), h[b:], None, c, probes

    def position_offsets(self, names: Sequence[str], adapter_index: jax.Array | None, batch: int | None
                         ) -> jax.Array | None:
        """(B,) int32 position shift of each row from the active prefix adapters (None when all shifts are 0)."""
        total = None
        for k, n in enumerate(names):
            spec = self.spec(n)
            if spec.kind != "prefix":
                continue
            off = method_for(spec.config).position_offset(spec.config)
            if not off:
                continue
            if adapter_index is not None:
                row = jnp.where(adapter_index == k, off, 0).astype(jnp.int32)
            else:
                if batch is None:
                    raise AdapterError("position offsets need the batch size: pass the input ids positionally")
                row = jnp.full((batch,), off, jnp.int32)
            total = row if total is None else total + row
        return total

    def init_cache(self, state: AdapterState | None, batch: int, max_len: int, *, active: str | Sequence[str] | None = ALL,
                   adapter_index: jax.Array | None = None, dtype: Any = None, siamese_form: str = "doubled") -> Any:
        """An empty KV cache for decoding with these adapters: the active prefix adapters' slots reserved before
        the tokens (written once at prefill) and each row's first position shifted by its position offset."""
        cfg = self.model_cfg
        if cfg is None:
            raise AdapterError("init_cache needs a jaxpeft decoder backbone (AdaptedModel.wrap)")
        from jaxpeft.models.layers import jnp_dtype

        names = self._active(state, active)
        dtype = dtype or jnp_dtype(cfg.dtype)
        tuned = KVCache.init(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype,
                             prefix_slots=self._slots(names),
                             position_offset_b=self.position_offsets(names, adapter_index, batch))
        if any(self.spec(n).wrapper is not None for n in names):  # IMSM: the streams' caches, the query means
            from jaxpeft.adapters.imsm import IMSMCache

            zeros = jnp.zeros((batch, cfg.hidden_size), jnp.float32)
            if siamese_form == "doubled":  # one cache of 2B rows: base rows (adapter index -1), then tuned rows
                index = jnp.concatenate([jnp.full((batch,), -1, jnp.int32), jnp.zeros((batch,), jnp.int32)])
                both = KVCache.init(cfg.num_layers, 2 * batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype,
                                    prefix_slots=self._slots(names),
                                    position_offset_b=self.position_offsets(names, index, 2 * batch))
                return IMSMCache(None, both, zeros, zeros, jnp.zeros((batch,), bool))
            base = KVCache.init(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype)
            return IMSMCache(base, tuned, zeros, zeros, jnp.zeros((batch,), bool))
        return tuned

    def prefix_slots(self, state: AdapterState | None = None, active: str | Sequence[str] | None = ALL) -> int:
        """How many key/value entries the active prefix adapters add to every attention layer."""
        return self._slots(self._active(state, active) if state is not None else self.names)

    def _slots(self, names: Sequence[str]) -> int:
        return sum(method_for(self.spec(n).config).num_slots(self.spec(n).config) for n in names
                   if self.spec(n).kind == "prefix")

    def max_position_shift(self) -> int:
        """The largest position offset the adapters apply (length checks against learned positions count it)."""
        return sum(method_for(s.config).position_offset(s.config) for s in self.adapters if s.kind == "prefix")

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

    # ---- method losses -------------------------------------------------------------------------------
    def has_regularizer(self, placement: str = "loss", names: Sequence[str] | None = None) -> bool:
        """Whether any of the adapters (all when names is None) declares a regulariser with this placement."""
        return any(_regularizes(s, placement) for s in self.adapters if names is None or s.name in names)

    def regularizer(self, state: AdapterState, *, placement: str = "loss", peak_lr: float | None = None,
                    names: Sequence[str] | None = None) -> jax.Array:
        """The adapters' method regularisers R (float32 scalar, 0.0 when none): summed over adapters, each
        reduced as its method says over the modules and selected layers it adapts.

        placement: 'loss' (added to the training loss) or 'post_clip' (its gradient joins the clipped task
        gradient; with peak_lr given, each method's R is scaled by its post_clip_scale(peak_lr), else returned as
        is, for logging). Differentiable in state['trainable'].
        """
        total = jnp.zeros((), jnp.float32)
        for spec in self.adapters:
            if (names is not None and spec.name not in names) or spec.name not in state["trainable"]:
                continue
            if not _regularizes(spec, placement):
                continue
            method = method_for(spec.config)
            terms, weights = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
            for t in spec.targets:
                node = dict(_get_path(state["trainable"][spec.name]["modules"], t.flax_module))
                xnode = dict(_get_path(state["extras"][spec.name]["modules"], t.flax_module))
                mask = xnode["layer_mask"].astype(jnp.float32)
                options = dict(t.layer_options[0]) if t.layer_options else {}

                def one(tr, ex, method=method, options=options, cfg=spec.config):
                    term, weight = method.regularizer_term(cfg, options, tr, ex)
                    return jnp.asarray(term, jnp.float32), jnp.asarray(weight, jnp.float32)

                term, weight = jax.vmap(one)(node, xnode) if t.layered else one(node, xnode)
                terms, weights = terms + jnp.sum(mask * term), weights + jnp.sum(mask * weight)
            r = terms / jnp.maximum(weights, 1e-12) if method.regularizer_reduction(spec.config) == "mean" else terms
            if placement == "post_clip" and peak_lr is not None:
                r = r * method.post_clip_scale(spec.config, peak_lr)
            total = total + r
        return total

    # ---- training hooks ------------------------------------------------------------------------------
    def has_train_hooks(self) -> bool:
        """Whether any adapter keeps state updated after each optimizer step (e.g. AdaLoRA's rank allocator)."""
        return any(method_for(s.config).has_train_hook(s.config) for s in self.adapters)

    def _hooked(self, state: Mapping[str, Any]) -> list[AdapterSpec]:
        return [s for s in self.adapters if s.name in state and method_for(s.config).has_train_hook(s.config)]

    def init_hook_state(self, state: AdapterState) -> dict[str, Any]:
        """{adapter name: hook state} for the adapters with training hooks ({} when none)."""
        return {s.name: method_for(s.config).init_hook_state(s.config, s.sites, state["trainable"][s.name],
                                                              state["extras"][s.name])
                for s in self._hooked(state["trainable"])}

    def after_step(self, trainable: Mapping[str, Any], grads: Mapping[str, Any], extras: Mapping[str, Any],
                   hooks: Mapping[str, Any], step: jax.Array, total_steps: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run the training hooks after optimizer step `step`: (trainable, hooks)."""
        trainable, hooks = dict(trainable), dict(hooks)
        for s in self._hooked(trainable):
            trainable[s.name], hooks[s.name] = method_for(s.config).after_step(
                s.config, s.sites, step, total_steps, trainable[s.name], grads[s.name], extras[s.name],
                hooks[s.name])
        return trainable, hooks

    def with_hook_extras(self, state: AdapterState, hooks: Mapping[str, Any]) -> AdapterState:
        """`state` with each hooked adapter's saved hook values (e.g. AdaLoRA's rank mask) in its extras, for
        export."""
        extras = dict(state["extras"])
        for s in self._hooked(state["trainable"]):
            if s.name in hooks:
                added = method_for(s.config).hook_extras(s.config, s.sites, hooks[s.name])
                extras[s.name] = dict(extras[s.name], modules=merge_paths(extras[s.name]["modules"], added))
        return {"trainable": state["trainable"], "extras": extras}

    # ---- optimizer groups ----------------------------------------------------------------------------
    def lr_groups(self, base_lr: float) -> dict[str, float]:
        """{group: peak lr}: 'default' (base_lr) plus a group per wrapper with its own lr (IMSM's gate_lr)."""
        groups = {"default": base_lr}
        for s in self.adapters:
            if s.wrapper is not None and getattr(s.wrapper, "gate_lr", None):
                groups[f"{s.name}:gate"] = s.wrapper.gate_lr
        return groups

    def param_labels(self, trainable: Mapping[str, Any]) -> Any:
        """The group of every leaf of `trainable` (a tree of strings; see lr_groups)."""
        from jaxpeft.adapters.imsm import GATE_KEY

        groups = self.lr_groups(0.0)

        def label(path, _):
            keys = [getattr(k, "key", None) for k in path]
            name = keys[0]
            if f"{name}:gate" in groups and keys[1:3] == ["shared", GATE_KEY]:
                return f"{name}:gate"
            return "default"

        return jax.tree_util.tree_map_with_path(label, dict(trainable))

    # ---- reporting -----------------------------------------------------------------------------------
    def summary(self, state: AdapterState | None = None) -> str:
        """Every adapted module with its layers and trainable shapes."""
        lines = []
        for s in self.adapters:
            what = s.config.method if s.wrapper is None else f"{s.wrapper.method} over {s.config.method}"
            lines.append(f"adapter {s.name!r} ({what}):")
            group = (state or {}).get("trainable", {}).get(s.name, {})
            tr = group.get("modules", {})
            for t in s.sites:
                node = _get_path(tr, t.flax_module) or {}
                shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(node.items()))
                layers = f"layers {_ranges(t.layers)}" if t.layered else "no layer axis"
                what = (f"{t.n_in}->{t.n_out}" if isinstance(t, ModuleTarget)
                        else f"prefix hook, {t.num_kv_heads}x{t.head_dim} per entry")
                lines.append(f"  {t.hf_module}  [{what}; {layers}]  {shapes}")
            for key, v in sorted(jax.tree_util.tree_flatten_with_path(group.get("shared", {}))[0],
                                 key=lambda kv: jax.tree_util.keystr(kv[0])):
                lines.append(f"  shared {jax.tree_util.keystr(key)} {tuple(v.shape)}")
            for mod in (state or {}).get("trainable", {}).get(s.name, {}).get("saved", {}) or s.config.modules_to_save:
                lines.append(f"  {mod}  (trained in full)")
        return "\n".join(lines)


class _Interceptor:
    """Intercepts Dense.__call__ of targeted modules (adds each active adapter's delta) and PrefixHook.__call__
    of targeted attention layers (returns the active prefix adapters' entries, concatenated)."""

    def __init__(self, specs: Sequence[AdapterSpec], names: tuple[str, ...] | None, adapter_index: jax.Array | None,
                 deterministic: bool, init_mode: bool, capture: bool = False):
        self.by_path: dict[str, list[tuple[int, AdapterSpec, Any]]] = {}
        for s in specs:
            k = names.index(s.name) if names else 0
            for t in s.sites:
                self.by_path.setdefault(t.flax_module, []).append((k, s, t))
        self.adapter_index = adapter_index
        self.deterministic = deterministic
        self.init_mode = init_mode
        self.capture = capture

    def __call__(self, next_fun, args, kwargs, context):
        m = context.module
        if context.method_name != "__call__" or not isinstance(m, (Dense, nn.Dense, PrefixHook)):
            return next_fun(*args, **kwargs)
        hits = self.by_path.get("/".join(m.path))
        if not hits:
            return next_fun(*args, **kwargs)
        if isinstance(m, PrefixHook):
            return self._prefix(m, hits, next_fun(*args, **kwargs), *args)
        return self._dense(m, hits, next_fun(*args, **kwargs), args[0])

    def _dropout(self, rate: float):
        def dropout(z):
            return nn.Dropout(rate)(z, deterministic=self.deterministic) if rate and not self.deterministic else z
        return dropout

    def _rows(self, k: int, ndim: int) -> jax.Array | None:
        if self.adapter_index is None:
            return None
        rows = (self.adapter_index == k).astype(jnp.float32)
        return rows.reshape(rows.shape + (1,) * (ndim - 1))

    def _dense(self, m, hits, base, x):
        kernel = m.get_variable("params", "kernel")
        bias = m.get_variable("params", "bias") if m.use_bias else None
        y = base
        for k, spec, target in hits:
            method = method_for(spec.config)
            col, xcol = trainable_collection(spec.name), extras_collection(spec.name)
            options = target.options
            if self.init_mode:
                extra = {}
                if method.needs_calibration:
                    extra["calibration"] = dict(m.variables.get(calibration_collection(spec.name), {}))
                trainable, extras = method.init(spec.config, options, kernel, bias, m.make_rng("adapter"), **extra)
                extras = dict(extras, layer_mask=jnp.ones((), jnp.float32),
                              scale=jnp.asarray(method.scale(spec.config, options), jnp.float32))
                for key, v in trainable.items():
                    m.put_variable(col, key, v)
                for key, v in extras.items():
                    m.put_variable(xcol, key, v)
            trainable = dict(m.variables.get(col, {}))
            extras = dict(m.variables.get(xcol, {}))
            dropout = self._dropout(getattr(spec.config, "lora_dropout", 0.0))
            delta = method.forward(spec.config, options, x, base, lambda z: _dense(m, z, kernel, bias), kernel,
                                   bias, trainable, extras, extras["scale"], dropout)
            w = extras["layer_mask"].astype(jnp.float32)
            rows = self._rows(k, delta.ndim)
            if rows is not None:
                w = w * rows
            y = y + (w * delta).astype(y.dtype)
        return y

    def _prefix(self, m, hits, base: Prefix | None, x_btd, mask_bt, pool_mask_bt):
        parts = [] if base is None else [base]
        for k, spec, site in hits:
            method = method_for(spec.config)
            col, xcol = trainable_collection(spec.name), extras_collection(spec.name)
            if self.init_mode:
                trainable, extras = method.init_layer(spec.config, site, x_btd, m.make_rng("adapter"))
                extras = dict(extras, layer_mask=jnp.ones((), jnp.float32))
                for key, v in trainable.items():
                    m.put_variable(col, key, v)
                for key, v in extras.items():
                    m.put_variable(xcol, key, v)
                continue  # creating variables needs no entries (and shared ones are not expanded yet)
            trainable = dict(m.variables.get(col, {}))
            extras = dict(m.variables.get(xcol, {}))

            def sow(name, value, m=m, spec=spec):
                if self.capture:
                    m.sow("probes", f"{spec.name}:{name}", value)

            p = method.prefix(spec.config, site, x_btd, mask_bt, pool_mask_bt, trainable, extras,
                              self._dropout(getattr(spec.config, "prefix_dropout", 0.0)), sow)
            visible = p.mask_bl.astype(bool) & (extras["layer_mask"] > 0)
            if self.adapter_index is not None:
                visible = visible & (self.adapter_index == k)[:, None]
            parts.append(p._replace(mask_bl=visible))
        if len(parts) <= 1:
            return parts[0] if parts else None
        return Prefix(jnp.concatenate([q.k_blhd for q in parts], axis=1),
                      jnp.concatenate([q.v_blhd.astype(parts[0].v_blhd.dtype) for q in parts], axis=1),
                      jnp.concatenate([q.mask_bl for q in parts], axis=1))


class _Calibrator:
    """Records `method.calibration_stats` of the inputs of every dense layer adapter `spec` targets (per layer under
    scan, into the 'calibration:<name>' collection) and runs the base layer unchanged."""

    def __init__(self, spec: AdapterSpec):
        self.spec = spec
        self.paths = {t.flax_module for t in spec.targets}

    def __call__(self, next_fun, args, kwargs, context):
        m = context.module
        if (context.method_name == "__call__" and isinstance(m, (Dense, nn.Dense))
                and "/".join(m.path) in self.paths):
            for key, value in method_for(self.spec.config).calibration_stats(args[0]).items():
                m.put_variable(calibration_collection(self.spec.name), key, value)
        return next_fun(*args, **kwargs)


def _dense(m: nn.Module, x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """What the dense layer computes, for methods that rerun the base layer on a changed input ((IA)^3 FF)."""
    dtype = m.dtype or jnp.result_type(x, kernel)
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    return y if bias is None else y + bias.astype(dtype)


def _regularizes(spec: AdapterSpec, placement: str) -> bool:
    method = method_for(spec.config)
    return method.has_regularizer(spec.config) and method.regularizer_placement(spec.config) == placement


def _accepts(module: nn.Module, method: Any, arg: str) -> bool:
    import inspect

    fn = getattr(type(module), method) if isinstance(method, str) else (method or type(module).__call__)
    try:
        return arg in inspect.signature(fn).parameters
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
    """Write the per-layer layer_mask, the scale (alpha_pattern per layer) of dense methods and the method's own
    per-layer values into the stacked extras."""
    extras = jax.tree.map(lambda x: x, _to_dict(extras))
    method = method_for(spec.config)
    for t in spec.sites:
        node = _get_path(extras, t.flax_module)
        if t.layered:
            node["layer_mask"] = jnp.zeros((t.num_layers,), jnp.float32).at[jnp.asarray(t.layers)].set(1.0)
            if isinstance(t, ModuleTarget):
                scales = [method.scale(spec.config, dict(t.layer_options[0]))] * t.num_layers
                for i, opts in zip(t.layers, t.layer_options):
                    scales[i] = method.scale(spec.config, dict(opts))
                node["scale"] = jnp.asarray(scales, jnp.float32)
            node.update(method.layer_extras(spec.config, t))
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
