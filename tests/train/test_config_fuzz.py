"""Fuzzed run configs (issue 13, item 4): hypothesis builds whole run-config dicts, YAML files and `--set KEY=VALUE`
overrides (mostly valid, with mutations: wrong types, out-of-range numbers, unknown keys, typos of keys, unknown
methods, sections that are not mappings, broken YAML) and checks them by validation and an abstract init only.

The properties: `load_config` (which builds the adapter config) accepts a config or raises a documented
`JaxpeftError` (ConfigError, AdapterError, ...), never an uncontrolled exception; an accepted config's
`dump_config` text (each run folder's config.yaml, which a resume reads) loads back to the same config; and an
accepted config's adapter adds to a tiny model of the config's task and dtypes and inits abstractly
(`jax.eval_shape`, as `jaxpeft.train.runner` does before training) or raises a JaxpeftError. The adapter-field
strategies come from tests/adapters/test_config_fuzz.py. Fixed, derandomized example budgets.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import sys
import tempfile
import types
import typing
from pathlib import Path

import annotated_types as at
import jax
import jax.numpy as jnp
import pytest
import yaml
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from jaxpeft.adapters import METHODS, AdaptedModel
from jaxpeft.errors import JaxpeftError
from jaxpeft.loading.convert import unflatten_params
from jaxpeft.models import build_model
from jaxpeft.models.namemap import name_map
from jaxpeft.train.config import ConfigError, RunConfig, dump_config, load_config


def _adapter_fuzz() -> types.ModuleType:
    """The adapter fuzz module (its field strategies and tiny models), loaded by path under its own name."""
    name = "jaxpeft_tests_adapter_config_fuzz"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "adapters" / "test_config_fuzz.py"
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


af = _adapter_fuzz()
VALIDATION_EXAMPLES = int(250 * af.SCALE)
INIT_EXAMPLES = int(80 * af.SCALE)
FUZZ = af.FUZZ
BASE = {"model": {"checkpoint": "tiny/checkpoint"}, "data": {"path": "bundled:arithmetic"}}
_TMP = tempfile.TemporaryDirectory(prefix="jaxpeft-config-fuzz-")
TMP = Path(_TMP.name)

# ------------------------------------------------------------------------------------------ section fields

SECTIONS = {name: f.annotation for name, f in RunConfig.model_fields.items()
            if isinstance(f.annotation, type) and hasattr(f.annotation, "model_fields")}
FIELDS = sorted((s, k) for s, cls in SECTIONS.items() for k in cls.model_fields if s != "adapter")
ALL_KEYS = sorted({k for _, k in FIELDS} | set(RunConfig.model_fields))
STRINGS = ["x", "runs/fuzz", "eval_loss", "label", "train", "", "1e3", "yes", "null", "~", "a: b", "- x", "ünï"]


def _bounds(meta: list[typing.Any]) -> tuple[float | None, float | None, bool, bool]:
    """(low, high, low excluded, high excluded) from a field's annotated-types constraints."""
    lo = hi = None
    lo_open = hi_open = False
    for m in meta:
        if isinstance(m, at.Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, at.Ge):
            lo = m.ge
        elif isinstance(m, at.Lt):
            hi, hi_open = m.lt, True
        elif isinstance(m, at.Le):
            hi = m.le
    return lo, hi, lo_open, hi_open


def _base_type(hint: typing.Any) -> tuple[typing.Any, bool]:
    """(the annotation without None and Annotated, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        inner, _ = _base_type(args[0] if len(args) == 1 else typing.Union[tuple(args)])
        return inner, type(None) in typing.get_args(hint)
    if typing.get_origin(hint) is typing.Annotated:
        return _base_type(typing.get_args(hint)[0])
    return hint, False


def valid_field(section: str, key: str) -> st.SearchStrategy:
    """A value inside the field's documented range (cross-field rules mostly respected)."""
    if (section, key) == ("data", "buckets"):
        return st.sampled_from(["auto", [8, 16, 128], [128, 256]])
    if (section, key) == ("train", "grad_accum"):
        return st.sampled_from([1, 2])
    if (section, key) == ("mesh", "rules"):
        return st.sampled_from([None, {"embed": "fsdp", "heads": ["tensor"], "vocab": None}])
    if (section, key) == ("model", "checkpoint"):
        return st.just("tiny/checkpoint")
    f = SECTIONS[section].model_fields[key]
    hint, optional = _base_type(f.annotation)
    lo, hi, lo_open, hi_open = _bounds(f.metadata)
    if typing.get_origin(hint) is typing.Literal:
        base = st.sampled_from(typing.get_args(hint))
    elif hint is bool:
        base = st.booleans()
    elif hint is int:
        low = int(lo) + lo_open if lo is not None else -4
        base = st.integers(low, low + 64 if section != "mesh" else 1)
    elif hint is float:
        base = st.floats(lo if lo is not None else -10.0, hi if hi is not None else 50.0,
                         exclude_min=lo_open, exclude_max=hi_open)
    elif hint is str:
        base = st.sampled_from(STRINGS)
    elif typing.get_origin(hint) is tuple:
        base = st.lists(st.sampled_from(STRINGS[:5]), max_size=3)
    else:
        base = af.chaos
    return st.one_of(st.none(), base) if optional else base


def out_of_range(section: str, key: str) -> st.SearchStrategy:
    """Boundary and wrong-type values: 0 for gt=0, -1, 1.0 for lt=1, 2**31, NaN, a string for a number, ..."""
    f = SECTIONS[section].model_fields[key]
    lo, hi, _, _ = _bounds(f.metadata)
    edges = [v for v in (lo, hi) if v is not None]
    near = [e + d for e in edges for d in (-1, -0.5, 0, 0.5, 1)]
    return st.sampled_from(near + [2 ** 31 - 1, 2 ** 31, -(2 ** 31) - 1, 10 ** 30, float("nan"), float("inf"),
                                   -1, 0, 2.0, "5", "1e-3", True, None, [], {}, [1, 2]])


def field_value(section: str, key: str, weights: tuple[int, int, int]) -> st.SearchStrategy:
    pick = st.sampled_from([0] * weights[0] + [1] * weights[1] + [2] * weights[2])
    return pick.flatmap(lambda k: (valid_field(section, key), out_of_range(section, key), af.chaos)[k])


def typo(word: str) -> st.SearchStrategy:
    """A near miss of a key: one character dropped, doubled or swapped, a case change, '-' for '_'."""
    def edit(i: int, how: int) -> str:
        i = i % max(len(word), 1)
        return [word[:i] + word[i + 1:], word[:i] + word[i:i + 1] * 2 + word[i + 1:],
                word[:i] + word[i + 1:i + 2] + word[i:i + 1] + word[i + 2:], word.upper(), word.replace("_", "-"),
                word + "s"][how]
    return st.tuples(st.integers(0, 30), st.integers(0, 5)).map(lambda t: edit(*t)).filter(lambda w: w != word)


def adapter_section(weights: tuple[int, int, int]) -> st.SearchStrategy:
    """{'method': ..., fields of that method}: registered methods (mostly), typos, unknown names, non-strings."""
    registered = st.sampled_from(sorted(METHODS))
    wrong = st.one_of(registered.flatmap(typo), st.sampled_from(["", "LoRA", "peft", None, 3, ["lora"]]))
    method = (st.sampled_from([0] * weights[0] + [1] * (weights[1] + weights[2]))
              .flatmap(lambda k: registered if k == 0 else wrong))

    def fields(m):
        if isinstance(m, str) and m in METHODS:
            return af.method_kwargs(m, weights)
        return af.method_kwargs("lora", weights)  # the fields of some method, under a wrong method name

    return method.flatmap(lambda m: fields(m).map(lambda kw: {"method": m, **kw}))


@st.composite
def mutation(draw, raw: dict[str, typing.Any]) -> None:
    """One structural mistake applied to `raw` in place."""
    kind = draw(st.sampled_from(["unknown_key", "typo", "unknown_section", "not_mapping", "drop", "adapter_typo"]))
    section = draw(st.sampled_from(sorted(SECTIONS)))
    node = raw.setdefault(section, {})
    if not isinstance(node, dict):
        return
    if kind == "unknown_key":
        node[draw(st.one_of(st.sampled_from(ALL_KEYS), st.text(max_size=6)))] = draw(af.chaos_scalar)
    elif kind == "typo":
        key = draw(st.sampled_from(sorted(SECTIONS[section].model_fields)))
        node[draw(typo(key))] = node.pop(key, draw(af.chaos_scalar))
    elif kind == "unknown_section":
        raw[draw(st.one_of(st.sampled_from(sorted(SECTIONS)).flatmap(typo), st.text(max_size=6)))] = {"steps": 1}
    elif kind == "not_mapping":
        raw[section] = draw(af.chaos_scalar | st.lists(af.chaos_scalar, max_size=2))
    elif kind == "drop":
        path = draw(st.sampled_from([("model", "checkpoint"), ("model",), ("data",)]))
        parent = raw if len(path) == 1 else raw.get(path[0])
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
    else:
        adapter = raw.setdefault("adapter", {})
        if isinstance(adapter, dict) and len(adapter) > 1:
            key = draw(st.sampled_from(sorted(k for k in adapter if k != "method")))
            adapter[draw(typo(key))] = adapter.pop(key)


@st.composite
def run_config(draw, weights: tuple[int, int, int], max_fields: int, max_mutations: int) -> dict[str, typing.Any]:
    """A whole run-config dict: BASE, some section fields, an adapter section, then a few mutations."""
    raw = copy.deepcopy(BASE)
    for section, key in draw(st.lists(st.sampled_from(FIELDS), max_size=max_fields, unique=True)):
        raw.setdefault(section, {})[key] = draw(field_value(section, key, weights))
    if draw(st.integers(0, 9)) < 8:
        raw["adapter"] = draw(adapter_section(weights))
    if draw(st.booleans()):
        raw["metrics"] = draw(st.one_of(st.none(), st.lists(st.sampled_from(["accuracy", "exact_match", "f1", ""]),
                                                            max_size=2), af.chaos_scalar))
    for _ in range(draw(st.integers(0, max_mutations))):
        draw(mutation(raw))
    return raw


# ------------------------------------------------------------------------------------------ rendering


def to_yaml(value: typing.Any, flow: bool = False) -> str | None:
    """YAML text of a value (None when it holds Python objects YAML cannot write, e.g. a config instance)."""
    try:
        text = yaml.safe_dump(value, default_flow_style=flow, width=10 ** 6, allow_unicode=True, sort_keys=False)
    except yaml.representer.RepresenterError:
        return None
    return text[:-5] if text.endswith("\n...\n") else text


def leaves(raw: dict[str, typing.Any]) -> list[str]:
    return sorted(f"{s}.{k}" for s, node in raw.items() if isinstance(s, str) and isinstance(node, dict)
                  for k in node if isinstance(k, str))


def write(text: str) -> Path:
    path = TMP / "config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return path


@st.composite
def rendered(draw, raw: dict[str, typing.Any], corrupt: bool = True):
    """(source, overrides): the dict itself, its YAML file, the file plus `--set` overrides taken out of it, or
    a corrupted YAML text (truncated, a YAML special character or a random line inserted, random overrides)."""
    forms = ["dict", "yaml", "set"] + (["corrupt", "bad_set", "path"] if corrupt else [])
    form = draw(st.sampled_from(forms))
    if form == "path":  # not a readable config file at all
        return draw(st.one_of(st.sampled_from([str(TMP), str(TMP / "missing.yaml"), "", "x" * 5000, "a\x00b"]),
                              st.text(max_size=10))), []
    if form == "dict" or to_yaml(raw) is None:
        return raw, []
    raw = copy.deepcopy(raw)
    overrides: list[str] = []
    if form in ("set", "bad_set"):
        for path in draw(st.lists(st.sampled_from(leaves(raw) or ["train.steps"]), max_size=3, unique=True)):
            section, key = path.split(".", 1)
            if isinstance(raw.get(section), dict) and key in raw[section]:
                value = to_yaml(raw[section].pop(key), flow=True)
                overrides.append(f"{path}={value.strip() if value is not None else '?'}")
        if form == "bad_set":
            overrides += draw(st.lists(st.one_of(
                st.text(max_size=12), st.sampled_from(["train.steps", "=", "train=", ".=1", "a..b=1", "model=3",
                                                       "model.checkpoint.x=1", "train.steps=[1,", "x={", "y=&a [*a]"]),
                st.tuples(st.sampled_from(leaves(raw) or ["train.steps"]), st.text(max_size=8))
                .map(lambda t: f"{t[0]}={t[1]}")), min_size=1, max_size=2))
    text = to_yaml(raw)
    if form == "corrupt":
        i = draw(st.integers(0, len(text)))
        how = draw(st.sampled_from(["truncate", "char", "line", "tab", "bom"]))
        if how == "truncate":
            text = text[:i]
        elif how == "char":
            text = text[:i] + draw(st.sampled_from(list(":{}[]-\t&*!|>'\"%@`#,?\x00\ud800"))) + text[i:]
        elif how == "line":
            text = text[:i] + "\n" + draw(st.text(max_size=10)) + "\n" + text[i:]
        elif how == "tab":
            text = "\t" + text
        else:
            text = "\ufeff" + text
    return write(text), overrides


# ------------------------------------------------------------------------------------------ properties


def load(source, overrides) -> RunConfig | None:
    """The config, or None after a documented error; anything else propagates (a bug)."""
    try:
        return load_config(source, overrides)
    except JaxpeftError as e:
        assert str(e), "an error must say what is wrong"
        event(type(e).__name__)
        return None


def reloads(cfg: RunConfig) -> None:
    """dump_config's text loads back to an equal config (what a resumed run reads from config.yaml)."""
    path = TMP / "dumped.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    again = load_config(path)
    assert again.model_dump(exclude={"adapter"}) == cfg.model_dump(exclude={"adapter"})
    assert again.adapter_config() == cfg.adapter_config()


_TINY: dict[tuple, typing.Any] = {}


def tiny_for(cfg: RunConfig) -> af.Tiny:
    """A tiny model of the config's task (classification on the tiny BERT, the rest on the tiny llama) with its
    dtypes and layer scan, frozen params abstract in the storage dtype: built once per combination."""
    from jaxpeft.train.tasks import MODEL_TASK

    task = MODEL_TASK[cfg.model.task]
    arch = "llama" if task == "causal_lm" else "bert"
    m = cfg.model
    key = (arch, task, m.dtype, m.param_dtype or m.dtype, m.scan_layers, m.remat)
    if key not in _TINY:
        mcfg = dataclasses.replace(af.tiny_cfg(arch), dtype=m.dtype, param_dtype=m.param_dtype or m.dtype,
                                   scan_layers=m.scan_layers, remat=m.remat)
        dtype = jnp.dtype(mcfg.param_dtype)
        frozen = unflatten_params({e.flax_path: jax.ShapeDtypeStruct(e.shape, dtype) for e in name_map(mcfg, task)})
        _TINY[key] = af.Tiny(AdaptedModel.wrap(build_model(mcfg, task)), frozen)
    return _TINY[key]


def abstract_run_init(cfg: RunConfig) -> None:
    """The adapter part of `runner._context` and `_init_state`, abstractly; JaxpeftError is a documented refusal."""
    adapter_cfg = cfg.adapter_config()
    if getattr(adapter_cfg, "total_step", 0) is None:  # as the runner: AdaLoRA's schedule spans the run
        adapter_cfg = dataclasses.replace(adapter_cfg, total_step=cfg.train.steps)
    t = tiny_for(cfg)
    model = t.model.add("default", adapter_cfg)
    placeholder = model.placeholder_calibration("default")
    calibration = None if placeholder is None else {"default": placeholder}
    state = jax.eval_shape(lambda frozen, rng: model.init(rng, frozen, calibration=calibration), t.frozen,
                           jax.random.key(cfg.train.seed))
    assert jax.tree.leaves(state) or adapter_cfg.method == "full"


@settings(max_examples=VALIDATION_EXAMPLES, **FUZZ)
@given(run_config((5, 3, 2), max_fields=6, max_mutations=2).flatmap(rendered))
@example((BASE, ["train.steps=[1,"]))  # bug: yaml ParserError escaped from --set
@example((BASE, ["train.steps=" + "[" * 2000]))  # bug: RecursionError parsing a deeply nested value
@example(({**BASE, "adapter": {"method": "lora", "r": {"a": 1}}}, []))  # bug: "adapter.'<' not supported ..."
@example(({**BASE, "adapter": {"method": "imsm", "inner": {"method": "lora", "rr": 2}}}, []))  # bug: TypeError text
@example(({**BASE, "adapter": {"method": "imsm", "inner": {"method": ["lora"]}}}, []))  # bug: unhashable list
@example(({**BASE, "adapter": {"method": "lora", "target_modules": "("}}, []))  # bug: re.error at add
@example(({**BASE, "optim": {"lr": float("inf")}}, []))  # bug: an infinite learning rate was accepted
@example(({**BASE, "train": {"seed": -1}}, []))  # bug: accepted, numpy's default_rng refuses it at step 0
@example(({**BASE, "train": {"steps": 2 ** 31}}, []))  # bug: accepted, OverflowError in the jitted lr schedule
@example(({**BASE, "model": {"checkpoint": "1e3"}}, []))  # bug: dumped unquoted, reloaded as the float 1000.0
def test_run_config_validation(case):
    """load_config: accepted (and its dump reloads to the same config) or a JaxpeftError, never anything else."""
    cfg = load(*case)
    if cfg is not None:
        reloads(cfg)


@settings(max_examples=INIT_EXAMPLES, **FUZZ)
@given(run_config((8, 1, 1), max_fields=3, max_mutations=0).flatmap(lambda raw: rendered(raw, corrupt=False)))
@example(({**BASE, "adapter": {"method": "adalora", "tinit": 200}}, []))  # the runner's total_step = train.steps
@example(({**BASE, "model": {"checkpoint": "x", "task": "seq_cls"}, "adapter": {"method": "apt"}}, []))
@example(({**BASE, "model": {"checkpoint": "x", "dtype": "bfloat16", "scan_layers": False},
           "adapter": {"method": "corda", "r": 2}}, []))
@example(({**BASE, "adapter": {"method": "imsm", "inner": {"method": "prefix", "num_virtual_tokens": 2}}}, []))
def test_run_config_abstract_init(case):
    """load_config, then the runner's adapter setup and an abstract init on a tiny model: each stage accepts or
    raises a JaxpeftError."""
    cfg = load(*case)
    if cfg is None:
        return
    try:
        abstract_run_init(cfg)
        event("init ok")
    except JaxpeftError as e:
        assert str(e)
        event("init: " + type(e).__name__)


# ------------------------------------------------------------------------------------------ plain regressions


@pytest.mark.parametrize("source, overrides, fragment", [
    (BASE, ["train.steps=[1,"], "--set 'train.steps=[1,': the value is not valid YAML"),
    (BASE, ["train.steps=" + "[" * 2000], "nested deeper than Python's recursion limit"),
    ({**BASE, "train": {"seed": -1}}, [], "train.seed: Input should be greater than or equal to 0"),
    ({**BASE, "train": {"steps": 2 ** 31}}, [], "train.steps: Value error, 2147483648 does not fit a 32-bit integer"),
    ({**BASE, "optim": {"lr": float("inf")}}, [], "optim.lr: Input should be a finite number"),
    ({**BASE, "adapter": {"method": "lora", "r": {"a": 1}}}, [], "adapter.r={'a': 1}: expected an integer"),
    ({**BASE, "adapter": {"method": "lora", "rank_pattern": {"q_proj": 0}}}, [],
     "adapter.rank_pattern['q_proj']=0: a rank must be an integer >= 1"),
    ({**BASE, "adapter": {"method": "imsm", "inner": {"method": "lora", "rr": 2}}}, [],
     "adapter.inner.rr: not a lora option (did you mean 'r'?)"),
    ({**BASE, "adapter": {"method": "lora", "target_modules": "("}}, [], "adapter.target_modules='(' is not a valid regex"),
])
def test_config_errors_name_the_key(source, overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(source, overrides)
    assert fragment in str(info.value)


def test_config_file_errors(tmp_path):
    """A folder, a name too long, a binary file, a self-referencing YAML alias or dict are ConfigErrors, not
    IsADirectoryError / OSError / UnicodeDecodeError / RecursionError."""
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / ("x" * 5000))
    loop = copy.deepcopy(BASE)
    loop["train"] = loop
    with pytest.raises(ConfigError, match="nests too deeply or contains itself"):
        load_config(loop)
    (tmp_path / "bin.yaml").write_bytes(b"model: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_config(tmp_path / "bin.yaml")
    (tmp_path / "self.yaml").write_text("model: {checkpoint: x}\ndata: {path: p}\n"
                                        "adapter: &a {method: imsm, inner: *a}\n")
    with pytest.raises(ConfigError, match="IMSM cannot wrap 'imsm'"):
        load_config(tmp_path / "self.yaml")


def test_dumped_config_quotes_exponent_strings(tmp_path):
    cfg = load_config({"model": {"checkpoint": "1e3"}, "data": {"path": "5e-2"}})
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg
