"""Typed run configuration: YAML maps one to one onto these frozen pydantic models.

Imports pydantic/yaml and jaxpeft.adapters (to validate the adapter section against the method's own
config class). Every error names the offending key as a dotted path (`train.lr`) and says what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator

from jaxpeft.errors import JaxpeftError


class ConfigError(JaxpeftError, ValueError):
    """A bad run configuration; the message names the key and the fix."""


def _int32(v: int) -> int:
    if not -2 ** 31 <= v < 2 ** 31:
        raise ValueError(f"{v} does not fit a 32-bit integer (JAX's default for steps, sizes and seeds)")
    return v


# integers and booleans are checked strictly (`steps: true` or `steps: "5"` is an error, as in the adapter
# section), integers must fit JAX's default int32 (steps, sizes and seeds end up in int32 counters); floats stay
# lax so YAML's `1e-3` (a string to YAML 1.1) still reads as a number
Int = Annotated[int, Field(strict=True), AfterValidator(_int32)]
Bool = Annotated[bool, Field(strict=True)]


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (`1e-3`, `5e-2`) as floats."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."))


class _YamlDumper(yaml.SafeDumper):
    """SafeDumper that quotes the strings _YamlLoader would read as floats ('1e-3'), so dumped configs reload."""


_YamlDumper.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."))


def _yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError("nested deeper than Python's recursion limit") from None


class _Section(BaseModel):
    # numbers must be finite: YAML's .inf / .nan are never a sensible learning rate, norm or threshold
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, use_attribute_docstrings=True,
                              allow_inf_nan=False)


class ModelSection(_Section):
    """The pretrained backbone."""

    checkpoint: str = Field(description="HF folder, .gguf file, jaxpeft asset name, or hub id")
    task: Literal["causal_lm", "seq_cls", "token_cls", "multiple_choice"] = "causal_lm"
    """What the run trains and evaluates (docs/tasks.md): the head built and the task's loss and metrics."""
    train_new_head: Bool = True
    """Classification / token classification: a head the checkpoint does not hold (freshly initialised) is
    trained with the adapter (added to the adapter's modules_to_save, as PEFT does for SEQ_CLS / TOKEN_CLS);
    false keeps it frozen at its random init (the run says so)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype."""
    param_dtype: Literal["float32", "bfloat16"] | None = None
    """Storage dtype of the frozen weights (default: dtype). Adapter weights always stay float32."""
    scan_layers: Bool = True
    """Run the layers under nn.scan (compiles once for all layers); false unrolls the same parameter tree."""
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "dots_no_batch"
    """Activation rematerialisation per layer (jax.checkpoint policy): 'dots_no_batch' keeps the matmul outputs
    and recomputes the rest (faster and ~45% less activation memory than 'none' on CPU), 'full' keeps the least."""


class AdapterSection(_Section):
    """The PEFT method and its hyper-parameters (any field of the method's config class)."""

    model_config = ConfigDict(extra="allow", frozen=True, use_attribute_docstrings=True)
    method: str = "lora"
    """The registered method name (lora, dora, ia3, kasa, pissa, corda, sorsa, svfit, salt, adalora, full, prefix,
    ptuning_v2, apt, imsm); the section's other keys are fields of that method's config class."""

    def build(self) -> Any:
        """The method's AdapterConfig; unknown or mistyped fields raise ConfigError naming `adapter.<key>`."""
        from jaxpeft.adapters import METHODS

        if self.method not in METHODS:
            close = difflib.get_close_matches(self.method, list(METHODS), n=3)
            raise ConfigError(f"adapter.method={self.method!r}: unknown method; registered: {sorted(METHODS)}"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
        cls = METHODS[self.method].config_cls
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        kwargs = dict(self.model_extra or {})
        for key in kwargs:
            if key not in fields:
                close = difflib.get_close_matches(key, list(fields), n=3)
                raise ConfigError(f"adapter.{key}: not a {self.method} option"
                                  + (f" (did you mean {close[0]!r}?)" if close else "")
                                  + f"; options: {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        for key, value in kwargs.items():
            if isinstance(value, dict):
                continue  # rank_pattern / alpha_pattern: normalised by the config class itself
            try:  # scalars strictly (no "8" for an int), lists leniently (YAML lists -> tuples)
                TypeAdapter(hints[key]).validate_python(value, strict=not isinstance(value, list))
            except ValidationError:
                raise ConfigError(f"adapter.{key}={value!r}: expected {_type_name(hints[key])}") from None
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:  # the method's messages start with the field: 'r=0: ...'
            raise ConfigError(f"adapter.{e}") from e


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


class DataSection(_Section):
    """Where the rows come from and how they become token ids."""

    path: str | None = None
    """Folder with {train,validation,test}.jsonl (or .csv/.parquet), a bundled dataset (`bundled:arithmetic`,
    `bundled:sentiment`, `bundled:twitter_ner`, `bundled:e2e_nlg`), `tfds:NAME`, or a `datasets` hub name."""
    train_split: str = "train"
    """Split name of the training rows (file train.jsonl for a folder)."""
    eval_split: str = "validation"
    """Split name of the evaluation rows."""
    max_train_rows: Int | None = Field(default=None, gt=0)
    """Use only the first this many training rows (null: all)."""
    max_eval_rows: Int | None = Field(default=None, gt=0)
    """Evaluate on only the first this many rows (null: all)."""
    max_length: Int = Field(default=128, gt=0)
    """Longest tokenized example; longer rows are an error unless truncate is true."""
    truncate: Bool = False
    """Cut rows longer than max_length (the response end for causal LM) instead of raising an error."""
    buckets: tuple[Int, ...] | Literal["auto"] = "auto"
    """Padded lengths (jit compiles once per bucket); a batch goes to the smallest bucket that fits its longest
    row. 'auto': at most max_buckets lengths (multiples of bucket_multiple) chosen from the data's own batch
    maxima to pad least, plus max_length as the fallback; the run prints the buckets it uses."""
    bucket_multiple: Int = Field(default=8, gt=0)
    """'auto' buckets are multiples of this (8 suits accelerators; 1 pads least on CPU)."""
    max_buckets: Int = Field(default=4, gt=0)
    """'auto': at most this many bucket lengths besides the max_length fallback (one compile each)."""
    prompt_format: Literal["plain", "chat"] = "plain"
    """'plain': prompt + ' ' + response; 'chat': the checkpoint's chat template around the prompt."""
    text_field: str = "text"
    """Classification: the field holding the text."""
    text_pair_field: str | None = None
    """Classification: the field holding the second text of a pair (null: single texts)."""
    label_field: str = "label"
    """Classification: the field holding the label (a name from labels, or an index)."""
    prompt_field: str = "prompt"
    """Causal LM / multiple choice: the field holding the prompt."""
    response_field: str = "response"
    """Causal LM: the field holding the response the loss scores."""
    tokens_field: str = "tokens"
    """Token classification: the field holding the list of words."""
    tags_field: str = "tags"
    """Token classification: the field holding one BIO tag per word."""
    choices_field: str = "choices"
    """Multiple choice: the field holding the list of choice texts."""
    answer_field: str = "answer_index"
    """Multiple choice: the field holding the index of the correct choice."""
    labels: tuple[str, ...] | None = None
    """Label names (classification / NER); default: labels.json next to the data."""

    @field_validator("buckets")
    @classmethod
    def _buckets(cls, v: tuple[int, ...] | str) -> tuple[int, ...] | str:
        if v == "auto":
            return v
        if not v or any(b <= 0 for b in v) or list(v) != sorted(set(v)):
            raise ValueError("buckets must be positive, strictly increasing lengths")
        return v

    @field_validator("buckets")
    @classmethod
    def _lengths(cls, v: tuple[int, ...] | str, info: ValidationInfo) -> tuple[int, ...] | str:
        max_length = info.data.get("max_length")
        if max_length is not None and v != "auto" and v and v[-1] < max_length:
            raise ValueError(f"the largest bucket ({v[-1]}) is smaller than max_length ({max_length}): "
                             "add a bucket >= max_length")
        return v


class OptimSection(_Section):
    """The optimizer and its learning-rate schedule: linear warm-up to lr, then constant, linear or cosine decay to
    0 at train.steps; the gradient's global norm is clipped at clip_norm first."""

    optimizer: Literal["adamw", "adafactor"] = "adamw"
    """optax.adamw or optax.adafactor, over the trainable tree only."""
    lr: float = Field(default=1e-3, gt=0)
    """Peak learning rate (methods may set their own for some parameters, e.g. IMSM's gate_lr)."""
    weight_decay: float = Field(default=0.0, ge=0)
    """Decoupled weight decay (AdamW) or Adafactor's weight_decay_rate."""
    b1: float = Field(default=0.9, ge=0, lt=1)
    """AdamW's first-moment decay."""
    b2: float = Field(default=0.999, ge=0, lt=1)
    """AdamW's second-moment decay."""
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    """Learning-rate shape after warm-up: constant, linear to 0, or cosine to 0 at train.steps."""
    warmup_steps: Int = Field(default=0, ge=0)
    """Steps of linear warm-up from 0 to lr."""
    clip_norm: float | None = Field(default=1.0, gt=0)
    """Clip the gradient's global norm to this before the update; null: no clipping."""


class TrainSection(_Section):
    """The training loop: steps and batch sizes, evaluation, logging and checkpoint cadence, the run folder and
    resumption."""

    steps: Int = Field(default=100, gt=0)
    """Optimizer steps of the run (a resumed run continues up to this)."""
    batch_size: Int = Field(default=8, gt=0)
    """Rows per optimizer step, over all devices and processes."""
    grad_accum: Int = Field(default=1, gt=0)
    """Micro-batches per optimizer step (each micro-batch holds batch_size // grad_accum rows)."""
    seed: Int = Field(default=0, ge=0)
    """Seeds the adapter init, the data order and dropout: the same seed and config give the same run."""
    loss_chunk: Int | None = Field(default=None, gt=0)
    """Causal LM: run the LM head and cross-entropy this many scored positions at a time (recomputed in the
    backward pass), so no (batch, positions, vocabulary) logits tensor is ever whole; None: all at once."""
    eval_every: Int = Field(default=50, gt=0)
    """Evaluate every this many steps (and at the end)."""
    eval_batch_size: Int = Field(default=32, gt=0)
    """Rows per evaluation and generation batch."""
    log_every: Int = Field(default=10, gt=0)
    """Write the training loss (and tokens/s) to metrics.jsonl every this many steps."""
    output_dir: str = "runs/default"
    """The run folder: config.yaml, metrics.jsonl, checkpoints/, adapter/, plots."""
    keep_last: Int = Field(default=2, gt=0)
    """Checkpoints kept besides the best one."""
    checkpoint_every: Int = Field(default=50, gt=0)
    """Save a checkpoint every this many steps (and at the end)."""
    best_metric: str | None = "eval_loss"
    """Metric that chooses the kept best checkpoint (eval_loss, accuracy, exact_match, ...)."""
    best_mode: Literal["min", "max"] = "min"
    """Whether a lower (min) or higher (max) best_metric is better."""
    eval_before_training: Bool = True
    """Evaluate at step 0 too (metrics_before), so the run shows what training changed."""
    resume: Bool = True
    """Continue from the latest checkpoint in output_dir when there is one."""
    allow_config_change: Bool = False
    """Resume even though output_dir's config.yaml trained its checkpoints under other settings (lr, steps, data,
    adapter, ...); by default that is an error naming the keys that differ."""
    prefetch: Int = Field(default=2, ge=0)
    """Training batches collated ahead in a background thread while the step runs (0: collate in line)."""
    compilation_cache_dir: str | None = None
    """A folder for JAX's persistent compilation cache: a restarted or resumed run with the same shapes skips
    recompiling its steps (the JAX_COMPILATION_CACHE_DIR environment variable works too); None: no cache."""
    preemption_check_every: Int = Field(default=1, gt=0)
    """Multi-process runs: every this many steps the processes agree (one tiny collective) whether any of them
    received SIGTERM/SIGINT, so all stop, checkpoint and exit at the same step. A single process checks every
    step for free."""
    update_norm_warning: float = Field(default=10.0, ge=0)
    """Warn when a step's update norm exceeds this multiple of its running mean (an exploding adapter); 0: off."""

    @field_validator("grad_accum")
    @classmethod
    def _accum(cls, v: int, info: ValidationInfo) -> int:
        batch = info.data.get("batch_size")
        if batch is not None and batch % v:
            raise ValueError(f"batch_size ({batch}) must be divisible by grad_accum ({v})")
        return v


class GenerationSection(_Section):
    """Decoding for causal-LM runs: the continuations scored at evaluation and the examples shown after
    training (greedy at temperature 0, else sampled with top_k / top_p)."""

    max_new_tokens: Int = Field(default=16, gt=0)
    """Longest continuation generated per prompt (evaluation and the shown examples)."""
    temperature: float = Field(default=0.0, ge=0)
    """0: greedy decoding; above 0: sampling at this temperature."""
    top_k: Int = Field(default=0, ge=0)
    """Sample only among the k most likely tokens (0: no limit)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling: the smallest token set with this much probability (1: no limit)."""
    show_examples: Int = Field(default=3, ge=0)
    """Evaluation rows whose generations the run prints at the end."""
    eval_generate: Bool = True
    """Compute generation metrics (exact match, BLEU, ...) at evaluation for causal-LM tasks."""


class MeshSection(_Section):
    """The device mesh (`jaxpeft.parallel.make_mesh`): data * fsdp * tensor devices, one size may be -1 (the
    devices the others leave). Default: all devices data-parallel."""

    data: Int = -1
    """Data parallelism: rows split, weights replicated."""
    fsdp: Int = 1
    """Fully sharded data parallelism: rows split and every weight's 'embed' dimension split."""
    tensor: Int = 1
    """Tensor parallelism: heads, MLP width and vocabulary split."""
    rules: dict[str, str | tuple[str, ...] | None] | None = None
    """Logical axis name -> mesh axes (None = replicated); default jaxpeft.parallel.DEFAULT_RULES."""

    @field_validator("data", "fsdp", "tensor")
    @classmethod
    def _size(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError(f"{v}: a mesh size must be >= 1, or -1 for the devices the other sizes leave")
        return v

    @field_validator("rules")
    @classmethod
    def _rules(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        for name, axes in (v or {}).items():
            bad = [a for a in ((axes,) if isinstance(axes, str) else (axes or ())) if a not in ("data", "fsdp", "tensor")]
            if bad:
                raise ValueError(f"{name}: {bad} are not mesh axes; use data, fsdp or tensor (or null)")
        return v


class RunConfig(_Section):
    """A whole run: `jaxpeft train CONFIG.yaml` or `jaxpeft.train.run(RunConfig(...))`."""

    model: ModelSection
    """The pretrained backbone."""
    adapter: AdapterSection = AdapterSection()
    """The PEFT method and its options."""
    data: DataSection
    """Where the rows come from and how they are tokenized and padded."""
    optim: OptimSection = OptimSection()
    """Optimizer, learning-rate schedule and clipping."""
    train: TrainSection = TrainSection()
    """Steps, batches, evaluation, checkpoints and the run folder."""
    generation: GenerationSection = GenerationSection()
    """Decoding for generation metrics and the shown examples."""
    mesh: MeshSection = MeshSection()
    """How devices are arranged (data, fsdp, tensor) and the sharding rules."""
    metrics: tuple[str, ...] | None = None
    """Metrics to report (names from jaxpeft.train.metrics); default by task: exact_match (causal LM),
    accuracy, macro_f1, mcc (classification), span_f1 (tagging), accuracy (multiple choice)."""

    def adapter_config(self) -> Any:
        """The method's AdapterConfig built from the adapter section (ConfigError naming `adapter.<key>`)."""
        return self.adapter.build()


def load_config(source: str | os.PathLike | dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Validate a YAML file (or dict) plus `--set key=value` overrides into a RunConfig.

    Raises ConfigError naming the offending key (dotted path) for unknown keys, wrong types and impossible
    values.
    """
    if isinstance(source, dict):
        try:
            raw = _deep_copy(source)
        except RecursionError:
            raise ConfigError("the config nests too deeply or contains itself") from None
    else:
        path = Path(source)
        try:
            if not path.exists():
                raise ConfigError(f"{path}: config file not found: check the path (e.g. configs/quickstart.yaml)")
            if path.is_dir():
                raise ConfigError(f"{path}: is a folder; give the run config's YAML file")
            text = path.read_text()
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a UTF-8 text file ({e}); give the run config's YAML file") from e
        except OSError as e:  # unreadable, a name too long, ...
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from e
        try:
            raw = _yaml(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e}); fix the syntax at the line shown") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, train, ...)")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.steps=100")
        key, value = item.split("=", 1)
        try:
            parsed = _yaml(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({' '.join(str(e).split())}); write a YAML "
                              "value (quote a string that contains YAML syntax: --set 'KEY=\"[text\"')") from e
        _set(raw, key.strip(), parsed)
    try:
        cfg = RunConfig.model_validate(raw)
        cfg.adapter_config()  # validate the adapter section now, not at step 0
    except ValidationError as e:
        raise ConfigError(_pretty(e)) from None
    except RecursionError:  # a YAML alias inside its own anchor (`adapter: &a {inner: *a}`)
        raise ConfigError("the config nests too deeply or contains itself (a YAML alias inside its own anchor?)") \
            from None
    return cfg


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a section")
    node[last] = value


def _pretty(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            section_key = key.rsplit(".", 1)
            fields = _fields_at(section_key[0]) if len(section_key) == 2 else sorted(RunConfig.model_fields)
            close = difflib.get_close_matches(section_key[-1], fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"{key}: unknown key{hint}; allowed: {', '.join(fields)}")
        elif err["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            lines.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def _fields_at(section: str) -> list[str]:
    model: Any = RunConfig
    for part in section.split("."):
        ann = model.model_fields.get(part)
        if ann is None:
            return []
        model = ann.annotation
    return sorted(getattr(model, "model_fields", {}))


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    return d


def dump_config(cfg: RunConfig) -> str:
    """YAML text of a config (written into each run directory)."""
    return yaml.dump(cfg.model_dump(mode="json", exclude_none=False), Dumper=_YamlDumper, sort_keys=False)
