"""The bad-input catalogue (issue 13, item 3): every wrong file, config or dataset a user can hand the `jaxpeft`
command line ends in one short `error: ...` naming the problem and the fix, exit code 2, no Python traceback, and
nothing saved before is touched.

Each case is one test: it builds its bad input in its own folder (copies of tiny checkpoints, adapters, datasets
and one small run folder built once per module), runs `jaxpeft.cli.main([...])` in-process and checks

* the exit code is `jaxpeft.errors.EXIT_USER_ERROR` (2);
* stderr starts with `error:` (a training run may print its progress lines first) and neither stream holds
  `Traceback`;
* the message holds the fragments that name the problem AND the fix (at least two per case);
* every file that existed before under the case's saved folders (run folder, adapter, checkpoint, dataset) has the
  same bytes afterwards (`_hashes`).

Only one case compiles a training step (the NaN/inf loss); its run folder, which holds committed checkpoints from
before the divergence, is the "previously saved run" the checkpoint cases copy and damage. Every other case fails
before any step is compiled.

`JAXPEFT_CATALOGUE_OUT=FILE` makes each case append `{"id", "command", "input", "message"}` (JSON lines, paths
shortened to placeholders such as RUN/ or ADAPTER/) to FILE; `python tests/test_cli_catalogue.py FILE` turns such a
file into the table of docs/reliability_catalogue.md, and `test_every_case_is_in_the_docs` keeps that page in step
with the cases.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DOC = REPO / "docs" / "reliability_catalogue.md"
OUT_ENV = "JAXPEFT_CATALOGUE_OUT"


def _load(name: str, path: Path):
    """A test helper module loaded from its file under a private name (tests/ has no packages)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# the tiny checkpoints, synthetic data and config builder of the training tests (fixtures re-exported here)
_train = _load("_catalogue_train_conftest", TESTS / "train" / "conftest.py")
tiny_llama_dir = _train.tiny_llama_dir
tiny_bert_dir = _train.tiny_bert_dir
arith_dir = _train.arith_dir
write_jsonl = _train.write_jsonl
build_config = _train.build_config
_private_datasets_cache = _train._private_datasets_cache


@pytest.fixture(autouse=True, scope="module")
def _no_progress_bars():
    """`datasets` draws "Generating split" bars on stderr; the catalogue checks that stderr starts with the error."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    yield
    if was_enabled:
        datasets.enable_progress_bars()


@pytest.fixture(autouse=True, scope="module")
def _compilation_cache(tmp_path_factory):
    """Most cases fail after the adapter's init is compiled (the same small program each time): a module-wide
    persistent compilation cache turns every compile after the first into a read (the setting is restored after)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    from jaxpeft.train.compile_cache import enable_compilation_cache

    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    enable_compilation_cache(tmp_path_factory.mktemp("xla-cache"), min_compile_secs=0)
    yield
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


# ------------------------------------------------------------------------------------------ what one case runs

class Ran(NamedTuple):
    """A CLI run made once for several cases (the divergence run): its exit code and streams."""

    rc: int
    out: str
    err: str


def _main(argv: list[str]) -> Ran:
    """`jaxpeft.cli.main(argv)` with both streams captured (for module fixtures; cases use capsys)."""
    from jaxpeft.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return Ran(rc, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _plain_python_hooks():
    """Python's own unraisable-exception and thread-exception hooks, which print to stderr as in a real `jaxpeft`
    process (pytest replaces both with hooks that turn such output into warnings, hiding it from capsys)."""
    import gc
    import threading

    saved = sys.unraisablehook, threading.excepthook
    sys.unraisablehook, threading.excepthook = sys.__unraisablehook__, threading.__excepthook__
    try:
        yield
        gc.collect()  # what a finished process would report about objects dropped with an exception pending
    finally:
        sys.unraisablehook, threading.excepthook = saved


def _hashes(paths: list[Path]) -> dict[str, str]:
    """{file path: sha256} of every file under the given files and folders."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    return dst


def _truncate(path: Path, keep: float | int = 0.5) -> None:
    """Cut `path` to a fraction (float) or a number of bytes (int) of itself."""
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])


def _edit_json(path: Path, **changes: Any) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d, indent=2))


def _edit_tensors(path: Path, fn: Callable[[dict], None]) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


class Env:
    """What the cases share, each built on first use: tiny checkpoints, adapters made with the library, and one run
    folder (the divergence run). Cases copy these before damaging anything; they are protected in every case."""

    def __init__(self, root: Path, llama: Path, bert: Path, arith: Path, build_config: Callable):
        self.root, self.llama, self.bert, self.arith, self._build = root, llama, bert, arith, build_config

    def masters(self) -> list[Path]:
        """The shared inputs built so far (every case checks they are unchanged)."""
        built = [v for k, v in self.__dict__.items() if k in _MASTERS]
        return [self.llama, self.bert, self.arith] + [p.path if isinstance(p, DivergedRun) else p for p in built]

    def placeholders(self) -> list[tuple[str, str]]:
        out = [(str(self.llama), "LLAMA"), (str(self.bert), "BERT"), (str(self.arith), "DATA")]
        return out + [(str(self.root), "TMP")]

    def config(self, patch: dict | None = None, adapter: dict | None = None) -> dict:
        cfg = self._build(patch or {})
        if adapter is not None:
            cfg["adapter"] = adapter
        return cfg

    @functools.cached_property
    def llama_other_base(self) -> Path:
        """The tiny llama with one weight changed: the same architecture and sizes, another fingerprint."""
        folder = _copy(self.llama, self.root / "llama-other-base")

        def bump(t):
            t["model.norm.weight"] = t["model.norm.weight"] + 1.0

        _edit_tensors(folder / "model.safetensors", bump)
        return folder

    def _adapter(self, folder: str, config: Any, fmt: str) -> Path:
        import jax
        import numpy as np

        from jaxpeft.adapters import AdaptedModel
        from jaxpeft.adapters.native_io import save_adapter
        from jaxpeft.adapters.peft_io import export_peft
        from jaxpeft.loading.pretrained import load_pretrained

        pre = load_pretrained(str(self.llama))
        model = AdaptedModel.wrap(pre.module).add("default", config)
        state = model.init(jax.random.key(0), pre.params)
        state = jax.tree.map(lambda x: x + 0.01 if x.dtype == np.float32 else x, state)  # a non-zero delta
        save = export_peft if fmt == "peft" else save_adapter
        return save(model, state, "default", self.root / folder, base_model_name_or_path="tiny-llama")

    @functools.cached_property
    def peft_lora(self) -> Path:
        """A Hugging Face PEFT LoRA folder (r=4 on q_proj/v_proj) for the tiny llama."""
        from jaxpeft.adapters.lora import LoraConfig

        return self._adapter("peft-lora", LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj")), "peft")

    @functools.cached_property
    def peft_prefix(self) -> Path:
        """A Hugging Face PEFT PREFIX_TUNING folder (4 virtual tokens) for the tiny llama."""
        from jaxpeft.adapters.prefix import PrefixTuningConfig

        return self._adapter("peft-prefix", PrefixTuningConfig(num_virtual_tokens=4), "peft")

    @functools.cached_property
    def native_lora(self) -> Path:
        """The LoRA adapter in the jaxpeft format (records the architecture it was made for)."""
        from jaxpeft.adapters.lora import LoraConfig

        return self._adapter("native-lora", LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj")),
                             "jaxpeft")

    @functools.cached_property
    def gguf(self) -> Path:
        """A tiny llama GGUF written the way llama.cpp converts one (tests/loading/test_gguf.py)."""
        writer = _load("_catalogue_test_gguf", TESTS / "loading" / "test_gguf.py")
        path = self.root / "gguf" / "tiny-llama.gguf"
        path.parent.mkdir()
        writer.write_tiny_gguf(path, "llama")
        return path

    @functools.cached_property
    def diverged(self) -> "DivergedRun":
        """`jaxpeft train` with an absurd learning rate: the warm-up's first step (lr 0) and second (lr 1.5e38)
        are finite and checkpointed, the third overflows float32. Run once; the NaN case reports it and the
        checkpoint cases copy its run folder (config.yaml, metrics, checkpoints/1 and 2)."""
        path = self.root / "diverged"
        cfg = self.config(_train._deep_update(DIVERGE, {"train": {"output_dir": str(path)}}))
        config = _write_yaml(self.root / "diverged.yaml", cfg)
        ran = _main(["train", str(config)])
        steps = sorted(int(p.name) for p in (path / "checkpoints").iterdir() if p.name.isdigit()) \
            if (path / "checkpoints").is_dir() else []
        assert len(steps) >= 2, f"premise: the divergence run should leave 2 checkpoints, got {steps}: {ran.err}"
        return DivergedRun(path, config, ran, steps)


DIVERGE = {"optim": {"lr": 3e38, "clip_norm": None, "warmup_steps": 2, "schedule": "constant"},
           "model": {"remat": "none", "scan_layers": False},  # the cheapest training step to compile
           "adapter": {"lora_dropout": 0.0},
           "train": {"steps": 8, "checkpoint_every": 1, "keep_last": 8, "prefetch": 0}}
"""The divergence run's config patch (its run folder's checkpoints are what the checkpoint cases read)."""

_MASTERS = ("llama_other_base", "peft_lora", "peft_prefix", "native_lora", "gguf", "diverged")


@dataclasses.dataclass(frozen=True)
class DivergedRun:
    path: Path
    config: Path
    ran: Ran
    steps: list[int]


def _write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_llama_dir, tiny_bert_dir, arith_dir, build_config) -> Env:
    return Env(tmp_path_factory.mktemp("catalogue"), tiny_llama_dir, tiny_bert_dir, arith_dir, build_config)


class Ctx:
    """One case's folder, the saved things it must leave intact, and the placeholders its paths print as."""

    def __init__(self, env: Env, tmp: Path):
        self.env, self.tmp = env, tmp
        self.protected: list[Path] = []
        self.names: list[tuple[str, str]] = []

    def name(self, path: Path, label: str) -> Path:
        """Show `path` as `label` in the catalogue's command and message columns."""
        self.names.append((str(path), label))
        return path

    def protect(self, path: Path, label: str | None = None) -> Path:
        """Every file under `path` must have the same bytes after the command (it existed before)."""
        self.protected.append(path)
        return self.name(path, label) if label else path

    def copy(self, src: Path, label: str) -> Path:
        """A copy of a shared input in the case folder (to be damaged), shown as `label`."""
        return self.name(_copy(src, self.tmp / label.lower().strip("/")), label)

    def config(self, patch: dict | None = None, adapter: dict | None = None, output: str = "OUT") -> Path:
        """The run config YAML (defaults: tests/train/conftest.py build_config) written as CONFIG.yaml; its
        train.output_dir is a fresh folder shown as OUT/ unless the patch names one."""
        base = {"train": {"output_dir": str(self.name(self.tmp / "out", output))}}
        cfg = self.env.config(_train._deep_update(base, patch or {}), adapter)
        return self.name(_write_yaml(self.tmp / "config.yaml", cfg), "CONFIG.yaml")

    def data(self, rows_or_text: list | str, split: str = "validation", train: list | None = None) -> Path:
        """A data folder (shown as DATA/) whose `split` file holds the given rows (or raw text), plus training
        rows (default: the arithmetic ones)."""
        folder = self.name(self.tmp / "data", "DATA")
        if isinstance(rows_or_text, str):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}.jsonl").write_text(rows_or_text)
        else:
            _train._write_jsonl(folder / f"{split}.jsonl", rows_or_text)
        if split != "train":
            _train._write_jsonl(folder / "train.jsonl", train if train is not None else _train._arith_rows(8, 1))
        return self.protect(folder)

    def shorten(self, text: str) -> str:
        """`text` with every known path replaced by its placeholder (longest paths first)."""
        pairs = sorted(self.names + self.env.placeholders(), key=lambda p: -len(p[0]))
        for path, label in pairs:
            text = text.replace(path + "/", label.rstrip("/") + "/").replace(path, label)
        return text


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    input: str
    """One line: the bad input."""
    build: Callable[[Ctx], list | Ran]
    """Makes the inputs in ctx.tmp and returns the argv after `jaxpeft` (or a Ran made once for several cases)."""
    expect: tuple[str, ...]
    """Fragments of the message: the problem and the fix."""
    xfail: str | None = None
    """Why this case fails today: the change it needs in a file outside this module's reach."""
    strict: bool = True


CASES: list[Case] = []


def case(id: str, input: str, *expect: str, xfail: str | None = None, strict: bool = True):
    assert len(expect) >= 2, f"{id}: name the problem and the fix (2+ fragments)"

    def register(fn: Callable[[Ctx], list | Ran]) -> Callable[[Ctx], list | Ran]:
        assert all(c.id != id for c in CASES), id
        CASES.append(Case(id, input, fn, tuple(expect), xfail, strict))
        return fn

    return register


LLAMA_LORA = {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
BERT_CLS = {"model": {"task": "seq_cls"}, "data": {"labels": ["neg", "pos"]}}
BERT_LORA = {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}


def _bert(ctx: Ctx, patch: dict | None = None, adapter: dict | None = None) -> Path:
    base = _train._deep_update(BERT_CLS, {"model": {"checkpoint": str(ctx.env.bert)}})
    return ctx.config(_train._deep_update(base, patch or {}), adapter or BERT_LORA)


# ================================================================================== config file and --set

@case("config-file-missing", "the config path names no file",
      "config file not found", "check the path")
def _(ctx):
    return ["train", ctx.name(ctx.tmp / "missing.yaml", "MISSING.yaml")]


@case("config-yaml-syntax", "the config file is not valid YAML (an unclosed flow mapping)",
      "invalid YAML", "line 2", "fix the syntax")
def _(ctx):
    path = ctx.protect(ctx.tmp / "config.yaml", "CONFIG.yaml")
    path.write_text("model: {checkpoint: x\n  task: [\n")
    return ["train", path]


@case("config-not-a-mapping", "the config file's top level is a list",
      "the top level must be a mapping of sections", "(model, data, train, ...)")
def _(ctx):
    path = ctx.protect(ctx.tmp / "config.yaml", "CONFIG.yaml")
    path.write_text("- model\n- data\n")
    return ["train", path]


@case("config-unknown-key", "a misspelt key (train.stpes)",
      "train.stpes: unknown key", "did you mean 'steps'?")
def _(ctx):
    return ["train", ctx.config({"train": {"stpes": 3}})]


@case("config-wrong-value-type", "a value of the wrong type (train.steps: 'abc')",
      "train.steps", "should be a valid integer", "(got 'abc')")
def _(ctx):
    return ["train", ctx.config({"train": {"steps": "abc"}})]


@case("config-set-without-value", "--set without '=' (--set train.steps)",
      "--set 'train.steps'", "expected key=value, e.g. --set train.steps=100")
def _(ctx):
    return ["train", ctx.config(), "--set", "train.steps"]


@case("config-grad-accum", "train.batch_size not divisible by train.grad_accum",
      "batch_size (4) must be divisible by grad_accum (3)", "train.grad_accum")
def _(ctx):
    return ["train", ctx.config({"train": {"grad_accum": 3}})]


@case("adapter-unknown-method", "adapter.method misspelt (lroa)",
      "adapter.method='lroa': unknown method", "did you mean 'lora'?")
def _(ctx):
    return ["train", ctx.config(adapter=dict(LLAMA_LORA, method="lroa"))]


@case("adapter-unknown-option", "an option the method does not have (adapter.rr)",
      "adapter.rr: not a lora option", "did you mean 'r'?")
def _(ctx):
    return ["train", ctx.config(adapter=dict(LLAMA_LORA, rr=4))]


@case("mesh-does-not-divide-devices", "--set mesh.data=3 where the machine has another number of devices (1 CPU here)",
      "needs 3 devices but there are", "make data * fsdp * tensor equal")
def _(ctx):
    import jax

    assert jax.device_count() != 3, "premise: 3 devices would make mesh.data=3 valid"
    return ["train", ctx.config(), "--set", "mesh.data=3"]


# ================================================================================== adapter vs model

@case("target-modules-unknown", "adapter.target_modules names a module the model does not have (qq_proj)",
      "'qq_proj' matches no module of this model", "close candidates: q_proj")
def _(ctx):
    return ["train", ctx.config(adapter=dict(LLAMA_LORA, target_modules=["qq_proj"]))]


@case("rank-at-dims-kasa", "KaSA rank 32 on the 32x32 projections (KaSA keeps r singular values of the base)",
      "needs r < min(n_in, n_out): r=32 on a 32x32 weight", "lower r or exclude this module")
def _(ctx):
    return ["train", ctx.config(adapter={"method": "kasa", "r": 32, "target_modules": ["q_proj"]})]


@case("rank-above-dims-lora", "LoRA rank 64 on the 32x32 projections",
      "r=64 is above the dimensions of model.layers.{i}.self_attn.q_proj (32 -> 32)", "lower adapter.r")
def _(ctx):
    return ["train", ctx.config(adapter=dict(LLAMA_LORA, r=64))]


@case("target-regex-matches-nothing", "adapter.target_modules as one regex string ('q_proj') that matches no whole path",
      "is one regex string, matched against whole module paths, and matches none", "write a list instead")
def _(ctx):
    return ["train", ctx.config(adapter=dict(LLAMA_LORA, target_modules="q_proj"))]


@case("rank-above-dims-pissa", "PiSSA rank 64 on the 32x32 projections (more than the weight's singular values)",
      "r=64 is above the dimensions of model.layers.{i}.self_attn.q_proj (32 -> 32)", "lower adapter.r")
def _(ctx):
    return ["train", ctx.config(adapter={"method": "pissa", "r": 64, "target_modules": ["q_proj"]})]


@case("layers-out-of-range", "adapter.layers_to_transform [5] on a 2-layer model",
      "layer indices [5] out of range", "(the model has 2 layers, 0..1)")
def _(ctx):
    return ["train", ctx.config(adapter=dict(LLAMA_LORA, layers_to_transform=[5]))]


@case("modules-to-save-unknown", "adapter.modules_to_save names a module the model does not have",
      "'nohead' is not a top-level module of this model", "have ['embed_tokens', 'layers', 'norm']")
def _(ctx):
    return ["train", ctx.config(adapter=dict(LLAMA_LORA, modules_to_save=["nohead"]))]


@case("prefix-with-target-modules", "a prefix method given target_modules (prefix methods take every attention "
      "layer's prefix hook; every built-in backbone has one, so this is how the CLI refuses a prefix placement)",
      "prefix methods attach to every attention layer's prefix hook",
      "use layers_to_transform to choose layers, not target_modules")
def _(ctx):
    return ["train", ctx.config(adapter={"method": "prefix", "num_virtual_tokens": 4, "target_modules": ["q_proj"]})]


@case("prefix-beyond-learned-positions", "a 100-token prefix on BERT's 128 learned positions with max_length 64",
      "data.max_length=64 + the prefix's position shift 100 exceeds the 128 learned positions",
      "lower data.max_length or set adapter.position_offset: 0")
def _(ctx):
    return ["train", _bert(ctx, {"data": {"max_length": 64, "buckets": [64]}},
                           {"method": "prefix", "num_virtual_tokens": 100})]


@case("max-length-above-context", "data.max_length 256 above BERT's 128 learned positions",
      "data.max_length=256 exceeds the 128 learned positions of this bert model", "lower data.max_length")
def _(ctx):
    return ["train", _bert(ctx, {"data": {"max_length": 256, "buckets": [256]}})]


@case("encoder-as-causal-lm", "model.task causal_lm on a BERT checkpoint",
      "bert is an encoder: use task 'seq_cls', 'token_cls' or 'base'", "generating text needs a decoder")
def _(ctx):
    return ["train", ctx.config({"model": {"checkpoint": str(ctx.env.bert)}})]


# ================================================================================== base checkpoint files

@case("model-checkpoint-missing", "model.checkpoint names no file, asset or hub id",
      "no such file or folder, not a jaxpeft asset", "check the path")
def _(ctx):
    return ["train", ctx.config({"model": {"checkpoint": str(ctx.name(ctx.tmp / "no-model", "NOWHERE"))}})]


@case("model-safetensors-file", "model.checkpoint names the .safetensors file instead of its folder",
      "pass the folder holding config.json and this file", "not the file itself")
def _(ctx):
    return ["train", ctx.config({"model": {"checkpoint": str(ctx.env.llama / "model.safetensors")}})]


@case("model-safetensors-truncated", "the base model's model.safetensors cut in half",
      "not a valid safetensors file", "truncated or corrupt: download or save it again")
def _(ctx):
    ckpt = ctx.copy(ctx.env.llama, "MODEL")
    _truncate(ckpt / "model.safetensors")
    ctx.protect(ckpt)
    return ["train", ctx.config({"model": {"checkpoint": str(ckpt)}})]


@case("model-config-json-corrupt", "the base model's config.json is not JSON",
      "config.json: invalid JSON", "download or save it again")
def _(ctx):
    ckpt = ctx.copy(ctx.env.llama, "MODEL")
    (ckpt / "config.json").write_text("{bad")
    ctx.protect(ckpt)
    return ["train", ctx.config({"model": {"checkpoint": str(ckpt)}})]


@case("model-type-unsupported", "config.json model_type t5",
      "model_type 't5' is not supported", "supported: llama")
def _(ctx):
    ckpt = ctx.copy(ctx.env.llama, "MODEL")
    _edit_json(ckpt / "config.json", model_type="t5")
    ctx.protect(ckpt)
    return ["train", ctx.config({"model": {"checkpoint": str(ckpt)}})]


@case("model-weight-misshaped", "a base weight with one row missing (gate_proj 63x32 for 64x32)",
      "checkpoint does not match the llama model", "Fix: check that config.json belongs to these weights")
def _(ctx):
    ckpt = ctx.copy(ctx.env.llama, "MODEL")

    def cut(t):
        key = "model.layers.0.mlp.gate_proj.weight"
        t[key] = t[key][:-1].copy()

    _edit_tensors(ckpt / "model.safetensors", cut)
    ctx.protect(ckpt)
    return ["generate", ckpt, "--prompt", "hi"]


@case("gguf-truncated", "a GGUF checkpoint cut in half",
      "GGUF file is truncated or corrupt", "re-download it")
def _(ctx):
    gguf = ctx.copy(ctx.env.gguf, "MODEL.gguf")
    _truncate(gguf)
    ctx.protect(gguf)
    return ["generate", gguf, "--prompt", "hi"]


@case("generate-checkpoint-missing", "jaxpeft generate with a checkpoint path that does not exist",
      "no such file or folder, not a jaxpeft asset", "check the path")
def _(ctx):
    return ["generate", ctx.name(ctx.tmp / "no-model", "NOWHERE"), "--prompt", "hi"]


@case("generate-no-tokenizer", "jaxpeft generate with a checkpoint folder without tokenizer.json",
      "has no tokenizer (tokenizer.json)", "use a checkpoint folder that holds its tokenizer")
def _(ctx):
    ckpt = ctx.copy(ctx.env.llama, "MODEL")
    (ckpt / "tokenizer.json").unlink()
    ctx.protect(ckpt)
    return ["generate", ckpt, "--prompt", "hi"]


@case("download-unknown-asset", "jaxpeft download of a name that is no asset",
      "unknown asset 'no-such-model'", "jaxpeft download --list")
def _(ctx):
    return ["download", "no-such-model", "--cache-dir", ctx.name(ctx.tmp / "cache", "CACHE")]


# ================================================================================== data

@case("data-empty-split", "an empty validation.jsonl",
      "split 'validation' is empty", "add rows")
def _(ctx):
    return ["train", ctx.config({"data": {"path": str(ctx.data(""))}})]


@case("data-jsonl-malformed-line", "validation.jsonl whose line 4 is cut off mid-object",
      "line 4 is not valid JSON", "fix or remove that line")
def _(ctx):
    lines = [json.dumps(r) for r in _train._arith_rows(6, 2)]
    lines[3] = lines[3][:-7]
    return ["train", ctx.config({"data": {"path": str(ctx.data("\n".join(lines) + "\n"))}})]


@case("data-jsonl-line-not-object", "a validation.jsonl line that is a JSON list, not an object",
      "line 2 is a JSON list, not an object", "every line must be one JSON object")
def _(ctx):
    return ["train", ctx.config({"data": {"path": str(ctx.data('{"prompt": "a", "response": "b"}\n[1, 2]\n'))}})]


@case("data-split-file-missing", "a data folder without validation.jsonl",
      "no validation.jsonl/.json/.csv/.parquet file for split 'validation'", "data.eval_split")
def _(ctx):
    data = ctx.data(_train._arith_rows(8, 1), split="train")
    return ["train", ctx.config({"data": {"path": str(data)}})]


@case("data-path-missing", "data.path names no folder, bundled set or hub dataset",
      "not a local folder/file and not loadable as a `datasets` name", "check the path")
def _(ctx):
    return ["train", ctx.config({"data": {"path": str(ctx.name(ctx.tmp / "no-data", "NOWHERE"))}})]


@case("data-bundled-unknown", "data.path bundled:NAME with an unknown NAME",
      "data.path='bundled:nope': no such bundled dataset", "bundled: bundled:arithmetic")
def _(ctx):
    return ["train", ctx.config({"data": {"path": "bundled:nope"}})]


@case("data-missing-field", "causal-LM rows without the response field",
      "no field 'response'", "set data.response_field")
def _(ctx):
    data = ctx.data([{"prompt": "What is 1 plus 1?", "answer": "2"}] * 4)
    return ["train", ctx.config({"data": {"path": str(data)}})]


@case("data-field-wrong-type", "a prompt that is a number, not a text",
      "field 'prompt' holds 5 (int), not a text", "make it a string in the data")
def _(ctx):
    data = ctx.data([{"prompt": 5, "response": "b"}] * 2)
    return ["train", ctx.config({"data": {"path": str(data)}})]


@case("data-row-too-long", "a row of 43 tokens with data.max_length 32 and truncate off",
      "43 tokens > data.max_length=32", "or set data.truncate: true")
def _(ctx):
    data = ctx.data([{"prompt": "x" * 40, "response": "y"}])
    return ["train", ctx.config({"data": {"path": str(data)}})]


@case("data-fewer-rows-than-batch", "2 training rows for batch_size 4",
      "only 2 training rows for batch_size 4", "lower train.batch_size or add data")
def _(ctx):
    data = ctx.data(_train._arith_rows(4, 2), train=_train._arith_rows(2, 1))
    return ["train", ctx.config({"data": {"path": str(data)}})]


@case("labels-missing", "a classification run without data.labels or labels.json",
      "data.labels: needed for classification", "or a labels.json next to the data")
def _(ctx):
    data = ctx.data([{"text": "good movie", "label": 1}])
    return ["train", _bert(ctx, {"data": {"path": str(data), "labels": None}})]


@case("label-not-in-label-set", "a classification row labelled 'neutral' with labels [neg, pos]",
      "label 'neutral' is not one of ('neg', 'pos')", "add it to data.labels")
def _(ctx):
    data = ctx.data([{"text": "good movie", "label": "pos"}, {"text": "so so", "label": "neutral"}])
    return ["train", _bert(ctx, {"data": {"path": str(data)}})]


@case("label-index-out-of-range", "a classification row with label index 5 for 2 labels",
      "label 5 is out of range for 2 labels", "indices 0..1 into data.labels")
def _(ctx):
    data = ctx.data([{"text": "good movie", "label": 1}, {"text": "bad", "label": 5}])
    return ["train", _bert(ctx, {"data": {"path": str(data)}})]


@case("label-wrong-type", "a classification label that is a list",
      "label [0] (list) is neither a label name nor an index", "a label is a name from data.labels")
def _(ctx):
    data = ctx.data([{"text": "good movie", "label": [0]}])
    return ["train", _bert(ctx, {"data": {"path": str(data)}})]


@case("ner-tag-not-in-label-set", "a token-classification tag outside data.labels",
      "tag 'B-LOC' is not in the label set", "add it to data.labels")
def _(ctx):
    data = ctx.data([{"tokens": ["john", "lives", "in", "paris"], "tags": ["B-PER", "O", "O", "B-LOC"]}])
    return ["train", _bert(ctx, {"model": {"task": "token_cls"},
                                 "data": {"path": str(data), "labels": ["O", "B-PER", "I-PER"]}})]


@case("ner-tokens-not-a-list", "token-classification words given as one string",
      "field 'tokens' holds 'john lives' (str), not a list", "token classification reads one list entry per word")
def _(ctx):
    data = ctx.data([{"tokens": "john lives", "tags": ["B-PER", "O"]}])
    return ["train", _bert(ctx, {"model": {"task": "token_cls"},
                                 "data": {"path": str(data), "labels": ["O", "B-PER", "I-PER"]}})]


# ================================================================================== training and output

@case("loss-not-finite", "optim.lr 3e38 without clipping: the loss overflows to inf/NaN at step 3",
      "loss or gradient is not finite at step 3", "the last good checkpoint is step 1",
      "lower optim.lr, set optim.clip_norm")
def _(ctx):
    run = ctx.env.diverged
    ctx.name(run.config, "CONFIG.yaml")
    ctx.name(run.path, "RUN")
    return run.ran


@case("output-dir-unwritable", "train.output_dir below a regular file (fails for root too)",
      "Not a directory", "check the path and its permissions")
def _(ctx):
    blocker = ctx.protect(ctx.tmp / "file", "FILE")
    blocker.write_text("not a folder\n")
    return ["train", ctx.config({"train": {"output_dir": str(blocker / "run")}})]


# ================================================================================== run folders and checkpoints

def _run_copy(ctx: Ctx) -> tuple[Path, Path]:
    """(config of a copy of the divergence run, that copy shown as RUN/): checkpoints 1 and 2 committed."""
    run = ctx.copy(ctx.env.diverged.path, "RUN")
    config = ctx.config(_train._deep_update(DIVERGE, {"train": {"output_dir": str(run)}}))
    return config, run


@case("orbax-metadata-truncated", "the newest checkpoint's trainable/_METADATA cut in half (jaxpeft eval)",
      "checkpoint step 2 at RUN/checkpoints/2 is corrupt or incomplete", "use an older step instead (`--step 1`",
      "committed older steps: [1]")
def _(ctx):
    config, run = _run_copy(ctx)
    _truncate(run / "checkpoints" / "2" / "trainable" / "_METADATA")
    ctx.protect(run)
    return ["eval", config]


@case("orbax-array-data-truncated", "every array data file of the newest checkpoint cut in half (jaxpeft export)",
      "checkpoint step 2 at RUN/checkpoints/2 is corrupt or incomplete", "use an older step instead (`--step 1`",
      "committed older steps: [1]")
def _(ctx):
    config, run = _run_copy(ctx)
    # OCDBT keeps data (and b-tree nodes) in `d/` folders: per process, and at the top once Orbax merged them
    data = [f for f in (run / "checkpoints" / "2" / "trainable").glob("**/d/*") if f.is_file()]
    assert data, "no OCDBT data files found: the checkpoint layout changed"
    for f in data:
        _truncate(f)
    ctx.protect(run)
    return ["export", config, "--out", ctx.name(ctx.tmp / "exported", "EXPORT")]


@case("eval-without-checkpoints", "jaxpeft eval of a run folder that holds no checkpoint",
      "no checkpoint found in OUT/checkpoints",
      "point the run at the directory that holds its checkpoints")
def _(ctx):
    return ["eval", ctx.config()]


@case("export-step-missing", "jaxpeft export --step 99 of a run with steps 1 and 2",
      "no committed checkpoint for step 99", "(committed steps: [1, 2])")
def _(ctx):
    config, run = _run_copy(ctx)
    ctx.protect(run)
    return ["export", config, "--step", "99", "--out", ctx.name(ctx.tmp / "exported", "EXPORT")]


@case("checkpoint-different-base", "jaxpeft eval of a run's checkpoints on another base model (fingerprint)",
      "this checkpoint was trained on a different base model", "load the base model it was trained on")
def _(ctx):
    config, run = _run_copy(ctx)
    ctx.protect(run)
    ctx.name(ctx.env.llama_other_base, "OTHER-LLAMA")
    return ["eval", config, "--set", f"model.checkpoint={ctx.env.llama_other_base}"]


@case("apt-to-pt2-not-apt", "jaxpeft apt-to-pt2 on a LoRA run folder",
      "not a finished APT run directory (needs gates.json and config.yaml", "train an APT config first")
def _(ctx):
    _, run = _run_copy(ctx)
    ctx.protect(run)
    return ["apt-to-pt2", run, "--out", ctx.name(ctx.tmp / "pt2.yaml", "PT2.yaml")]


# ================================================================================== adapter folders

def _peft(ctx: Ctx, damage: Callable[[Path], None] | None = None) -> Path:
    """A copy of the PEFT LoRA folder (ADAPTER/), damaged by `damage`, protected from then on."""
    folder = ctx.copy(ctx.env.peft_lora, "ADAPTER")
    if damage is not None:
        damage(folder)
    return ctx.protect(folder)


def _merge(ctx: Ctx, adapter: Path, base: Path | None = None, *extra: str) -> list:
    return ["merge", base or ctx.env.llama, "--adapter", adapter, "--out", ctx.name(ctx.tmp / "merged", "MERGED"),
            *extra]


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@case("peft-missing-tensor", "a PEFT adapter file without one of its lora_A tensors",
      "missing tensors for adapted modules", "export the adapter again")
def _(ctx):
    return _merge(ctx, _peft(ctx, lambda d: _edit_tensors(d / "adapter_model.safetensors", lambda t: t.pop(Q_A))))


@case("peft-extra-tensor", "a PEFT adapter file with a tensor for a module its config does not select (up_proj)",
      "1 tensors match no module this adapter's adapter_config.json selects", "load it on its own base model")
def _(ctx):
    import numpy as np

    extra = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    return _merge(ctx, _peft(ctx, lambda d: _edit_tensors(
        d / "adapter_model.safetensors", lambda t: t.__setitem__(extra, np.zeros((4, 32), np.float32)))))


@case("peft-misshaped-tensor", "a PEFT lora_A of rank 8 where adapter_config.json says r=4",
      "has shape (8, 32), expected the transpose of (32, 4)", "load it on its own base model")
def _(ctx):
    import numpy as np

    return _merge(ctx, _peft(ctx, lambda d: _edit_tensors(
        d / "adapter_model.safetensors", lambda t: t.__setitem__(Q_A, np.zeros((8, 32), np.float32)))))


@case("peft-type-unsupported", "a PEFT folder of peft_type LOHA (jaxpeft merge)",
      "peft_type 'LOHA' is not supported yet (supported: LORA, ADALORA, IA3, PREFIX_TUNING)",
      "merge the adapter in PEFT (merge_and_unload)")
def _(ctx):
    return _merge(ctx, _peft(ctx, lambda d: _edit_json(d / "adapter_config.json", peft_type="LOHA")))


@case("peft-type-unsupported-generate", "a PEFT folder of peft_type ADAPTION_PROMPT (jaxpeft generate --adapter)",
      "peft_type 'ADAPTION_PROMPT' is not supported yet", "retrain with one of these methods")
def _(ctx):
    adapter = _peft(ctx, lambda d: _edit_json(d / "adapter_config.json", peft_type="ADAPTION_PROMPT"))
    return ["generate", ctx.env.llama, "--adapter", adapter, "--prompt", "hi"]


@case("peft-unconverted-pissa", "a PEFT LoRA saved with init_lora_weights 'pissa' and not converted",
      "init_lora_weights='pissa': an unconverted pissa adapter",
      "path_initial_model_for_weight_conversion")
def _(ctx):
    return _merge(ctx, _peft(ctx, lambda d: _edit_json(d / "adapter_config.json", init_lora_weights="pissa")))


@case("peft-unconverted-olora", "a PEFT LoRA saved with init_lora_weights 'olora' (jaxpeft generate --adapter)",
      "init_lora_weights='olora': an unconverted olora adapter",
      "path_initial_model_for_weight_conversion")
def _(ctx):
    adapter = _peft(ctx, lambda d: _edit_json(d / "adapter_config.json", init_lora_weights="olora"))
    return ["generate", ctx.env.llama, "--adapter", adapter, "--prompt", "hi"]


@case("peft-safetensors-truncated", "adapter_model.safetensors cut to 300 bytes",
      "adapter_model.safetensors: cannot read", "truncated or corrupt: export or copy the adapter again")
def _(ctx):
    return _merge(ctx, _peft(ctx, lambda d: _truncate(d / "adapter_model.safetensors", 300)))


@case("peft-config-corrupt", "adapter_config.json that is not JSON",
      "adapter_config.json: not valid JSON", "export or copy the adapter again")
def _(ctx):
    return _merge(ctx, _peft(ctx, lambda d: (d / "adapter_config.json").write_text("{")))


@case("adapter-folder-missing", "--adapter names a folder that does not exist",
      "not a PEFT adapter folder (no such folder)", "pass the folder that holds adapter_config.json")
def _(ctx):
    return _merge(ctx, ctx.name(ctx.tmp / "no-adapter", "NOWHERE"))


@case("peft-adapter-other-architecture", "a PEFT LoRA of the llama (q_proj/v_proj) merged into the BERT",
      "this PEFT adapter does not fit this bert model, it was made for another architecture",
      "load it on the base model it was trained on")
def _(ctx):
    return _merge(ctx, _peft(ctx), ctx.env.bert, "--task", "base")


@case("native-adapter-other-architecture", "a jaxpeft-format adapter of the llama merged into the BERT",
      "the adapter was made for a llama model, this one is bert", "load it on the base model it was trained on")
def _(ctx):
    adapter = ctx.protect(ctx.copy(ctx.env.native_lora, "ADAPTER"))
    return _merge(ctx, adapter, ctx.env.bert, "--task", "base")


@case("peft-prefix-other-model", "a PEFT prefix whose adapter_config.json says 12 layers, on a 2-layer model",
      "num_layers=12 but this model has 2: the adapter was made for a different base model",
      "load it on that base model")
def _(ctx):
    adapter = ctx.copy(ctx.env.peft_prefix, "ADAPTER")
    _edit_json(adapter / "adapter_config.json", num_layers=12)
    ctx.protect(adapter)
    return ["generate", ctx.env.llama, "--adapter", adapter, "--prompt", "hi"]


@case("merge-prefix-adapter", "jaxpeft merge of a prefix-tuning adapter (no weight to merge into)",
      "(prefix) cannot be merged: a prefix method adds key/value entries to attention",
      "use a dense method such as LoRA when you need merged weights")
def _(ctx):
    return _merge(ctx, ctx.protect(ctx.copy(ctx.env.peft_prefix, "ADAPTER")))


# ------------------------------------------------------------------------------------------ the tests

def _params():
    out = []
    for c in CASES:
        marks = [pytest.mark.xfail(reason=c.xfail, strict=c.strict)] if c.xfail else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


_PROGRESS = re.compile(r"^step \d+/\d+ ")


def _error_block(err: str) -> str:
    """stderr from the `error:` line on; only a training run's progress lines may come before it."""
    lines = err.splitlines()
    while lines and _PROGRESS.match(lines[0]):
        lines.pop(0)
    assert lines and lines[0].startswith("error:"), f"stderr does not start with 'error:':\n{err}"
    return "\n".join(lines)


def _record(case: Case, ctx: Ctx, argv: list, err: str) -> None:
    """Append the case's row of docs/reliability_catalogue.md to $JAXPEFT_CATALOGUE_OUT (when set)."""
    path = os.environ.get(OUT_ENV)
    if not path:
        return
    if case.id == "loss-not-finite":
        argv = ["train", ctx.env.diverged.config]
    command = ctx.shorten("jaxpeft " + " ".join(str(a) for a in argv))
    lines = err.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("error:")), 0)
    text = ctx.shorten(" ".join(line.strip() for line in lines[start:]))
    text = re.sub(r"^error: ", "", text).replace(" (run with --debug for the traceback)", "")
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"id": case.id, "command": command, "input": case.input, "message": text}) + "\n")


def test_catalogue_has_enough_distinct_cases():
    assert len(CASES) >= 36 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", _params())
def test_bad_input(case: Case, env: Env, tmp_path: Path, capsys):
    from jaxpeft.cli import main
    from jaxpeft.errors import EXIT_USER_ERROR

    ctx = Ctx(env, tmp_path)
    built = case.build(ctx)
    saved = ctx.protected + env.masters()
    before = _hashes(saved)
    if isinstance(built, Ran):
        rc, out, err = built
        argv: list = []
    else:
        argv = [str(a) for a in built]
        capsys.readouterr()
        with _plain_python_hooks():
            rc = main(argv)
        out, err = capsys.readouterr()
    _record(case, ctx, argv, err)  # before the checks: the docs show today's message of a pending case too
    assert "Traceback" not in out + err, f"a traceback on a user error:\n{err}"
    assert rc == EXIT_USER_ERROR, f"exit code {rc}, expected {EXIT_USER_ERROR}:\n{err}"
    block = _error_block(err)
    shown = ctx.shorten(block)
    missing = [frag for frag in case.expect if frag not in block and frag not in shown]
    assert not missing, f"the message lacks {missing}:\n{block}"
    after = _hashes(saved)
    changed = sorted(p for p in before if after.get(p) != before[p])
    assert not changed, f"saved files changed or removed: {[ctx.shorten(p) for p in changed]}"


@pytest.mark.parametrize("where", [
    "after-the-verb",
    "before-the-verb",
])
def test_debug_shows_the_traceback(tmp_path, where):
    """--debug (before or after the verb) re-raises the user error, so Python prints its traceback."""
    import traceback

    from jaxpeft.cli import main
    from jaxpeft.errors import JaxpeftError

    missing = str(tmp_path / "missing.yaml")
    argv = ["train", missing, "--debug"] if where == "after-the-verb" else ["--debug", "train", missing]
    with pytest.raises(JaxpeftError, match="config file not found") as info:
        main(argv)
    shown = "".join(traceback.format_exception(info.value))
    assert shown.startswith("Traceback") and "load_config" in shown


def test_every_case_is_in_the_docs():
    """docs/reliability_catalogue.md lists every case (regenerate: see the module docstring)."""
    text = DOC.read_text(encoding="utf-8")
    absent = [c.id for c in CASES if f"`{c.id}`" not in text]
    assert not absent, f"{DOC.name} lacks the cases {absent}: regenerate it (python {Path(__file__).name} FILE)"


# ------------------------------------------------------------------------------------------ the docs table

PAGE_HEAD = """# Bad-input catalogue

Every case of `tests/test_cli_catalogue.py`, the bad input it feeds the `jaxpeft` command line and the error it
gets. Each case is a test: exit code 2, stderr starts with `error:` (after a training run's progress lines), no
Python traceback (`--debug` shows one), the message names the problem and the fix, and every file saved before
(run folder, checkpoints, adapter, dataset) has the same bytes afterwards.

Paths are shortened: `CONFIG.yaml` is the run config; `OUT/` a fresh `train.output_dir`; `RUN/` a copy of a run
folder whose training diverged at step 3 after committing checkpoints 1 and 2; `LLAMA/` and `BERT/` the tiny test
checkpoints (`OTHER-LLAMA/` the llama with one weight changed); `MODEL/` a damaged copy of a checkpoint; `ADAPTER/`
a (damaged) copy of an adapter folder; `DATA/` the case's data folder; `NOWHERE` a path that does not exist;
`FILE` a regular file; `TMP` the test's temporary folder. Messages longer than 400 characters are cut.
Cases marked *(pending)* do not pass yet: the test names the change they wait for.

Regenerate after changing a case or a message:

```
JAXPEFT_CATALOGUE_OUT=/tmp/catalogue.jsonl python -m pytest -q tests/test_cli_catalogue.py
python tests/test_cli_catalogue.py /tmp/catalogue.jsonl > docs/reliability_catalogue.md
```

"""


def markdown(records: list[dict[str, str]], limit: int = 400) -> str:
    """docs/reliability_catalogue.md: one table row per case id (its last record), in the module's case order."""
    by_id = {r["id"]: r for r in records}
    order = [c.id for c in CASES if c.id in by_id] + sorted(set(by_id) - {c.id for c in CASES})
    pending = {c.id for c in CASES if c.xfail}

    def cell(text: str) -> str:
        text = text if len(text) <= limit else text[: limit - 1] + "…"
        return text.replace("|", "\\|")

    rows = [f"{len(order)} cases.", "", "| case | bad input | command | error message |", "|---|---|---|---|"]
    for i in order:
        r = by_id[i]
        name = f"`{i}`" + (" *(pending)*" if i in pending else "")
        rows.append(f"| {name} | {cell(r['input'])} | `{cell(r['command'])}` | {cell(r['message'])} |")
    return PAGE_HEAD + "\n".join(rows) + "\n"


if __name__ == "__main__":  # python tests/test_cli_catalogue.py FILE: the page from FILE's records
    records = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    sys.stdout.write(markdown(records))
