"""Fuzzed adapter configs (issue 13, item 4): hypothesis builds `cls(**kwargs)` for every registered method with
random field values (plausible ones, and None / negative / huge / NaN / strings / lists / dicts), then adds the
adapter to a tiny decoder and a tiny encoder and runs its init abstractly (`jax.eval_shape`, never any training).

The property: construction, `AdaptedModel.add` and the abstract init either succeed or raise a documented
`JaxpeftError` (AdapterError, UnsupportedError, ...), never an uncontrolled exception (TypeError, re.error,
KeyError, an XLA shape error, ...). A config that constructs is hashable (configs are static jit arguments) and
survives the native format's JSON round trip. Fixed example budgets, derandomized: the same examples every run.
Every bug the fuzzer found is pinned by an `@example` or a plain regression test below.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing

import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from jaxpeft.adapters import METHODS, AdaptedModel, AdapterConfig, IMSMConfig, LoraConfig
from jaxpeft.adapters.native_io import config_dict, config_from_dict
from jaxpeft.errors import AdapterError, JaxpeftError
from jaxpeft.loading.convert import unflatten_params
from jaxpeft.models import ModelConfig, build_model
from jaxpeft.models.namemap import name_map

# the suite's fixed budget; JAXPEFT_FUZZ_SCALE=20 JAXPEFT_FUZZ_RANDOM=1 hunts longer with fresh examples
SCALE = float(os.environ.get("JAXPEFT_FUZZ_SCALE", "1"))
VALIDATION_EXAMPLES = int(300 * SCALE)
INIT_EXAMPLES = int(80 * SCALE)
FUZZ = dict(deadline=None, derandomize=not os.environ.get("JAXPEFT_FUZZ_RANDOM"), database=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------------ tiny models


def tiny_cfg(arch: str) -> ModelConfig:
    """2 layers, hidden 32 (GQA for llama): the same shapes as adapter_fixtures.small_cfg, without HF imports."""
    return ModelConfig(arch=arch, vocab_size=61, hidden_size=32, num_layers=2, num_heads=4,
                       num_kv_heads=2 if arch == "llama" else 4, head_dim=8, intermediate_size=48,
                       max_position_embeddings=64, norm_eps=1e-5, hidden_act="silu" if arch == "llama" else "gelu",
                       tie_word_embeddings=False, pad_token_id=0)


class Tiny(typing.NamedTuple):
    model: AdaptedModel
    frozen: typing.Any
    """The base params as ShapeDtypeStructs (from the name map: no weights are ever allocated)."""


def tiny(arch: str, task: str) -> Tiny:
    cfg = tiny_cfg(arch)
    frozen = unflatten_params({e.flax_path: jax.ShapeDtypeStruct(e.shape, jnp.float32) for e in name_map(cfg, task)})
    return Tiny(AdaptedModel.wrap(build_model(cfg, task)), frozen)


_TINY: dict[tuple[str, str], Tiny] = {}


def tiny_model(arch: str, task: str) -> Tiny:
    """Built once per (arch, task) for the whole module (hook sites and the name map are traced once)."""
    if (arch, task) not in _TINY:
        _TINY[(arch, task)] = tiny(arch, task)
    return _TINY[(arch, task)]


def abstract_init(t: Tiny, cfg: AdapterConfig, name: str = "default") -> typing.Any:
    """What `jaxpeft.train.runner` does before training, abstractly: add, calibration placeholders (CorDA), init."""
    model = t.model.add(name, cfg)
    placeholder = model.placeholder_calibration(name)
    calibration = None if placeholder is None else {name: placeholder}
    return jax.eval_shape(lambda frozen, rng: model.init(rng, frozen, calibration=calibration), t.frozen,
                          jax.random.key(0))


def module_suffixes() -> list[str]:
    """Real target names of both tiny models: last one and two components of every dense module path."""
    out = set()
    for arch, task in (("llama", "causal_lm"), ("bert", "seq_cls")):
        for m in tiny_model(arch, task).model.modules:
            parts = [p for p in m.hf_module.split(".") if p != "{i}"]
            out.update({parts[-1], ".".join(parts[-2:])})
    return sorted(out)


# ------------------------------------------------------------------------------------------ strategies

HUGE_INTS = (2 ** 31 - 1, 2 ** 31, 2 ** 40, 2 ** 63, 2 ** 64, -(2 ** 63), 10 ** 30)
chaos_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from(HUGE_INTS),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-1.5, 0.5, 1e30, -0.0]),
    st.text(max_size=6), st.sampled_from(["", "l", "8", "none", "null", "True", "(", "[a-", "*", ".*", "q_proj"]))
chaos = st.recursive(chaos_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.text(max_size=4), st.integers(-2, 2)), inner,
                                                 max_size=2)), max_leaves=5)
"""Any JSON/YAML-like value: the wrong type for most fields."""

# the string choices the methods document, plus near misses
CHOICES: dict[str, list[typing.Any]] = {
    "init_lora_weights": [True, False, "gaussian", "pissa", "Gaussian", 1, 0.0],
    "truncation": ["hf", "official", "HF", "paper"], "ortho_mode": ["paper_rxr", "code_nxn", "rxr"],
    "reduction": ["sum", "mean", "max"], "preset": [None, "kasa_hf", "kasa_official", "kasa"],
    "corda_method": ["ipm", "kpm", "IPM", "lpm"], "init_weights": ["normal", "zero", "zeros", "uniform"],
    "position_offset": ["l", 0, 1, "0", False, -1], "pool": ["mean_nonpad", "first", "last", "mean", "max"],
    "gate_init": ["zeros", "normal", "zero"], "gate_on": ["kv", "v", "k", "qkv"],
}
RANKISH = {"r", "init_r", "target_r", "r_top", "gate_rank", "num_virtual_tokens", "token_dim",
           "encoder_hidden_size", "niter", "calibration_samples", "total_step", "tinit", "tfinal", "deltaT"}


def hints(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def init_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def targets() -> st.SearchStrategy:
    """target_modules / exclude_modules: suffix lists (real names, near misses, junk) or one regex (valid or not)."""
    names = st.one_of(st.sampled_from(module_suffixes()), st.sampled_from(["q_proj", "qproj", "mlp", "layers.0.x", ""]),
                      st.text(max_size=8))
    regexes = st.sampled_from([r".*\.(q|v)_proj", r"model\.layers\.\d+\.self_attn\.q_proj", r".*query", ".*",
                               "q_proj", "(", "[", r".*\.(q|v", "a{2,1}", "*q", r"bert\.encoder\.layer\.0\..*"])
    return st.one_of(st.none(), st.lists(names, max_size=4), regexes, st.frozensets(names, max_size=2))


def patterns(value: st.SearchStrategy) -> st.SearchStrategy:
    """rank_pattern / alpha_pattern: {pattern: value} mappings (or lists of pairs) over real and broken regexes."""
    pat = st.one_of(st.sampled_from(module_suffixes()), st.sampled_from(["q_proj", r"layers\.0\..*", "(", "*", "", "v"]),
                    st.text(max_size=5))
    return st.one_of(st.dictionaries(pat, value, max_size=3), st.lists(st.tuples(pat, value).map(list), max_size=2))


def plausible(name: str, hint: typing.Any) -> st.SearchStrategy:
    """A value of roughly the right type for one field: mostly valid, sometimes out of range."""
    if name in CHOICES:
        return st.sampled_from(CHOICES[name])
    if name in ("target_modules", "exclude_modules", "feedforward_modules"):
        return targets()
    if name == "layers_to_transform":
        return st.one_of(st.none(), st.integers(-1, 2), st.lists(st.integers(-2, 3), max_size=3),
                         st.sampled_from([[], [0, 0], [1, 0], [2], 5]))
    if name == "prefix_lengths":
        return st.one_of(st.none(), st.lists(st.integers(-1, 4), max_size=3))
    if name == "rank_pattern":
        return patterns(st.one_of(st.integers(-1, 6), st.sampled_from([True, 2.0, "4", None])))
    if name == "alpha_pattern":
        return patterns(st.one_of(st.floats(-4, 64), st.integers(0, 32), st.sampled_from([float("nan"), "8", None])))
    if name == "modules_to_save":
        return st.one_of(st.lists(st.sampled_from(["classifier", "lm_head", "embed_tokens", "pooler", "x", ""]),
                                  max_size=2), st.sampled_from(["classifier", 3]))
    if name == "inner":
        return inner_configs()
    hint_args = set(typing.get_args(hint)) | {hint}
    if name in RANKISH or int in hint_args:
        return st.one_of(st.integers(1, 6), st.integers(-2, 40), st.none())
    if bool in hint_args:
        return st.booleans()
    if float in hint_args:
        return st.one_of(st.floats(0, 1), st.floats(-1, 2), st.integers(0, 16), st.none())
    return chaos


FLOAT_RANGES = {"lora_alpha": (0.5, 64.0), "beta1": (0.01, 0.99), "beta2": (0.01, 0.99), "top_ratio": (0.05, 0.95),
                "fixed_gate": (0.0, 1.0), "init_std": (0.01, 2.0), "gate_init_std": (0.01, 2.0),
                "lambda_init": (-1.0, 2.0), "gate_lr": (1e-4, 1e-2)}
INT_RANGES = {"tinit": (0, 3), "tfinal": (0, 3), "deltaT": (1, 3), "niter": (0, 4), "total_step": (10, 100),
              "calibration_samples": (1, 32), "token_dim": (1, 16), "encoder_hidden_size": (1, 16)}


def valid(name: str, hint: typing.Any) -> st.SearchStrategy:
    """A value inside the field's documented range (a config of such values should usually init)."""
    real = st.sampled_from(["q_proj", "v_proj", "down_proj", "query", "value", "self_attn.q_proj", "output.dense"])
    if name in CHOICES:
        return st.sampled_from([v for v in CHOICES[name] if v in VALID_CHOICES[name]])
    if name == "target_modules":
        return st.one_of(st.none(), st.lists(real, min_size=1, max_size=2), st.just(r".*\.(q|v)_proj|.*\.query"))
    if name in ("exclude_modules", "feedforward_modules"):
        return st.one_of(st.none(), st.lists(real, max_size=1))
    if name == "layers_to_transform":
        return st.one_of(st.none(), st.sampled_from([[0], [1], [0, 1], 1]))
    if name == "prefix_lengths":
        return st.one_of(st.none(), st.lists(st.integers(0, 3), min_size=2, max_size=2).filter(lambda v: max(v) > 0))
    if name == "rank_pattern":
        return st.dictionaries(real, st.integers(1, 4), max_size=2)
    if name == "alpha_pattern":
        return st.dictionaries(real, st.floats(1, 32), max_size=2)
    if name == "modules_to_save":
        return st.sampled_from([[], ["lm_head"], ["classifier"]])
    if name == "inner":
        return st.sampled_from(["lora", "dora", "kasa", "pissa", "corda", "ia3", "prefix", "apt", "adalora"]).flatmap(
            lambda m: method_kwargs(m, (1, 0, 0), max_fields=2).map(lambda kw: {"method": m, **kw}))
    hint_args = set(typing.get_args(hint)) | {hint}
    if name in INT_RANGES:
        return st.integers(*INT_RANGES[name])
    if name in RANKISH or int in hint_args:
        return st.integers(1, 6)
    if bool in hint_args:
        return st.booleans()
    if float in hint_args:
        lo, hi = FLOAT_RANGES.get(name, (0.0, 0.9))
        return st.floats(lo, hi)
    return plausible(name, hint)


VALID_CHOICES = {"init_lora_weights": [True, False, "gaussian"], "truncation": ["hf", "official"],
                 "ortho_mode": ["paper_rxr", "code_nxn"], "reduction": ["sum", "mean"],
                 "preset": [None, "kasa_hf", "kasa_official"], "corda_method": ["ipm", "kpm"],
                 "init_weights": ["normal", "zero"], "position_offset": ["l", 0], "pool": ["mean_nonpad", "first", "last"],
                 "gate_init": ["zeros", "normal"], "gate_on": ["kv", "v"]}


def field_value(name: str, hint: typing.Any, weights: tuple[int, int, int]) -> st.SearchStrategy:
    """weights: (valid, plausible, chaos) odds of a value inside the field's range, of roughly the right type
    (sometimes out of range), or of anything at all."""
    pick = st.sampled_from([0] * weights[0] + [1] * weights[1] + [2] * weights[2])
    return pick.flatmap(lambda k: (valid, plausible, lambda *_: chaos)[k](name, hint))


def method_kwargs(method: str, weights: tuple[int, int, int], max_fields: int = 5) -> st.SearchStrategy:
    cls = METHODS[method].config_cls
    h = hints(cls)
    return st.lists(st.sampled_from(init_fields(cls)), max_size=max_fields, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: field_value(k, h[k], weights) for k in keys}))


def inner_configs() -> st.SearchStrategy:
    """IMSM's inner: a mapping with its own method (a registered one, imsm itself, a typo, none), or a config."""
    names = st.one_of(st.sampled_from(sorted(METHODS)), st.sampled_from(["lorra", "", None, 3]))

    def mapping(name):
        if isinstance(name, str) and name in METHODS and name != "imsm":
            kw = method_kwargs(name, (4, 4, 2), max_fields=2)
        else:
            kw = st.dictionaries(st.sampled_from(["r", "rr", "lora_alpha"]), chaos, max_size=1)
        return kw.map(lambda d: {"method": name, **d} if name is not None else d)

    return st.one_of(names.flatmap(mapping), st.just(LoraConfig(r=2)), st.just(IMSMConfig(inner=LoraConfig())), chaos)


def adapter_case(weights: tuple[int, int, int]) -> st.SearchStrategy:
    """(method, kwargs) for `METHODS[method].config_cls(**kwargs)`; weights as in `field_value`."""
    return st.sampled_from(sorted(METHODS)).flatmap(lambda m: st.tuples(st.just(m), method_kwargs(m, weights)))


# ------------------------------------------------------------------------------------------ the property


def construct(method: str, kwargs: dict[str, typing.Any]) -> AdapterConfig | None:
    """The config, or None after a documented error; anything else propagates (a bug)."""
    try:
        cfg = METHODS[method].config_cls(**kwargs)
    except JaxpeftError as e:
        assert str(e), "an error must say what is wrong"
        event("construction: " + type(e).__name__)
        return None
    hash(cfg)  # static jit argument
    assert cfg.method == method
    return cfg


def check_init(cfg: AdapterConfig) -> None:
    """add + abstract init on the tiny decoder and, for anything but IMSM (decoders only), the tiny encoder."""
    cases = [("llama", "causal_lm")] + ([("bert", "seq_cls")] if cfg.method != "imsm" else [])
    for arch, task in cases:
        try:
            abstract_init(tiny_model(arch, task), cfg)
            event(f"{arch}: init ok")
        except JaxpeftError as e:
            assert str(e)
            event(f"{arch}: " + type(e).__name__)


@settings(max_examples=VALIDATION_EXAMPLES, **FUZZ)
@given(adapter_case((3, 3, 4)))
@example(("lora", {"r": "8"}))  # bug: TypeError ('<' between str and int) instead of AdapterError
@example(("lora", {"target_modules": 5}))  # bug: accepted, then TypeError when targets were matched
@example(("lora", {"target_modules": "("}))  # bug: re.error when targets were matched
@example(("lora", {"layers_to_transform": ["a"]}))  # bug: accepted, TypeError comparing 'a' with 0
@example(("lora", {"rank_pattern": {"q_proj": -2}}))  # bug: accepted, XLA shape error at init
@example(("lora", {"rank_pattern": [["q_proj", 2]]}))  # bug: kept as an unhashable list
@example(("lora", {"rank_pattern": {"(": 2}}))  # bug: re.error at add
@example(("lora", {"lora_alpha": float("nan")}))  # bug: accepted, a NaN adapter scale
@example(("ptuning_v2", {"prefix_lengths": [True]}))  # bug: a bool accepted as a length
@example(("imsm", {"inner": {"method": "lora", "x": 1}}))  # bug: TypeError (unexpected keyword) from the inner class
@example(("imsm", {"inner": {"method": ["lora"]}}))  # bug: TypeError (unhashable list) looking the method up
@example(("lora", {"init_lora_weights": 1}))  # 1 == True: must not pass as a bool
def test_adapter_config_construction(case):
    """Construction only, many examples: accepted (hashable, JSON round trip exact) or a JaxpeftError."""
    method, kwargs = case
    cfg = construct(method, kwargs)
    if cfg is not None:
        again = config_from_dict(method, json.loads(json.dumps(config_dict(cfg))))
        assert again == cfg


@settings(max_examples=INIT_EXAMPLES, **FUZZ)
@given(adapter_case((7, 2, 1)))
@example(("lora", {"r": 2 ** 63}))  # bug: accepted, TypeError (shape not an integer type) building the factor
@example(("lora", {"rank_pattern": {"q_proj": 2 ** 63}}))  # bug: the same through a rank pattern
@example(("ptuning_v2", {"prefix_lengths": [2 ** 63 - 1, 1]}))  # bug: OverflowError (int32) building the slot mask
@example(("apt", {"num_virtual_tokens": 2 ** 31}))  # bug: OverflowError (int32) at init
@example(("pissa", {"r": 2, "niter": 10 ** 6}))  # bug: accepted, the init unrolled a million QR iterations (hang)
@example(("adalora", {"tinit": 2 ** 40, "total_step": 2 ** 41}))  # a step count beyond int32
@example(("apt", {"num_virtual_tokens": 2 ** 31 - 1}))  # the largest accepted size still inits abstractly
@example(("corda", {"r": 3, "target_modules": ["q_proj"]}))
@example(("imsm", {"inner": {"method": "apt", "num_virtual_tokens": 2}}))
@example(("prefix", {"prefix_projection": True, "layers_to_transform": [1]}))
@example(("full", {"modules_to_save": ["classifier"]}))
@example(("prefix", {"layers_to_transform": []}))  # bug: accepted, TypeError (float32 indexer) at init
@example(("apt", {"layers_to_transform": [1, 1, 0]}))
def test_adapter_config_abstract_init(case):
    """Construction, add and abstract init on the tiny models: accepted or a JaxpeftError at each stage."""
    cfg = construct(*case)
    if cfg is not None:
        check_init(cfg)


# ------------------------------------------------------------------------------------------ plain regressions


@pytest.mark.parametrize("kwargs, fragment", [
    ({"r": "8"}, "r='8': expected an integer"),
    ({"r": True}, "r=True: expected an integer"),
    ({"lora_dropout": float("inf")}, "lora_dropout=inf: expected a finite number"),
    ({"target_modules": 5}, "target_modules=5: expected a list of strings or a string or null"),
    ({"target_modules": ["q_proj", 3]}, "target_modules=('q_proj', 3)"),
    ({"exclude_modules": "[a-"}, "exclude_modules='[a-' is not a valid regex"),
    ({"layers_to_transform": [0.5]}, "layers_to_transform=(0.5,): expected a list of integers or null"),
    ({"layers_to_transform": []}, "layers_to_transform=[]: selects no layer"),
    ({"modules_to_save": "classifier"}, "modules_to_save='classifier': expected a list of strings"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj']=0: a rank must be an integer >= 1"),
    ({"rank_pattern": {3: 4}}, "rank_pattern: pattern 3 is not a string"),
    ({"rank_pattern": "q_proj"}, "rank_pattern='q_proj': expected a mapping {module pattern: rank}"),
    ({"alpha_pattern": {"q_proj": "8"}}, "alpha_pattern['q_proj']='8': an alpha must be a finite number"),
    ({"alpha_pattern": {"*": 8}}, "alpha_pattern='*' is not a valid regex"),
])
def test_field_errors_name_the_field(kwargs, fragment):
    with pytest.raises(AdapterError) as info:
        LoraConfig(**kwargs)
    assert fragment in str(info.value)


def test_yaml_forms_are_normalised_to_hashable_tuples():
    cfg = LoraConfig(target_modules=["q_proj"], layers_to_transform=1, rank_pattern=[["q_proj", 4]],
                     alpha_pattern={"q_proj": 16}, modules_to_save=["lm_head"])
    assert (cfg.target_modules, cfg.layers_to_transform, cfg.rank_pattern, cfg.alpha_pattern,
            cfg.modules_to_save) == (("q_proj",), (1,), (("q_proj", 4),), (("q_proj", 16),), ("lm_head",))
    hash(cfg)
    ia3 = METHODS["ia3"].config_cls(target_modules={"q_proj", "down_proj"}, feedforward_modules={"down_proj"})
    assert (ia3.target_modules, ia3.feedforward_modules) == (("down_proj", "q_proj"), ("down_proj",))


@pytest.mark.parametrize("inner, fragment", [
    ({"method": "lora", "rr": 2}, "inner.rr: not a lora option (did you mean 'r'?)"),
    ({"method": ["lora"]}, "inner.method=['lora']"),
    ({"method": "lorra"}, "did you mean 'lora'?"),
    ({"method": "lora", "r": "x"}, "inner.r='x': expected an integer"),
    ({"method": "lora", "r": 0}, "inner.r=0: the LoRA rank must be >= 1"),
])
def test_imsm_inner_errors_name_the_inner_key(inner, fragment):
    with pytest.raises(AdapterError) as info:
        IMSMConfig(inner=inner)
    assert fragment in str(info.value)


def test_every_method_default_config_inits_abstractly():
    """The fuzzer's baseline: each method's defaults (IMSM around LoRA) add and init on the tiny decoder."""
    for name, method in sorted(METHODS.items()):
        cfg = method.config_cls(inner={"method": "lora"}) if name == "imsm" else method.config_cls()
        state = abstract_init(tiny_model("llama", "causal_lm"), cfg)
        leaves = jax.tree.leaves(state)
        assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves), name
        assert all(math.prod(x.shape) < 10 ** 6 for x in leaves)
