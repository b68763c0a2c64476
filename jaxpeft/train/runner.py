"""`run(config)`: the whole `jaxpeft train` job as a function (load, adapt, train, evaluate, checkpoint,
export), and `evaluate(...)` for `jaxpeft eval`.

Imports everything below it in the library (models, loading, adapters, generation, train.*); nothing imports
this module except the CLI and users.
"""
from __future__ import annotations

import dataclasses

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxpeft.errors import JaxpeftError, TrainingPreempted
from jaxpeft.faults import fault_point
from jaxpeft.adapters import AdaptedModel
from jaxpeft.adapters.native_io import load_any, save_any
from jaxpeft.adapters.partition import trainable_parameters_line
from jaxpeft.adapters.targeting import partial_layer_targets
from jaxpeft.generation import SamplingConfig
from jaxpeft.train.compile_cache import enable_compilation_cache
from jaxpeft.train.config import ConfigError, RunConfig, dump_config, load_config
from jaxpeft.train.data import Batcher, DataError, Prefetch, data_folder, eval_batches, load_split
from jaxpeft.train.placement import Placement
from jaxpeft.train.preemption import StopSignals
from jaxpeft.train.run_dir import check_resume_config, lock_run_dir
from jaxpeft.train.loop import (gathered_head_tokens, generate_with_adapter, init_optimizer_state, iterate_losses,
                                make_eval_loss, make_optimizer, make_regularizer, make_train_step)
from jaxpeft.train.probes import gate_report, has_gates, has_siamese_gate, siamese_gate_report
from jaxpeft.train.tasks import MODEL_TASK, EvalTools, encode_rows, make_task

ADAPTER_NAME = "default"


class TrainingDiverged(JaxpeftError, RuntimeError):
    """The loss became NaN or inf; the message names the step and batch, the last good checkpoint is kept."""


@dataclass
class RunResult:
    """What a run produced. metrics_before / metrics_after: evaluation at step 0 and at the end."""

    output_dir: Path
    adapter_dir: Path
    final_step: int
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    generations: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Context:
    """Everything a run or an evaluation needs, built once from the config."""

    cfg: RunConfig
    pretrained: Any
    task: Any
    model: AdaptedModel
    state: dict[str, Any]
    eval_rows: list[dict[str, Any]]
    eval_examples: list[dict[str, Any]]
    eval_loss_fn: Any = None
    reg_fn: Any = None
    placement: Placement | None = None
    buckets: tuple[int, ...] = ()
    """Padded lengths in use (data.buckets, or those 'auto' planned from the data)."""
    notes: tuple[str, ...] = ()
    """What the run should tell the user about how it was set up (a fresh head trained or left frozen, ...)."""


def _labels(cfg: RunConfig) -> tuple[str, ...] | None:
    if cfg.data.labels:
        return cfg.data.labels
    folder = Path(data_folder(cfg.data.path)) if cfg.data.path else None
    if cfg.model.task in ("seq_cls", "token_cls") and folder and (folder / "labels.json").exists():
        return tuple(json.loads((folder / "labels.json").read_text()))
    if cfg.model.task in ("seq_cls", "token_cls"):
        raise ConfigError("data.labels: needed for classification (or a labels.json next to the data)")
    return None


def _context(cfg: RunConfig, calibrate: bool = False) -> _Context:
    """calibrate: methods that need input statistics at init (CorDA) gather them on the first training examples;
    otherwise they get placeholders, which the caller overwrites from a checkpoint's saved extras."""
    from jaxpeft.loading.pretrained import load_pretrained

    labels = _labels(cfg)
    placement = _placement(cfg)
    pre = load_pretrained(cfg.model.checkpoint, task=MODEL_TASK[cfg.model.task], dtype=cfg.model.dtype,
                          param_dtype=cfg.model.param_dtype, scan_layers=cfg.model.scan_layers, remat=cfg.model.remat,
                          num_labels=len(labels) if labels else None, mesh=placement.mesh, rules=placement.rules)
    if pre.tokenizer is None:
        raise ConfigError(f"model.checkpoint={cfg.model.checkpoint!r} has no tokenizer; jaxpeft needs tokenizer.json")
    task = make_task(cfg, pre.tokenizer, labels)
    adapter_cfg = cfg.adapter_config()
    if getattr(adapter_cfg, "total_step", 0) is None:  # AdaLoRA's schedule spans the run unless told otherwise
        adapter_cfg = dataclasses.replace(adapter_cfg, total_step=cfg.train.steps)
    adapter_cfg, head_note = _new_head(cfg, pre, adapter_cfg)
    try:
        model = AdaptedModel.wrap(pre.module).add(ADAPTER_NAME, adapter_cfg)
    except ValueError as e:  # targets that match nothing, layers out of range, a method the model cannot take
        raise ConfigError(f"adapter: {e}") from e
    _check_positions(cfg, pre.config, model)
    spec = model.spec(ADAPTER_NAME)
    partial = [] if spec.config.layers_to_transform is not None else partial_layer_targets(spec.targets)
    partial_note = partial and ("note: the adapter's targets match some modules in only some layers "
                                "(layers_to_transform is not set): " + "; ".join(partial))
    state = _init_state(model, pre.params, cfg.train.seed, _calibration(cfg, model, pre.params, task, calibrate),
                        placement)
    eval_rows = load_split(cfg.data, cfg.data.eval_split, cfg.data.max_eval_rows)
    eval_examples = encode_rows(task, eval_rows)
    ctx = _Context(cfg, pre, task, model, state, eval_rows, eval_examples, placement=placement,
                   buckets=_buckets(cfg, [], eval_examples), notes=tuple(filter(None, [head_note, partial_note])))
    return _with_model(ctx, model, state)


def _new_head(cfg: RunConfig, pre: Any, adapter_cfg: Any) -> tuple[Any, str | None]:
    """(adapter config, note): a classification head the checkpoint lacks is added to modules_to_save (trained
    with the adapter, as PEFT does for SEQ_CLS / TOKEN_CLS) unless model.train_new_head is false."""
    fresh = sorted({p.split("/")[0] for p in getattr(pre, "newly_initialised", [])})
    if cfg.model.task not in ("seq_cls", "token_cls") or not fresh:
        return adapter_cfg, None
    already = set(adapter_cfg.modules_to_save or ())
    missing = [m for m in fresh if m not in already]
    if adapter_cfg.method == "full" or not missing:
        return adapter_cfg, None
    heads = ", ".join(missing)
    if not cfg.model.train_new_head:
        return adapter_cfg, (f"warning: the {cfg.model.task} head ({heads}) is not in the checkpoint: it stays at its "
                             "random initialisation because model.train_new_head is false")
    adapter_cfg = dataclasses.replace(adapter_cfg, modules_to_save=tuple(adapter_cfg.modules_to_save) + tuple(missing))
    return adapter_cfg, (f"the {cfg.model.task} head ({heads}) is not in the checkpoint: it is trained with the "
                         "adapter (counted below; model.train_new_head: false keeps it frozen)")


def _buckets(cfg: RunConfig, train_examples: list[Any], eval_examples: list[Any]) -> tuple[int, ...]:
    """data.buckets, or for 'auto' the lengths planned from the batches this run will form (training order of
    epoch 0 and the evaluation batches) with data.max_length as the fallback."""
    from jaxpeft.train.data import batch_maxima, plan_buckets

    d = cfg.data
    if d.buckets != "auto":
        return tuple(d.buckets)
    maxima = batch_maxima(eval_examples, cfg.train.eval_batch_size)
    if len(train_examples) >= cfg.train.batch_size:
        maxima += batch_maxima(train_examples, cfg.train.batch_size, seed=cfg.train.seed)
    return plan_buckets(maxima, d.max_length, d.bucket_multiple, d.max_buckets)


def _placement(cfg: RunConfig) -> Placement:
    """The run's mesh (all devices, across processes) and logical-axis rules; batch sizes must split over it."""
    from jaxpeft.parallel import MeshError, make_mesh

    m = cfg.mesh
    try:
        mesh = make_mesh(m.data, m.fsdp, m.tensor)
    except MeshError as e:
        raise ConfigError(f"mesh: {e}") from e
    placement = Placement(mesh, tuple(m.rules.items()) if m.rules else None)
    n = placement.batch_divisor
    for key, value in (("train.batch_size", cfg.train.batch_size // cfg.train.grad_accum),
                       ("train.eval_batch_size", cfg.train.eval_batch_size)):
        if value % n:
            raise ConfigError(f"{key}: {value} rows{' per micro-batch' if key == 'train.batch_size' else ''} "
                              f"cannot be split over the mesh's {n} data-parallel devices (data * fsdp); make it a "
                              f"multiple of {n}")
    return placement


def _init_state(model: AdaptedModel, frozen: Any, seed: int, calibration: Any, placement: Placement) -> Any:
    """The adapters' variables created directly in their shardings (each like the base weight it adapts)."""
    def init(frozen, rng, calibration):
        return model.init(rng, frozen, calibration=calibration)

    rng = jax.random.key(seed)
    abstract = jax.eval_shape(init, frozen, rng, calibration)
    return jax.jit(init, out_shardings=placement.state_shardings(model, abstract))(frozen, rng, calibration)


def _calibration(cfg: RunConfig, model: AdaptedModel, params: Any, task: Any, calibrate: bool
                 ) -> dict[str, Any] | None:
    """{adapter: statistics} for a method that needs calibration (None otherwise): from the first
    `adapter.calibration_samples` training examples, unpadded, one per forward."""
    placeholder = model.placeholder_calibration(ADAPTER_NAME)
    if placeholder is None:
        return None
    if not calibrate:
        return {ADAPTER_NAME: placeholder}
    n = model.spec(ADAPTER_NAME).config.calibration_samples  # the method's own config (inside a wrapper: IMSM)
    rows = load_split(cfg.data, cfg.data.train_split, n)
    seqs = [ex["input_ids"] for ex in encode_rows(task, rows)[:n]]
    return {ADAPTER_NAME: model.calibrate(params, seqs, ADAPTER_NAME)}


def _check_positions(cfg: RunConfig, model_cfg: Any, model: AdaptedModel) -> None:
    """Learned position tables (BERT 512, GPT-2 1024) must hold max_length tokens after the prefix's shift."""
    if model_cfg.arch not in ("bert", "roberta", "gpt2"):
        return
    shift = model.max_position_shift()
    limit = model_cfg.max_position_embeddings - (model_cfg.pad_token_id + 1 if model_cfg.arch == "roberta" else 0)
    if cfg.data.max_length + shift > limit:
        extra = f" + the prefix's position shift {shift}" if shift else ""
        raise ConfigError(f"data.max_length={cfg.data.max_length}{extra} exceeds the {limit} learned positions of "
                          f"this {model_cfg.arch} model: lower data.max_length"
                          + (" or set adapter.position_offset: 0" if shift else ""))


def _evaluate(ctx: _Context, trainable: Any) -> dict[str, float]:
    """Eval loss plus the task's metrics on the evaluation split (the task runs its own evaluation), and the
    method's regulariser at these weights."""
    frozen, extras = ctx.pretrained.params, ctx.state["extras"]
    pad = ctx.pretrained.tokenizer.pad_token_id or 0

    def score(examples):
        batches = eval_batches(examples, ctx.cfg.train.eval_batch_size, ctx.buckets, pad)
        return iterate_losses(ctx.eval_loss_fn, trainable, frozen, extras, batches, ctx.placement)

    result = ctx.task.evaluate(ctx.eval_rows, ctx.eval_examples,
                               EvalTools(score, lambda rows: _generate(ctx, trainable, rows)))
    if ctx.reg_fn is not None:  # the method's R at these weights, beside the task loss
        result["eval_regularizer"] = float(ctx.reg_fn(trainable, extras))
    return result


def _generate(ctx: _Context, trainable: Any, rows: list[dict[str, Any]]) -> list[str]:
    tok, g = ctx.pretrained.tokenizer, ctx.cfg.generation
    prompts = [ctx.task.prompt_ids(r, i) for i, r in enumerate(rows)]
    outs = generate_with_adapter(ctx.model, ctx.pretrained.params, {"trainable": trainable, "extras": ctx.state["extras"]},
                                 prompts, max_new_tokens=g.max_new_tokens, eos_token_ids=tok.eos_token_ids,
                                 pad_token_id=tok.pad_token_id or 0,
                                 sampling=SamplingConfig(g.temperature, g.top_k, g.top_p),
                                 batch_size=ctx.cfg.train.eval_batch_size, seed=ctx.cfg.train.seed,
                                 replicated=ctx.placement.replicated if ctx.placement else None)
    return [tok.decode(o, skip_special_tokens=True).strip() for o in outs]


class UpdateNormWatch:
    """Warns when a step's update norm exceeds `factor` times the running mean of the steps before it (an exploding
    adapter), after a few steps of history, at most once per 100 steps; factor 0 turns it off."""

    def __init__(self, factor: float, warmup: int = 5) -> None:
        self.factor, self.warmup = factor, warmup
        self.mean, self.count, self.last_warned = 0.0, 0, -100

    def observe(self, step: int, norm: float) -> str | None:
        """Record step's update norm; the warning text when it explodes, else None."""
        if not self.factor or not math.isfinite(norm):
            return None
        message = None
        if (self.count >= self.warmup and norm > self.factor * self.mean and step - self.last_warned >= 100):
            self.last_warned = step
            message = (f"warning: step {step}: the adapter update norm {norm:.3g} is {norm / self.mean:.0f}x its "
                       f"running mean {self.mean:.3g} (train.update_norm_warning={self.factor:g}): the adapter may be "
                       "exploding; lower optim.lr, set optim.clip_norm or add warm-up steps")
        self.count += 1
        self.mean += (norm - self.mean) / min(self.count, 50)  # mean of the first 50 steps, then an EMA
        return message


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def run(config: RunConfig | str | dict, overrides: tuple[str, ...] | list[str] = (), *, verbose: bool = True) -> RunResult:
    """Train an adapter as the config says; resume from `train.output_dir` when it holds checkpoints.

    Returns the metrics before and after training, and where the PEFT-format adapter was written. Raises
    TrainingPreempted after SIGTERM/SIGINT once a checkpoint of the step reached is written (run again to resume),
    ConfigError when another run holds the folder or a resumed run's config changes training.
    """
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    enable_compilation_cache(cfg.train.compilation_cache_dir)
    out = Path(cfg.train.output_dir)
    main = jax.process_index() == 0  # with several processes only the first writes run files and prints
    # checkpoints trained under other settings would silently change this run
    notes = check_resume_config(out, cfg) if cfg.train.resume else []
    with lock_run_dir(out, enabled=main), StopSignals() as stop:
        return _run(cfg, out, main, stop, verbose, notes)


def _run(cfg: RunConfig, out: Path, main: bool, stop: StopSignals, verbose: bool, notes: list[str]) -> RunResult:
    """The body of `run` once the run folder is locked and stop signals are caught."""
    from jaxpeft.train.logging import RunLogger

    say = print if verbose and main else (lambda *a, **k: None)
    ctx = _context(cfg, calibrate=True)
    if main:  # written once the config proved buildable, so a failed start never replaces a run's config.yaml
        (out / "config.yaml").write_text(dump_config(cfg))
    place = ctx.placement
    frozen = ctx.pretrained.params
    for note in (*notes, *ctx.notes):
        say(note)
    say(trainable_parameters_line(ctx.model, ctx.state, frozen))
    train_rows = load_split(cfg.data, cfg.data.train_split, cfg.data.max_train_rows)
    train_examples = encode_rows(ctx.task, train_rows)
    ctx = dataclasses.replace(ctx, buckets=_buckets(cfg, train_examples, ctx.eval_examples))
    say(f"padded lengths (one compile each when used): {list(ctx.buckets)}"
        + (" (planned from the data)" if cfg.data.buckets == "auto" else ""))
    pad = ctx.pretrained.tokenizer.pad_token_id or 0
    batcher = Batcher(train_examples, cfg.train.batch_size, ctx.buckets, pad, cfg.train.seed)
    tx = _optimizer(ctx)
    trainable = ctx.state["trainable"]
    opt_state, opt_sh = _init_opt_state(ctx, tx)
    ckpt = _checkpointer(cfg, frozen)
    result = RunResult(out, out / "adapter", 0)
    start, epoch, index = 0, 0, 0
    if not cfg.train.resume and ckpt.latest_step() is not None:
        raise ConfigError(f"train.resume=false but {out / 'checkpoints'} already holds checkpoints (latest step "
                          f"{ckpt.latest_step()}): choose a new train.output_dir, delete that folder, or resume")
    if cfg.train.resume and ckpt.latest_step() is not None:
        trainable, opt_state, meta = ckpt.restore(trainable_like=trainable, opt_state_like=opt_state)
        saved_extras = ckpt.restore_extras(meta["step"], extras_like=ctx.state["extras"])
        if saved_extras is not None:  # the frozen SVD factors etc. as trained with, not recomputed
            ctx.state["extras"] = saved_extras
        start, epoch, index = meta["step"], meta["epoch"], meta["index"]
        result.metrics_before = meta.get("metrics_before", {})
        say(f"resumed from step {start} ({out / 'checkpoints'})")
    logger = RunLogger(out, total_steps=cfg.train.steps, start_step=start, enable_progress=verbose,
                       log_every=cfg.train.log_every, write=main)
    if start == 0 and cfg.train.eval_before_training:
        result.metrics_before = _evaluate(ctx, trainable)
        logger.log(0, result.metrics_before, split="eval")
        say(f"before training: {_fmt(result.metrics_before)}")
    # causal LM: the head runs only on the positions the loss scores (no full-vocabulary logits elsewhere)
    head_tokens = gathered_head_tokens(train_examples) if cfg.model.task == "causal_lm" else None
    shardings = (place.like(trainable), opt_sh, place.like(frozen), place.like(ctx.state["extras"]), place.batch)
    step_fn = make_train_step(ctx.model, ctx.task, tx, cfg.train.grad_accum, cfg.train.seed, peak_lr=cfg.optim.lr,
                              total_steps=cfg.train.steps, head_tokens=head_tokens, shardings=shardings,
                              loss_chunk=cfg.train.loss_chunk if head_tokens else None)
    extras = ctx.state["extras"]
    last_eval: dict[str, float] = {}
    has_reg = ctx.model.has_regularizer("loss") or ctx.model.has_regularizer("post_clip")
    t0, tokens = time.perf_counter(), 0
    # steps run ahead of the host: a step's terms are read back once the next step is queued (or at once at a
    # log, eval or checkpoint step), so the device never waits for Python between steps
    pending: list[tuple[int, int, int, int, dict[str, Any]]] = []  # (step, epoch, index, tokens, terms)
    norms = UpdateNormWatch(cfg.train.update_norm_warning)

    def settle(keep: int = 0) -> None:
        """Read back every pending step but the newest `keep`, in order; a non-finite loss stops the run there."""
        nonlocal tokens
        while len(pending) > keep:
            s, ep, ix, ntok, terms = pending.pop(0)
            loss = float(terms["loss"])
            if not math.isfinite(loss):
                # checkpoint k holds the weights the loss at loop step k was computed with: those before `s`
                # gave finite losses, the one at `s` (if saved) did not; nothing after `s` is ever saved
                good = [k for k in ckpt.all_steps() if k < s]
                where = (f"the last good checkpoint is step {max(good)} in {out / 'checkpoints'}" if good
                         else "no checkpoint was saved before it")
                raise TrainingDiverged(f"loss or gradient is not finite at step {s + 1} (epoch {ep}, batch "
                                       f"{ix}); stopped with the weights unchanged, {where}: lower optim.lr, "
                                       "set optim.clip_norm, or check the data")
            tokens += ntok
            result.train_losses.append((s + 1, loss))
            logger.progress(s + 1, loss, ntok)
            norm = float(terms["update_norm"])
            warning = norms.observe(s + 1, norm)
            if warning and main:
                say(warning) if verbose else warnings.warn(warning, RuntimeWarning, stacklevel=2)
            if (s + 1) % cfg.train.log_every == 0:
                logged = {"loss": loss, "update_norm": norm}
                if has_reg:  # task loss and regulariser separately
                    logged.update({k: float(v) for k, v in terms.items() if k not in ("loss", "update_norm")})
                logger.log(s + 1, {**logged, "tokens_per_s": tokens / (time.perf_counter() - t0)})

    batches = Prefetch(batcher.iterate(epoch, index), cfg.train.prefetch)
    try:
        for step in range(start, cfg.train.steps):
            epoch, index, batch = next(batches)
            trainable, opt_state, terms = step_fn(trainable, opt_state, frozen, extras, place.global_batch(batch),
                                                  np.int32(step))
            pending.append((step, epoch, index, int(batch["attention_mask"].sum()), terms))
            fault_point("train.step", step + 1)
            done = step + 1 == cfg.train.steps
            stopping = not done and stop.agreed(step + 1, cfg.train.preemption_check_every)
            evaluate_now = (step + 1) % cfg.train.eval_every == 0 or done
            save_now = (step + 1) % cfg.train.checkpoint_every == 0 or done or stopping
            settle(keep=0 if evaluate_now or save_now or (step + 1) % cfg.train.log_every == 0 else 1)
            metrics = None
            if evaluate_now:
                last_eval = metrics = _evaluate(ctx, trainable)
                logger.log(step + 1, metrics, split="eval")
            if save_now:
                nxt_epoch, nxt_index = (epoch, index + 1) if index + 1 < batcher.batches_per_epoch else (epoch + 1, 0)
                ckpt.save(step + 1, trainable, opt_state,
                          meta={"step": step + 1, "epoch": nxt_epoch, "index": nxt_index, "seed": cfg.train.seed,
                                "metrics_before": result.metrics_before},
                          metrics=metrics, extras=extras)
            if stopping or (not done and save_now and stop.requested and jax.process_count() == 1):
                ckpt.wait()
                raise TrainingPreempted(f"stopped at step {step + 1} of {cfg.train.steps} on {stop.signal_name}; "
                                        f"checkpoint {step + 1} is in {out / 'checkpoints'}: run the same command "
                                        "again to resume", step + 1)
    finally:
        batches.close()
        ckpt.wait()
        logger.close()
    result.final_step = cfg.train.steps
    result.metrics_after = last_eval or _evaluate(ctx, trainable)
    say(f"after training:  {_fmt(result.metrics_after)}")
    final_state = {"trainable": trainable, "extras": extras}
    if ctx.model.has_train_hooks():  # e.g. AdaLoRA's rank mask goes into the exported adapter
        final_state = ctx.model.with_hook_extras(final_state, opt_state["hooks"])
    final_state = place.to_host(final_state)  # every process takes part in the gather
    if main:
        _, fmt = save_any(ctx.model, final_state, ADAPTER_NAME, result.adapter_dir,
                          base_model_name_or_path=cfg.model.checkpoint)
        say(f"adapter ({'Hugging Face PEFT' if fmt == 'peft' else 'jaxpeft'} format): {result.adapter_dir}")
    if has_siamese_gate(ctx.model) and jax.process_count() == 1:
        report = siamese_gate_report(ctx, trainable, out)
        say(f"IMSM gate histogram: {report['png']} ({report['json']})")
    if has_gates(ctx.model) and jax.process_count() == 1:
        report = gate_report(ctx, trainable, out)
        say(f"gate statistics: {report['json']} and heatmap {report['png']}")
    if cfg.model.task == "causal_lm" and cfg.generation.show_examples:
        rows = ctx.eval_rows[: cfg.generation.show_examples]
        for row, text in zip(rows, _generate(ctx, trainable, rows)):
            result.generations.append((row[cfg.data.prompt_field], text))
            say(f"--- {row[cfg.data.prompt_field]!r} -> {text!r} (reference {ctx.task.references(row)[0]!r})")
    ckpt.close()
    return result


def evaluate(config: RunConfig | str | dict, overrides: tuple[str, ...] | list[str] = (), *,
             adapter: str | None = None, step: int | None = None, compare_base: bool = False) -> dict[str, float]:
    """Evaluate a trained adapter: from an adapter folder (`adapter`: HF PEFT or jaxpeft format) or the run's
    checkpoint (`step`, default latest).

    compare_base: also evaluate the base model alone on the same split ('base_<metric>' keys): point the config
    (e.g. `--set data.path=...`) at a second, held-out task to measure forgetting next to the base.
    """
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    ctx = _context(cfg)
    base = _evaluate_base(ctx) if compare_base else {}
    if adapter is not None:
        model, state = load_any(AdaptedModel.wrap(ctx.pretrained.module), ctx.pretrained.params, adapter,
                                name=ADAPTER_NAME)
        ctx = _with_model(ctx, model, state)
        trainable = state["trainable"]
    else:
        trainable = _restore_checkpoint(ctx, step)
    return {**_evaluate(ctx, trainable), **base}


def _evaluate_base(ctx: _Context) -> dict[str, float]:
    """The base model's metrics on the context's evaluation split, keys prefixed 'base_' (ctx is left as is)."""
    base = _with_model(ctx, AdaptedModel.wrap(ctx.pretrained.module), {"trainable": {}, "extras": {}})
    return {f"base_{k}": v for k, v in _evaluate(base, {}).items()}


def _with_model(ctx: _Context, model: AdaptedModel, state: Any) -> _Context:
    """A copy of the context evaluating `model` with `state` (its loss and regulariser functions rebuilt)."""
    rep = ctx.placement.replicated if ctx.placement else None
    return dataclasses.replace(ctx, model=model, state=state,
                               eval_loss_fn=make_eval_loss(model, ctx.task, rep, ctx.cfg.train.loss_chunk),
                               reg_fn=make_regularizer(model) if model.has_regularizer("loss") else None)


def _optimizer(ctx: _Context) -> Any:
    """The run's optax transformation (with the post-clip slot when a method needs it, e.g. SORSA)."""
    groups = ctx.model.lr_groups(ctx.cfg.optim.lr)
    return make_optimizer(ctx.cfg.optim, ctx.cfg.train.steps, post_clip=ctx.model.has_regularizer("post_clip"),
                          group_lrs=groups, labels=ctx.model.param_labels if len(groups) > 1 else None)


def _init_opt_state(ctx: _Context, tx: Any) -> tuple[Any, Any]:
    """(optimizer state, its shardings): the moments shard like the params they track; training hooks'
    state (AdaLoRA's importance EMAs and budget) is replicated."""
    place, model = ctx.placement, ctx.model

    def init(state):
        return init_optimizer_state(model, tx, state)

    abstract = jax.eval_shape(init, ctx.state)
    trainable_sh = place.like(ctx.state["trainable"])
    if model.has_train_hooks():
        sh = {"optimizer": place.opt_shardings(abstract["optimizer"], trainable_sh),
              "hooks": jax.tree.map(lambda _: place.replicated, abstract["hooks"])}
    else:
        sh = place.opt_shardings(abstract, trainable_sh)
    return jax.jit(init, out_shardings=sh)(ctx.state), sh


def _checkpointer(cfg: RunConfig, frozen: Any) -> Any:
    """The run's RunCheckpointer (train.output_dir/checkpoints, keep-last/best policy, the base's fingerprint)."""
    from jaxpeft.train.checkpoint import RunCheckpointer, fingerprint

    return RunCheckpointer(Path(cfg.train.output_dir) / "checkpoints", keep_last=cfg.train.keep_last,
                           best_metric=cfg.train.best_metric, best_mode=cfg.train.best_mode,
                           base_fingerprint=fingerprint(frozen))


def _restore_checkpoint(ctx: _Context, step: int | None) -> Any:
    """The trainable tree of a run checkpoint (default latest); its saved frozen extras replace ctx.state's."""
    cfg = ctx.cfg
    with _checkpointer(cfg, ctx.pretrained.params) as ckpt:
        step = ckpt.latest_step() if step is None else step
        hooks = None
        if ctx.model.has_train_hooks():  # their state (e.g. AdaLoRA's rank mask) is part of the optimizer state
            like, _ = _init_opt_state(ctx, _optimizer(ctx))
            trainable, opt_state, _ = ckpt.restore(step, trainable_like=ctx.state["trainable"], opt_state_like=like)
            hooks = opt_state["hooks"]
        else:
            trainable, _ = ckpt.restore_trainable(step, trainable_like=ctx.state["trainable"])
        extras = ckpt.restore_extras(step, extras_like=ctx.state["extras"])
    if extras is not None:
        ctx.state["extras"] = extras
    if hooks is not None:
        ctx.state = ctx.model.with_hook_extras({"trainable": trainable, "extras": ctx.state["extras"]}, hooks)
    return trainable


def export_checkpoint(config: RunConfig | str | dict, out_dir: str, *, step: int | None = None,
                      overrides: tuple[str, ...] | list[str] = ()) -> Path:
    """Write a run checkpoint (default latest) as an adapter folder: HF PEFT format when PEFT can hold the method,
    else the jaxpeft format."""
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    ctx = _context(cfg)
    trainable = _restore_checkpoint(ctx, step)
    return save_any(ctx.model, {"trainable": trainable, "extras": ctx.state["extras"]}, ADAPTER_NAME, out_dir,
                    base_model_name_or_path=cfg.model.checkpoint)[0]


def merge_to_folder(checkpoint: str, adapter: str, out_dir: str, task: str = "causal_lm") -> Path:
    """Base + PEFT adapter -> merged weights as a Hugging Face folder (config.json, model.safetensors, tokenizer)."""
    from jaxpeft.adapters.merge import merge
    from jaxpeft.loading.pretrained import load_pretrained, save_hf_folder

    pre = load_pretrained(checkpoint, task=task)
    model, state = load_any(AdaptedModel.wrap(pre.module), pre.params, adapter)
    merged, _ = merge(model, pre.params, state, "default")
    return save_hf_folder(pre, out_dir, merged)


__all__ = ["RunResult", "TrainingDiverged", "DataError", "run", "evaluate", "export_checkpoint", "merge_to_folder"]
