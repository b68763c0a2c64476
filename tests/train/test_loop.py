"""The jitted training pieces: gradient accumulation, learning-rate schedules, dropout keys, Adafactor, remat."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpeft
from jaxpeft.adapters import AdaptedModel, LoraConfig
from jaxpeft.train.config import OptimSection, load_config
from jaxpeft.train.data import collate
from jaxpeft.train.loop import dropout_key, make_optimizer, make_train_step
from jaxpeft.train.tasks import encode_rows, make_task

ROWS = [  # different lengths: the two micro-batches of a grad_accum=2 step hold different token counts
    {"prompt": "What is 1 plus 2?\nA:", "response": "3"},
    {"prompt": "Hi", "response": "a much longer answer"},
    {"prompt": "What is 10 minus 4?\nA:", "response": "6"},
    {"prompt": "Q", "response": "zz"},
]


def setup(tiny_llama_dir, *, dropout: bool, remat: str = "none", scan_layers: bool = True, seed: int = 0):
    """(model, task, trainable, extras, frozen, batch) for the tiny llama with a non-zero LoRA adapter."""
    pre = jaxpeft.load_pretrained(tiny_llama_dir, remat=remat, scan_layers=scan_layers,
                                  attention_dropout=0.1 if dropout else 0.0)
    model = AdaptedModel.wrap(pre.module).add("default", LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1 if dropout else 0.0, init_lora_weights=False,
        target_modules=("q_proj", "v_proj")))
    state = model.init(jax.random.key(seed), pre.params)
    cfg = load_config({"model": {"checkpoint": str(tiny_llama_dir)},
                       "data": {"path": "unused", "max_length": 32, "buckets": [32]}})
    task = make_task(cfg, pre.tokenizer, None)
    batch = collate(encode_rows(task, ROWS), (32,), pre.tokenizer.pad_token_id)
    return model, task, state["trainable"], state["extras"], pre.params, batch


TX = optax.sgd(1.0)  # the update is minus the gradient: nothing normalises a wrong scale away
_STEPS: dict = {}


def train_step(model, task, tx, grad_accum: int, seed: int):
    """make_train_step, compiled once per (model, task, tx, grad_accum, seed) in this module (compiles cost ~4 s)."""
    key = (model, id(task), id(tx), grad_accum, seed)
    if key not in _STEPS:
        _STEPS[key] = make_train_step(model, task, tx, grad_accum, seed)
    fn = _STEPS[key]

    def step(*args):  # (trainable, opt_state, total loss): these tests need no separate loss terms
        trainable, opt_state, terms = fn(*args)
        return trainable, opt_state, terms["loss"]
    return step


def copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def bit_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def nodrop(tiny_llama_dir):
    return setup(tiny_llama_dir, dropout=False)


@pytest.fixture(scope="module")
def withdrop(tiny_llama_dir):
    return setup(tiny_llama_dir, dropout=True)


# ------------------------------------------------------------------------------------------ gradient accumulation

def test_grad_accumulation_equals_the_big_batch_gradient(nodrop):
    model, task, trainable, extras, frozen, batch = nodrop

    def big_batch_grads(p):
        def loss(p):
            out = model.apply(frozen, {"trainable": p, "extras": extras}, batch["input_ids"], batch["attention_mask"])
            s, n = task.loss(out, batch)
            return s / n
        return jax.value_and_grad(loss)(p)

    ref_loss, ref_grads = big_batch_grads(trainable)
    results = {}
    for accum in (1, 2):
        step = train_step(model, task, TX, accum, seed=0)
        new, _, loss = step(copy(trainable), TX.init(trainable), frozen, extras, batch, np.int32(0))
        results[accum] = (new, float(loss))
        grads = jax.tree.map(lambda a, b: a - b, trainable, new)
        assert abs(float(loss) - float(ref_loss)) < 1e-6, accum
        assert max_diff(grads, ref_grads) < 1e-6, accum
    assert max_diff(results[1][0], results[2][0]) < 1e-6
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads)) > 1e-3  # not a vacuous check

    # the halves hold different token counts, so a plain mean of per-micro-batch means would differ
    tokens = batch["loss_mask"][:, 1:].sum(-1)
    assert tokens[:2].sum() != tokens[2:].sum()


def test_weight_zero_rows_do_not_change_the_step(nodrop):
    model, task, trainable, extras, frozen, batch = nodrop
    step = train_step(model, task, TX, 2, seed=0)
    padded = {k: np.concatenate([v, v[:2]]) for k, v in batch.items()}  # 6 rows = 2 x 3
    padded["example_weight"][4:] = 0.0
    padded["input_ids"][4:] = 7
    new_a, _, loss_a = step(copy(trainable), TX.init(trainable), frozen, extras, batch, np.int32(0))
    new_b, _, loss_b = step(copy(trainable), TX.init(trainable), frozen, extras, padded, np.int32(0))
    assert abs(float(loss_a) - float(loss_b)) < 1e-6
    assert max_diff(new_a, new_b) < 1e-6


# ------------------------------------------------------------------------------------------ schedules

def lr_trace(cfg: OptimSection, total: int) -> list[float]:
    """The learning rate used at each step, read off AdamW updates for a constant gradient of 1.

    With g = 1 the bias-corrected moments are m = v = 1, so the update is -lr * 1 / (1 + eps)."""
    tx = make_optimizer(cfg, total)
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    out = []
    for _ in range(total):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        out.append(-float(updates["w"]))
    return out


def test_warmup_then_linear_decay():
    lrs = lr_trace(OptimSection(lr=2.0, warmup_steps=4, schedule="linear", clip_norm=None), 12)
    expected = [0.0, 0.5, 1.0, 1.5] + [2.0 * (1 - i / 8) for i in range(8)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-5, atol=1e-7)
    assert lrs[4] == pytest.approx(2.0, rel=1e-5) and lrs[8] == pytest.approx(1.0, rel=1e-5)


def test_warmup_then_cosine_decay():
    lrs = lr_trace(OptimSection(lr=1.0, warmup_steps=2, schedule="cosine", clip_norm=None), 10)
    expected = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(8)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-5, atol=1e-7)
    assert lrs[2] == pytest.approx(1.0, rel=1e-5)
    assert lrs[6] == pytest.approx(0.5, rel=1e-5)  # half-way through the decay


def test_constant_and_no_warmup_and_long_warmup():
    np.testing.assert_allclose(lr_trace(OptimSection(lr=0.3, schedule="constant", clip_norm=None), 5), [0.3] * 5,
                               rtol=1e-5)
    np.testing.assert_allclose(lr_trace(OptimSection(lr=1.0, schedule="linear", clip_norm=None), 4),
                               [1.0, 0.75, 0.5, 0.25], rtol=1e-4)
    # a warmup longer than the run is cut to the run's length
    np.testing.assert_allclose(lr_trace(OptimSection(lr=1.0, warmup_steps=10, schedule="constant",
                                                     clip_norm=None), 4), [0.0, 0.25, 0.5, 0.75], rtol=1e-4)


def test_clipping_applies_to_the_global_norm():
    """clip_norm clips the global gradient norm before AdamW: visible once gradient scales change between steps."""
    grads = [{"a": jnp.asarray([30.0, 0.0, 40.0]), "b": jnp.asarray(0.0)},
             {"a": jnp.asarray([0.3, 0.1, 0.4]), "b": jnp.asarray(0.2)}]
    params = {"a": jnp.zeros((3,)), "b": jnp.zeros(())}

    def updates(tx):
        state, out = tx.init(params), []
        for g in grads:
            u, state = tx.update(g, state, params)
            out.append(u)
        return out

    got = updates(make_optimizer(OptimSection(lr=1.0, clip_norm=1.0, schedule="constant"), 3))
    clipped = updates(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1.0)))
    unclipped = updates(make_optimizer(OptimSection(lr=1.0, clip_norm=None, schedule="constant"), 3))
    assert max_diff(got[1], clipped[1]) < 1e-6
    assert max_diff(got[1], unclipped[1]) > 1e-2


# ------------------------------------------------------------------------------------------ dropout keys

def test_dropout_key_is_a_pure_function_of_seed_step_micro():
    data = lambda k: np.asarray(jax.random.key_data(k)).tolist()  # noqa: E731
    base = data(dropout_key(0, 5, 1))
    assert data(dropout_key(0, 5, 1)) == base
    assert data(dropout_key(0, np.int32(5), np.int32(1))) == base
    assert data(jax.jit(dropout_key, static_argnums=0)(0, jnp.int32(5), jnp.int32(1))) == base
    others = [data(dropout_key(1, 5, 1)), data(dropout_key(0, 6, 1)), data(dropout_key(0, 5, 0)),
              data(dropout_key(0, 1, 5))]
    assert all(o != base for o in others) and len({str(o) for o in others}) == 4


def test_train_step_randomness_depends_only_on_seed_step_and_micro_step(withdrop, nodrop):
    model, task, trainable, extras, frozen, batch = withdrop
    step = train_step(model, task, TX, 2, seed=0)

    def at(step_fn, s, b=batch):
        return step_fn(copy(trainable), TX.init(trainable), frozen, extras, b, np.int32(s))

    p5, _, loss5 = at(step, 5)
    for s in range(5):  # other steps in between: no hidden RNG state advances
        at(step, s)
    p5b, _, loss5b = at(step, 5)
    assert float(loss5) == float(loss5b) and bit_equal(p5, p5b)

    _, _, loss6 = at(step, 6)
    assert float(loss6) != float(loss5)  # (the seed's part is checked on dropout_key itself above)
    # dropout is really on: the same weights without dropout give another loss
    nd_model, nd_task = nodrop[0], nodrop[1]
    _, _, loss_nodrop = train_step(nd_model, nd_task, TX, 2, seed=0)(copy(trainable), TX.init(trainable), frozen,
                                                                       extras, batch, np.int32(5))
    assert float(loss_nodrop) != float(loss5)

    # the micro-step is part of the key: with grad_accum=2, two identical halves are not the same half twice
    half = {k: v[:2] for k, v in batch.items()}
    doubled = {k: np.concatenate([v, v]) for k, v in half.items()}
    _, _, loss_doubled = at(step, 5, doubled)
    _, _, loss_half = at(train_step(model, task, TX, 1, seed=0), 5, half)
    assert float(loss_doubled) != float(loss_half)


# ------------------------------------------------------------------------------------------ Adafactor, remat

def test_adafactor_trains(nodrop):
    model, task, trainable, extras, frozen, batch = nodrop
    tx = make_optimizer(OptimSection(optimizer="adafactor", lr=5e-2, schedule="constant"), 10)
    step = make_train_step(model, task, tx, 2, seed=0)
    params, opt_state = copy(trainable), tx.init(trainable)
    losses = []
    for s in range(6):
        params, opt_state, terms = step(params, opt_state, frozen, extras, batch, np.int32(s))
        losses.append(float(terms["loss"]))
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 1e-3, losses
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))
    assert max_diff(params, trainable) > 1e-4


@pytest.mark.parametrize("remat,scan_layers", [("full", True), ("dots", False), ("dots_no_batch", True)])
def test_remat_gives_the_same_loss_and_update(tiny_llama_dir, withdrop, remat, scan_layers):
    """With dropout on: rematerialised layers must replay the very same dropout masks."""
    model, task, trainable, extras, frozen, batch = withdrop
    rmodel, _, rtrainable, rextras, rfrozen, _ = setup(tiny_llama_dir, dropout=True, remat=remat,
                                                       scan_layers=scan_layers)
    assert bit_equal(trainable, rtrainable)
    new, _, loss = train_step(model, task, TX, 2, seed=0)(copy(trainable), TX.init(trainable), frozen, extras,
                                                          batch, np.int32(3))
    rnew, _, rloss = train_step(rmodel, task, TX, 2, seed=0)(copy(rtrainable), TX.init(rtrainable), rfrozen,
                                                             rextras, batch, np.int32(3))
    assert abs(float(loss) - float(rloss)) < 1e-6
    assert max_diff(new, rnew) < 1e-6


# ------------------------------------------------------------------------------------------ method regularisers

def _kasa_setup(tiny_llama_dir):
    from jaxpeft.adapters import KasaConfig

    pre = jaxpeft.load_pretrained(tiny_llama_dir, attention_dropout=0.0)
    model = AdaptedModel.wrap(pre.module).add("default", KasaConfig(
        r=4, lora_alpha=8, init_lora_weights=False, beta=0.05, gamma=0.2, target_modules=("q_proj", "v_proj")))
    state = model.init(jax.random.key(0), pre.params)
    cfg = load_config({"model": {"checkpoint": str(tiny_llama_dir)},
                       "data": {"path": "unused", "max_length": 32, "buckets": [32]}})
    task = make_task(cfg, pre.tokenizer, None)
    batch = collate(encode_rows(task, ROWS), (32,), pre.tokenizer.pad_token_id)
    return model, task, state["trainable"], state["extras"], pre.params, batch


def _reference_kasa_r(trainable, beta, gamma):
    """KaSA's R (paper_rxr, sum) written out from the stacked leaves, independently of AdaptedModel.regularizer."""
    total = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(trainable)[0]:
        if jax.tree_util.keystr(path).endswith("['lora_A']"):
            parent = trainable
            for k in path[:-1]:
                parent = parent[k.key]
            for a, b, d in zip(parent["lora_A"], parent["lora_B"], parent["lora_diag"]):  # per layer
                r = a.shape[1]
                total = total + beta * jnp.sum(d ** 2) + gamma * (
                    jnp.linalg.norm(a.T @ a - jnp.eye(r)) + jnp.linalg.norm(b @ b.T - jnp.eye(r)))
    return total


def test_regularizer_is_added_once_per_step_after_normalisation(tiny_llama_dir):
    """grad_accum 2 with micro-batches of different token counts: the logged loss is the token-weighted task loss
    of the whole batch plus R (not R per micro-batch), and the SGD update is minus grad(task + R)."""
    model, task, trainable, extras, frozen, batch = _kasa_setup(tiny_llama_dir)

    def reference(p):
        out = model.apply(frozen, {"trainable": p, "extras": extras}, batch["input_ids"], batch["attention_mask"])
        s, n = task.loss(out, batch)
        return s / n, _reference_kasa_r(p, 0.05, 0.2)

    (ref_task, ref_r) = reference(trainable)
    ref_grads = jax.grad(lambda p: sum(reference(p)))(trainable)
    step = make_train_step(model, task, TX, 2, seed=0)
    new, _, terms = step(copy(trainable), TX.init(trainable), frozen, extras, batch, np.int32(0))
    assert float(ref_r) > 0.1  # a visible term: adding it once vs twice vs scaled would show
    assert abs(float(terms["task_loss"]) - float(ref_task)) < 1e-5
    assert abs(float(terms["regularizer"]) - float(ref_r)) < 1e-5 * float(ref_r)
    assert abs(float(terms["loss"]) - float(ref_task + ref_r)) < 1e-5
    assert max_diff(jax.tree.map(lambda a, b: a - b, trainable, new), ref_grads) < 1e-5


def test_sorsa_regularizer_gradient_joins_after_clipping_scaled_by_gamma_over_peak_lr(tiny_llama_dir):
    """SORSA's placement: the optimizer sees clip(grad task) + (gamma / peak lr) grad R, where R is the mean over
    all A and B of ||A^T A - I||_F / ||B B^T - I||_F; the logged loss is the task loss alone. Warm-up is on, so the
    scheduled lr at step 0 is 0: the scale must use the configured peak lr."""
    from jaxpeft.adapters import SorsaConfig

    pre = jaxpeft.load_pretrained(tiny_llama_dir, attention_dropout=0.0)
    gamma, lr = 0.02, 0.01
    model = AdaptedModel.wrap(pre.module).add("default", SorsaConfig(r=4, gamma=gamma,
                                                                     target_modules=("q_proj", "v_proj")))
    state = model.init(jax.random.key(0), pre.params)
    rng = np.random.RandomState(0)  # move A and B off orthonormality so that R and its gradient are visible
    trainable = jax.tree.map(lambda x: x + jnp.asarray(0.3 * rng.randn(*x.shape), x.dtype), state["trainable"])
    extras, frozen = state["extras"], pre.params
    cfg = load_config({"model": {"checkpoint": str(tiny_llama_dir)},
                       "data": {"path": "unused", "max_length": 32, "buckets": [32]},
                       "optim": {"lr": lr, "warmup_steps": 2, "clip_norm": 0.05, "schedule": "constant"}})
    task = make_task(cfg, pre.tokenizer, None)
    batch = collate(encode_rows(task, ROWS), (32,), pre.tokenizer.pad_token_id)
    tx = make_optimizer(cfg.optim, 10, post_clip=True)
    step = make_train_step(model, task, tx, 2, seed=0, peak_lr=lr)

    def task_loss(p):
        out = model.apply(frozen, {"trainable": p, "extras": extras}, batch["input_ids"], batch["attention_mask"])
        s, n = task.loss(out, batch)
        return s / n

    def reference_r(p):
        terms = []
        for path, leaf in jax.tree_util.tree_flatten_with_path(p)[0]:
            key = jax.tree_util.keystr(path)
            for layer in leaf if key.endswith("['lora_A']") or key.endswith("['lora_B']") else ():
                gram = layer.T @ layer if key.endswith("['lora_A']") else layer @ layer.T
                terms.append(jnp.linalg.norm(gram - jnp.eye(gram.shape[0])))
        return sum(terms) / len(terms)

    g_task = jax.grad(task_loss)(trainable)
    norm = float(optax.global_norm(g_task))
    assert norm > 0.05  # clipping is active
    g = jax.tree.map(lambda a, b: a * (0.05 / norm) + (gamma / lr) * b, g_task, jax.grad(reference_r)(trainable))
    ref_tx = optax.chain(optax.clip_by_global_norm(1e9), optax.adamw(
        optax.join_schedules([optax.linear_schedule(0.0, lr, 2), optax.constant_schedule(lr)], [2]),
        b1=cfg.optim.b1, b2=cfg.optim.b2, weight_decay=0.0))
    params, opt_state, ref_params, ref_state = copy(trainable), tx.init(trainable), trainable, ref_tx.init(trainable)
    for s in range(3):  # step 0 has lr 0 (warm-up); later steps move the weights
        params, opt_state, terms = step(params, opt_state, frozen, extras, batch, np.int32(s))
        if s == 0:
            assert abs(float(terms["loss"]) - float(task_loss(trainable))) < 1e-5
            assert abs(float(terms["post_clip_regularizer"]) - float(reference_r(trainable))) < 1e-5
            updates, ref_state = ref_tx.update(g, ref_state, ref_params)
        else:
            gt = jax.grad(task_loss)(ref_params)
            nt = float(optax.global_norm(gt))
            gs = jax.tree.map(lambda a, b: a * min(1.0, 0.05 / nt) + (gamma / lr) * b, gt,
                              jax.grad(reference_r)(ref_params))
            updates, ref_state = ref_tx.update(gs, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
    assert max_diff(params, ref_params) < 1e-5
    assert max_diff(params, trainable) > 1e-3


# ------------------------------------------------------------------------------------------ gathered head

@pytest.mark.parametrize("wrap_imsm", [False, True], ids=["lora", "imsm"])
def test_gathered_and_chunked_head_give_the_full_head_loss_and_gradient(nodrop, wrap_imsm):
    """The head only at the K scored positions, at once or in chunks: the same loss and gradient as full logits."""
    from jaxpeft.adapters import IMSMConfig
    from jaxpeft.train.loop import gathered_head_tokens

    model, task, trainable, extras, frozen, batch = nodrop
    if wrap_imsm:
        model = AdaptedModel.wrap(model.module).add("default", IMSMConfig(
            inner=model.spec("default").config, gate_dropout=0.0))
        state = model.init(jax.random.key(0), frozen)
        trainable, extras = state["trainable"], state["extras"]
    k = gathered_head_tokens(encode_rows(task, ROWS))
    assert k == 24  # "a much longer answer" + EOS: 21 scored tokens, rounded up to 8s
    steps = {kk: make_train_step(model, task, TX, 2, seed=0, head_tokens=kk) for kk in (None, k)}
    # the chunked cross-entropy: 5 positions at a time (24 = 4 full chunks + a padded one)
    steps["chunked"] = make_train_step(model, task, TX, 2, seed=0, head_tokens=k, loss_chunk=5)
    out = {kk: fn(copy(trainable), TX.init(trainable), frozen, extras, batch, np.int32(0)) for kk, fn in steps.items()}
    for kk in (k, "chunked"):
        assert abs(float(out[None][2]["loss"]) - float(out[kk][2]["loss"])) < 1e-5
        assert max_diff(out[None][0], out[kk][0]) < 1e-5
    assert max_diff(out[None][0], trainable) > 1e-3  # the step moved the weights: the comparison means something


# ------------------------------------------------------------------------------------------ numerical health

def test_the_step_reports_its_update_norm_and_a_nan_loss_leaves_the_state_unchanged(nodrop):
    model, task, trainable, extras, frozen, batch = nodrop
    fn = make_train_step(model, task, TX, 1, seed=0)  # not the cached one: the terms are read here
    old = copy(trainable)
    new, _, terms = fn(copy(trainable), TX.init(trainable), frozen, extras, batch, np.int32(0))
    moved = optax.tree.norm(jax.tree.map(lambda a, b: a - b, new, old))
    assert float(moved) > 1e-4 and abs(float(terms["update_norm"]) - float(moved)) < 1e-5 * float(moved)
    bad = dict(batch, example_weight=batch["example_weight"] * np.float32("nan"))
    same, _, terms = fn(copy(old), TX.init(trainable), frozen, extras, bad, np.int32(1))
    assert math.isnan(float(terms["loss"])) and bit_equal(same, old)
