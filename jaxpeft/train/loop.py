"""The jitted pieces of training: optimizer and schedule, the train step (gradient accumulation, dropout keys
from (seed, step, micro-step), donated buffers), and the evaluation passes.

Imports jax/optax, jaxpeft.adapters, jaxpeft.generation, jaxpeft.parallel and sibling train modules.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft.adapters import AdaptedModel
from jaxpeft.generation import SamplingConfig, generate
from jaxpeft import parallel
from jaxpeft.train.config import OptimSection
from jaxpeft.train.tasks import Task


def make_optimizer(cfg: OptimSection, total_steps: int, post_clip: bool = False,
                   group_lrs: dict[str, float] | None = None, labels: Callable[[Any], Any] | None = None
                   ) -> optax.GradientTransformation:
    """Warmup + constant/linear/cosine schedule; AdamW or Adafactor; global-norm clipping first.

    post_clip: the update also takes `post_clip_grads=` (a tree like the params), added to the gradient after
    clipping and before the optimizer (SORSA's regulariser); the optimizer state then has one more (empty) entry.
    group_lrs / labels: parameter groups with their own peak lr (e.g. IMSM's gate): labels(params) gives each
    leaf a key of group_lrs; every group has the same schedule shape and clipping stays global.
    """
    warm = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warm, 1)

    def optimizer(peak: float) -> optax.GradientTransformation:
        if cfg.schedule == "constant":
            after = optax.constant_schedule(peak)
        elif cfg.schedule == "linear":
            after = optax.linear_schedule(peak, 0.0, decay_steps)
        else:
            after = optax.cosine_decay_schedule(peak, decay_steps)
        schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm]) if warm else after
        if cfg.optimizer == "adamw":
            return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
        return optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None)

    if group_lrs and len(group_lrs) > 1:
        if labels is None:
            raise ValueError("group_lrs needs labels(params) naming each leaf's group")
        opt = optax.partition({name: optimizer(lr) for name, lr in group_lrs.items()}, labels)
    else:
        opt = optimizer(cfg.lr)
    parts = ([optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []) + (
        [add_post_clip_grads()] if post_clip else []) + [opt]
    return optax.chain(*parts) if len(parts) > 1 else opt


def add_post_clip_grads() -> optax.GradientTransformationExtraArgs:
    """Adds the `post_clip_grads` extra argument of `update` to the incoming updates (no state)."""
    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, post_clip_grads=None, **extra_args):
        del params, extra_args
        if post_clip_grads is not None:
            updates = jax.tree.map(jnp.add, updates, post_clip_grads)
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dropout_key(seed: int, step: jax.Array, micro: jax.Array) -> jax.Array:
    """The dropout key of one micro-batch: a pure function of (seed, step, micro-step), so resume is exact."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), micro)


def init_optimizer_state(model: AdaptedModel, tx: optax.GradientTransformation, state: Any) -> Any:
    """The optimizer state of `state['trainable']`; with training hooks (AdaLoRA) {'optimizer': ..., 'hooks': ...}
    (the hooks' state is checkpointed and resumed with it)."""
    opt_state = tx.init(state["trainable"])
    if model.has_train_hooks():
        return {"optimizer": opt_state, "hooks": model.init_hook_state(state)}
    return opt_state


def make_train_step(model: AdaptedModel, task: Task, tx: optax.GradientTransformation, grad_accum: int,
                    seed: int, peak_lr: float | None = None, total_steps: int | None = None,
                    head_tokens: int | None = None, shardings: Sequence[Any] | None = None,
                    loss_chunk: int | None = None) -> Callable:
    """step(trainable, opt_state, frozen, extras, batch, step) -> (trainable, opt_state, terms).

    The batch (B, ...) is split into `grad_accum` micro-batches with a stride (micro-batch i holds rows i,
    i + grad_accum, ...: each spans every data shard of a sharded batch) scanned in order; the task gradient is the
    token-weighted mean over all of them, equal to one big batch's. The adapters' method regularisers R
    (`AdaptedModel.regularizer`) are added once per optimizer step, after that normalisation: to the loss and
    its gradient (placement 'loss'), or as post_clip_scale(peak_lr) * grad R after clipping (placement
    'post_clip': tx must come from make_optimizer(..., post_clip=True)). Only `trainable` is differentiated.
    terms: {'loss': task loss + R, 'task_loss', 'regularizer', 'update_norm' (global norm of the optimizer's
    update)} (and 'post_clip_regularizer', unscaled, when there is one), float32 scalars. A non-finite loss or
    gradient returns the inputs unchanged and loss = NaN (checked inside the step: no extra host round trip).
    Training hooks (AdaLoRA) run after the update on the step's gradients (before clipping); opt_state then comes
    from `init_optimizer_state`, and total_steps is the run's length.
    head_tokens: K, run the head only at the K positions each row's loss scores (`gathered_head_tokens`), not
    full-vocabulary logits at every position (causal LM); None: the full head. loss_chunk: with head_tokens, the
    head and cross-entropy run that many positions at a time (`CausalLMTask.chunked_loss`): at most
    (B / grad_accum, loss_chunk, V) logits exist at once, also in the backward pass.
    shardings: (trainable, opt_state, frozen, extras, batch) shardings (trees or prefixes, e.g. from
    `jaxpeft.train.placement.Placement`): the step is compiled for them (terms replicated); None: as placed.
    """
    post_clip = model.has_regularizer("post_clip")
    hooked = model.has_train_hooks()
    if hooked and total_steps is None:
        raise ValueError("this adapter has a training hook (e.g. AdaLoRA's rank schedule): pass total_steps")
    if post_clip and peak_lr is None:
        raise ValueError("a post_clip regulariser (e.g. SORSA) scales its gradient by gamma / peak lr: pass peak_lr")

    def loss_fn(trainable, frozen, extras, mb, rng):
        state = {"trainable": trainable, "extras": extras}
        kw = task.model_inputs(mb)
        if head_tokens:
            positions = task.scored_positions(mb, head_tokens)
            out = model.apply(frozen, state, mb["input_ids"], mb["attention_mask"], deterministic=False,
                              rngs={"dropout": rng}, head_positions_bk=positions, run_head=not loss_chunk, **kw)
            if loss_chunk:
                return task.chunked_loss(out.hidden, lambda h: model.head(frozen, state, h), mb, positions,
                                         loss_chunk)
            return task.gathered_loss(out, mb, positions)
        out = model.apply(frozen, state, mb["input_ids"], mb["attention_mask"], deterministic=False,
                          rngs={"dropout": rng}, **kw)
        return task.loss(out, mb)

    def reg_fn(trainable, extras, placement, lr):
        return model.regularizer({"trainable": trainable, "extras": extras}, placement=placement, peak_lr=lr)

    def step_fn(trainable, opt_state, frozen, extras, batch, step):
        micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]),
                                                    0, 1), batch)

        def body(carry, xs):
            grads, total, count = carry
            mb, i = xs
            (s, n), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, extras, mb,
                                                                  dropout_key(seed, step, i))
            return (jax.tree.map(jnp.add, grads, g), total + s, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (grads, total, count), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), (micro, jnp.arange(grad_accum)))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        task_loss = total / count
        terms = {"task_loss": task_loss, "regularizer": jnp.zeros((), jnp.float32)}
        if model.has_regularizer("loss"):
            reg, reg_grads = jax.value_and_grad(reg_fn)(trainable, extras, "loss", None)
            grads = jax.tree.map(jnp.add, grads, reg_grads)
            terms["regularizer"] = reg
        loss = task_loss + terms["regularizer"]
        extra_args = {}
        if post_clip:
            terms["post_clip_regularizer"] = reg_fn(trainable, extras, "post_clip", None)
            extra_args["post_clip_grads"] = jax.grad(reg_fn)(trainable, extras, "post_clip", peak_lr)
        # a non-finite loss or gradient leaves the state untouched (and is reported as a NaN loss), so no
        # NaN ever reaches the weights, the optimizer state or a checkpoint
        ok = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
        tx_state = opt_state["optimizer"] if hooked else opt_state
        updates, new_tx_state = tx.update(grads, tx_state, trainable, **extra_args)
        new_trainable = optax.apply_updates(trainable, updates)
        new_opt_state = new_tx_state
        if hooked:
            new_trainable, hooks = model.after_step(new_trainable, grads, extras, opt_state["hooks"], step,
                                                    total_steps)
            new_opt_state = {"optimizer": new_tx_state, "hooks": hooks}
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        terms["loss"] = jnp.where(ok, loss, jnp.nan)
        terms["update_norm"] = optax.tree.norm(updates)  # the loop warns when it explodes
        return keep(new_trainable, trainable), keep(new_opt_state, opt_state), terms

    if shardings is None:
        return jax.jit(step_fn, donate_argnums=(0, 1))
    t_sh, o_sh, f_sh, e_sh, b_sh = shardings
    rep = parallel.replicated(b_sh.mesh)
    return jax.jit(step_fn, donate_argnums=(0, 1), in_shardings=(t_sh, o_sh, f_sh, e_sh, b_sh, rep),
                   out_shardings=(t_sh, o_sh, rep))


def gathered_head_tokens(examples: Sequence[dict[str, Any]], multiple: int = 8) -> int | None:
    """K for a gathered head: the most scored tokens of any example (loss_mask), rounded up to a multiple (few
    distinct shapes); None when the examples carry no loss mask (classification)."""
    counts = [int(sum(e["loss_mask"][1:])) for e in examples if "loss_mask" in e]
    if not counts:
        return None
    return max(multiple, -(-max(counts) // multiple) * multiple)


def make_regularizer(model: AdaptedModel) -> Callable:
    """reg(trainable, extras) -> the adapters' 'loss' regulariser R (float32 scalar), jitted (evaluation logs it)."""
    return jax.jit(lambda trainable, extras: model.regularizer({"trainable": trainable, "extras": extras}))


def make_eval_loss(model: AdaptedModel, task: Task, replicated: Any = None, loss_chunk: int | None = None
                   ) -> Callable:
    """eval_fn(trainable, frozen, extras, host batch, placement=None) -> (loss sum, count, outputs), dropout off;
    with a placement (`jaxpeft.train.placement.Placement`) the batch goes onto the run's mesh first.

    outputs: small per-row arrays, never full LM logits: {'pred'} (classification: predicted labels) or, for
    causal LM, {'row_nll'} (B,): each row's summed nll over its scored tokens (choice scoring reads it). Causal
    LM runs the head only at the scored positions (K from the batch's loss mask, rounded up to 8s: few compiles),
    `loss_chunk` positions at a time when given. replicated: a replicated sharding of the run's mesh: the outputs
    come back whole on every process.
    """
    from jaxpeft.train.tasks import CausalLMTask

    def fn(trainable, frozen, extras, batch, head_tokens):
        state = {"trainable": trainable, "extras": extras}
        kw = task.model_inputs(batch)
        if head_tokens is None:
            out = model.apply(frozen, state, batch["input_ids"], batch["attention_mask"], **kw)
            s, n = task.loss(out, batch)
            return s, n, task.eval_outputs(out, batch)
        positions = task.scored_positions(batch, head_tokens)
        out = model.apply(frozen, state, batch["input_ids"], batch["attention_mask"], head_positions_bk=positions,
                          run_head=False, **kw)
        rows, n = task.chunked_row_loss(out.hidden, lambda h: model.head(frozen, state, h), batch, positions,
                                        loss_chunk or head_tokens)
        return jnp.sum(rows), n, {"row_nll": rows}

    kw = {} if replicated is None else {"out_shardings": replicated}
    compiled = jax.jit(fn, static_argnums=(4,), **kw)
    gathered = isinstance(task, CausalLMTask) and model.model_cfg is not None and model.model_cfg.is_decoder

    def eval_fn(trainable, frozen, extras, batch, placement=None):
        # K from the host batch, so every process plans the same
        k = gathered_head_tokens([{"loss_mask": row} for row in np.asarray(batch["loss_mask"])]) if gathered else None
        return compiled(trainable, frozen, extras, placement.global_batch(batch) if placement else batch, k)
    return eval_fn


def generate_with_adapter(model: AdaptedModel, frozen: Any, state: Any, prompts: Sequence[Sequence[int]], *,
                          max_new_tokens: int, eos_token_ids: Sequence[int], pad_token_id: int,
                          sampling: SamplingConfig = SamplingConfig(), batch_size: int = 32, seed: int = 0,
                          replicated: Any = None) -> list[list[int]]:
    """Generate for many prompts in fixed-size batches (the last one padded), through the adapter.

    replicated: a replicated sharding of the mesh `frozen` lives on (prompts, cache and tokens are placed so)."""
    def model_fn(params, ids, mask, cache):  # the head at the last position only: prefill skips (B, T, V) logits
        last_b1 = jnp.full((ids.shape[0], 1), ids.shape[1] - 1, jnp.int32)
        return model.apply(params[0], params[1], ids, mask, cache=cache, head_positions_bk=last_b1)

    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        n = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n) if len(prompts) > batch_size else []
        res = generate(model.module, (frozen, state), chunk, max_new_tokens=max_new_tokens,
                       eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, sampling=sampling, seed=seed,
                       model_fn=model_fn, cache_key=(model, "adapted"),
                       init_cache=lambda b, n: model.init_cache(state, b, n),
                       position_shift=model.max_position_shift(), replicated=replicated)
        out += res[:n]
    return out


def iterate_losses(fn: Callable, trainable: Any, frozen: Any, extras: Any, batches: Iterable[dict[str, np.ndarray]],
                   placement: Any = None):
    """Yield (loss sum, count, outputs as numpy, host batch) over evaluation batches (placed on the run's mesh
    when given: `jaxpeft.train.placement.Placement`); outputs as `make_eval_loss` returns them."""
    for batch in batches:
        s, n, outputs = fn(trainable, frozen, extras, batch, placement)
        yield float(s), float(n), {k: np.asarray(v) for k, v in outputs.items()}, batch
