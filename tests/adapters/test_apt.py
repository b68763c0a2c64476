"""APT (adaptive prefix tuning): P-tuning v2 prefixes gated per token (alpha) and per layer (lambda).

Layer i: alpha_i = sigmoid(pool(h_{i-1}) W_i + c_i) (B, l); K_i = [lambda_i alpha_i P_K ; K_x], V likewise
(gate_on 'v': values only). References: prefix tuning / P-tuning v2 with the same prefix values (the gates
switched off, or folded into the prefix), and numpy recomputations of the pool and the gate from the tensor each
layer's prefix hook receives (recorded with an extra interceptor). Models are hf_tiny's random tiny models
(2 layers, hidden 32) or abstract (shape-only) trees for the parameter counts.
"""
import functools
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import adapter_fixtures as af  # noqa: E402
import hf_tiny  # noqa: E402
from jaxpeft.adapters import AdaptedModel, APTConfig, PrefixTuningConfig, PTuningV2Config  # noqa: E402
from jaxpeft.adapters.apt import pool_hidden  # noqa: E402
from jaxpeft.adapters.method import method_for  # noqa: E402
from jaxpeft.adapters.partition import count_parameters  # noqa: E402
from jaxpeft.generation import generate  # noqa: E402
from jaxpeft.models import build_model  # noqa: E402
from jaxpeft.models.attention import PrefixHook  # noqa: E402
from jaxpeft.train.probes import gate_statistics, prefix_lengths_from_gates, write_gate_report  # noqa: E402

NAME = af.NAME
L_SLOTS = 3
# gates far from 0.5 and a layer scale far from 1, so every gate shows in the outputs
LIVE = dict(gate_init="normal", gate_init_std=0.5, lambda_init=1.3, gate_bias=True, prefix_dropout=0.0)
LIVE_CFG = APTConfig(num_virtual_tokens=L_SLOTS, **LIVE)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- helpers


def model(tiny, config):
    """The tiny's backbone with one adapter `config` (equal configs give equal, hashable models: jit caches hit)."""
    return AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)).add(NAME, config)


@functools.lru_cache(maxsize=None)
def _init(name, task, config):
    tiny = hf_tiny.load(name, task)
    # init's code run op by op: its jit compile (random draws under scan) costs far more than running it once
    with jax.disable_jit():
        return model(tiny, config).init(jax.random.key(0), tiny.params)


def adapted(tiny, config):
    """(AdaptedModel, state) with one adapter `config` on the tiny's backbone. The state is initialised once per
    architecture (without modules_to_save a prefix adapter's state does not depend on the task head, so bert
    'base' and 'seq_cls' share it); treat it as read-only: `with_leaves` / `randomize` return changed copies."""
    task = "base" if tiny.name == "bert" and not config.modules_to_save else tiny.task
    return model(tiny, config), _init(tiny.name, task, config)


def hook_node(am, state, group="trainable"):
    """The adapter's variables at the prefix hook path (a live dict inside `state`)."""
    return af.get(state[group][NAME]["modules"], am.spec(NAME).hooks[0].flax_module)


def with_leaves(am, state, **leaves):
    """A copy of `state` with the adapter's hook variables replaced by `leaves` (arrays)."""
    new = jax.tree.map(lambda x: x, state)
    hook_node(am, new).update({k: jnp.asarray(v, jnp.float32) for k, v in leaves.items()})
    return new


def randomize(am, state, seed, std=0.5, skip=("prefix_k", "prefix_v")):
    """A copy of `state` with every hook variable but `skip` redrawn: gates and biases N(0, std), lambdas
    1 + N(0, std) (non-zero, distinct per layer)."""
    rng = np.random.RandomState(seed)
    node = hook_node(am, state)
    return with_leaves(am, state, **{k: std * rng.randn(*v.shape) + (1.0 if k == "lambda" else 0.0)
                                     for k, v in node.items() if k not in skip})


def inputs(tiny, b=hf_tiny.B, t=hf_tiny.T):
    """(ids, mask, kwargs) on hf_tiny's left/right padded batch; BERT gets random token types. Default positions
    are kept, so each prefix adapter's position offset applies."""
    ids, mask = hf_tiny.batch(tiny, b, t)
    kw = {"token_type_ids_bt": hf_tiny.token_types(mask)} if tiny.cfg.arch == "bert" else {}
    return ids, mask, kw


def forward(am, frozen, state, ids, mask, kw=None):
    """The main output (logits, or hidden states for task 'base') under jax.jit (cached per adapter set)."""
    return np.asarray(af.jitted(am)(frozen, state, jnp.asarray(ids), jnp.asarray(mask), kw or {}))


class RecordHookInputs:
    """An interceptor that sows what every PrefixHook receives (x_btd, pool_mask_bt) into 'probes'."""

    def __call__(self, next_fun, args, kwargs, context):
        if isinstance(context.module, PrefixHook) and context.method_name == "__call__":
            context.module.sow("probes", "hook_x", args[0])
            context.module.sow("probes", "hook_pool_mask", args[2])
        return next_fun(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _probe_fn(am):
    def f(frozen, state, ids, mask, kw):
        with nn.intercept_methods(RecordHookInputs()):
            return am.apply(frozen, state, ids, mask, capture=True, **kw)

    return jax.jit(f)


def probe(am, frozen, state, ids, mask, **kw):
    """(output, {probe name: value stacked on the layer axis}) from a forward with capture=True, plus the hook
    inputs recorded by RecordHookInputs (jitted once per adapter set)."""
    out, captured = _probe_fn(am)(frozen, state, jnp.asarray(ids), jnp.asarray(mask), kw)
    node = af.get(captured["probes"], am.spec(NAME).hooks[0].flax_module)
    return out, {k: np.asarray(v[0]) for k, v in node.items()}


def np_pool(x_btd, mask_bt, how):
    """Reference pool in float64: mean / first / last of the rows' masked tokens."""
    x = np.asarray(x_btd, np.float64)
    out = []
    for row, m in zip(x, np.asarray(mask_bt).astype(bool)):
        idx = np.flatnonzero(m)
        out.append(row[idx].mean(0) if how == "mean_nonpad" else row[idx[0]] if how == "first" else row[idx[-1]])
    return np.stack(out)


def np_gates(hook_x, pool_mask, node, how):
    """(L, B, l) reference token gates sigmoid(pool(h_{i-1}) W_i + c_i) from the recorded hook inputs."""
    gates = []
    for i in range(hook_x.shape[0]):
        logits = np_pool(hook_x[i], pool_mask[i], how) @ np.asarray(node["gate_w"][i], np.float64)
        if "gate_b" in node:
            logits = logits + np.asarray(node["gate_b"][i], np.float64)
        gates.append(1.0 / (1.0 + np.exp(-logits)))
    return np.stack(gates)


# ---------------------------------------------------------------------------------------------- reductions


PREFIX = PrefixTuningConfig(num_virtual_tokens=L_SLOTS)


@pytest.mark.parametrize("name,task", [("llama", "causal_lm"), ("bert", "base"), ("bert", "seq_cls")])
def test_gates_off_is_exactly_prefix_tuning_and_ptuning_v2(name, task):
    tiny = hf_tiny.load(name, task)
    ids, mask, kw = inputs(tiny)
    am_p, st_p = adapted(tiny, PREFIX)
    prefix = {k: 2.0 * np.random.RandomState(1).randn(*v.shape) for k, v in hook_node(am_p, st_p).items()}
    assert set(prefix) == {"prefix_k", "prefix_v"}
    am_v, st_v = adapted(tiny, PTuningV2Config(num_virtual_tokens=L_SLOTS, prefix_dropout=0.0))
    gates_off = APTConfig(num_virtual_tokens=L_SLOTS, prefix_dropout=0.0, token_gate=False, layer_gate=False)
    am_a = model(tiny, gates_off)
    # APT with both gates off creates exactly P-tuning v2's variables (shapes only: nothing is computed) ...
    layout = jax.eval_shape(lambda p: am_a.init(jax.random.key(0), p), tiny.params)
    assert jax.tree.map(lambda x: x.shape, layout) == jax.tree.map(lambda x: x.shape, st_v)
    assert set(hook_node(am_a, layout)) == {"prefix_k", "prefix_v"}, "both gates off: no gate variables"
    # ... so it runs on that state, with the prefix values copied into it
    st_p, st_v = with_leaves(am_p, st_p, **prefix), with_leaves(am_v, st_v, **prefix)
    y_p = forward(am_p, tiny.params, st_p, ids, mask, kw)
    y_v = forward(am_v, tiny.params, st_v, ids, mask, kw)
    y_a = forward(am_a, tiny.params, st_v, ids, mask, kw)
    np.testing.assert_array_equal(y_a, y_p)
    np.testing.assert_array_equal(y_v, y_p)
    other = forward(am_p, tiny.params, with_leaves(am_p, st_p, prefix_v=-prefix["prefix_v"]), ids, mask, kw)
    valid = mask.astype(bool) if y_p.ndim == 3 else slice(None)
    assert np.abs(y_p - other)[valid].max() > 1e-2, "the prefix values must show in the outputs"


ZERO_GATES = APTConfig(num_virtual_tokens=L_SLOTS, prefix_dropout=0.0, gate_init="zeros")


def test_zero_gate_init_halves_the_prefix():
    """gate_init 'zeros': W = 0, so alpha = sigmoid(0) = 0.5 exactly; lambda_init 1: K, V prefixes scaled by 0.5."""
    tiny = hf_tiny.load("llama", "causal_lm")
    ids, mask, kw = inputs(tiny)
    am_a, st_a = adapted(tiny, ZERO_GATES)
    node = hook_node(am_a, st_a)
    assert np.all(np.asarray(node["gate_w"]) == 0.0) and np.all(np.asarray(node["lambda"]) == 1.0)
    am_p, st_p = adapted(tiny, PREFIX)
    st_half = with_leaves(am_p, st_p, prefix_k=0.5 * node["prefix_k"], prefix_v=0.5 * node["prefix_v"])
    st_full = with_leaves(am_p, st_p, prefix_k=node["prefix_k"], prefix_v=node["prefix_v"])
    y_a = forward(am_a, tiny.params, st_a, ids, mask, kw)
    y_half = forward(am_p, tiny.params, st_half, ids, mask, kw)
    y_full = forward(am_p, tiny.params, st_full, ids, mask, kw)
    np.testing.assert_allclose(y_a, y_half, rtol=0, atol=1e-6)
    assert np.abs(y_a - y_full).max() > 1e-3, "the 0.5 gate must matter"
    # the gates themselves, on any layer input
    x = jnp.asarray(np.random.RandomState(3).randn(len(ids), ids.shape[1], tiny.cfg.hidden_size), jnp.float32)
    alpha, lam = method_for(ZERO_GATES).gates(ZERO_GATES, x, jnp.asarray(mask), {k: v[0] for k, v in node.items()})
    np.testing.assert_array_equal(np.asarray(alpha), np.full((len(ids), L_SLOTS), 0.5, np.float32))
    assert float(lam) == 1.0


# ---------------------------------------------------------------------------------------------- counts

BERT_BASE = dict(num_layers=12, hidden_size=768, num_heads=12, num_kv_heads=12, head_dim=64, intermediate_size=3072,
                 vocab_size=30522, max_position_embeddings=512)
SMOLLM2 = dict(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
               vocab_size=49152, max_position_embeddings=2048)


def abstract_count(cfg, task, config):
    """(trainable, all, base size, abstract state) with nothing allocated (eval_shape)."""
    frozen = af.abstract_params(cfg, task)
    am = AdaptedModel.wrap(build_model(cfg, task)).add(NAME, config)
    state = jax.eval_shape(lambda p: am.init(jax.random.key(0), p), frozen)
    trainable, total = count_parameters(am, state, frozen)
    base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))
    return trainable, total, base, am, state


def apt_formula(n_layers, d, d_kv, slots, bias=False):
    """l * 2L * d_kv + L * d * l (+ L * l) + L, with `slots` = sum of the per-layer lengths (L * l when uniform)."""
    return slots * 2 * d_kv + slots * d + (slots if bias else 0) + n_layers


def test_parameter_counts_bert_base_and_smollm2_shapes():
    t, total, base, am, state = abstract_count(af.small_cfg("bert", **BERT_BASE), "base",
                                               APTConfig(num_virtual_tokens=20))
    assert t == apt_formula(12, 768, 768, 12 * 20) == 552_972
    assert total == base + t
    node = hook_node(am, state)
    assert node["gate_w"].shape == (12, 768, 20) and node["lambda"].shape == (12,)
    assert node["prefix_k"].shape == (12, 20, 12, 64)
    t, total, base, am, state = abstract_count(af.small_cfg("llama", **SMOLLM2), "causal_lm",
                                               APTConfig(num_virtual_tokens=10))
    assert t == apt_formula(30, 576, 192, 30 * 10) == 288_030
    assert total == base + t
    assert hook_node(am, state)["prefix_v"].shape == (30, 10, 3, 64)


def test_gate_bias_adds_one_per_layer_and_slot():
    t, *_ = abstract_count(af.small_cfg("bert", **BERT_BASE), "base", APTConfig(num_virtual_tokens=20, gate_bias=True))
    assert t == 552_972 + 12 * 20
    t, _, _, am, state = abstract_count(af.small_cfg("llama", **SMOLLM2), "causal_lm",
                                        APTConfig(num_virtual_tokens=10, gate_bias=True))
    assert t == 288_030 + 30 * 10
    assert hook_node(am, state)["gate_b"].shape == (30, 10)


def test_per_layer_lengths_count_only_real_slots_and_gate_columns():
    lengths = (20, 0, 5, 12, 20, 1, 0, 8, 3, 20, 7, 2)
    t, _, _, am, state = abstract_count(af.small_cfg("bert", **BERT_BASE), "base",
                                        APTConfig(prefix_lengths=lengths, gate_bias=True))
    s = sum(lengths)
    assert t == apt_formula(12, 768, 768, s, bias=True) == s * (2 * 768 + 768 + 1) + 12
    # the stored tensors are padded to the longest layer: counting them would give more
    padded = sum(int(np.prod(v.shape)) for v in hook_node(am, state).values())
    assert padded == apt_formula(12, 768, 768, 12 * 20, bias=True) > t
    assert hook_node(am, state, "extras")["slot_mask"].shape == (12, 20)
    # token_gate / layer_gate off: no gate columns, no lambda
    t2, *_ = abstract_count(af.small_cfg("bert", **BERT_BASE), "base",
                            APTConfig(prefix_lengths=lengths, token_gate=False, layer_gate=False))
    assert t2 == s * 2 * 768


# ---------------------------------------------------------------------------------------------- decoders


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_prompt_pool_keeps_decoding_causal(name):
    """With prompt_mask_bt on the first P tokens, changing the token at t+1 >= P leaves logits <= t unchanged;
    pooling over every token (no prompt mask) lets that later token change earlier logits."""
    tiny = hf_tiny.load(name, "causal_lm")
    am, st = adapted(tiny, LIVE_CFG)
    st = randomize(am, st, seed=6)
    b, t_len, p_len = 2, 10, 4
    ids = np.random.RandomState(7).randint(3, hf_tiny.VOCAB, (b, t_len))
    variants = [ids]
    for pos in range(p_len, t_len):
        v = ids.copy()
        v[:, pos] = (v[:, pos] - 3 + 11) % (hf_tiny.VOCAB - 3) + 3
        variants.append(v)
    all_ids = np.concatenate(variants)  # (1 + T - P) * b rows in one forward
    mask = np.ones_like(all_ids)
    prompt = np.broadcast_to(np.arange(t_len) < p_len, all_ids.shape).astype(np.int32)
    with_prompt = forward(am, tiny.params, st, all_ids, mask, {"prompt_mask_bt": prompt}).reshape(-1, b, t_len,
                                                                                                  hf_tiny.VOCAB)
    everything = forward(am, tiny.params, st, all_ids, mask).reshape(-1, b, t_len, hf_tiny.VOCAB)
    for k, pos in enumerate(range(p_len, t_len), start=1):
        np.testing.assert_allclose(with_prompt[k, :, :pos], with_prompt[0, :, :pos], rtol=0, atol=1e-6,
                                   err_msg=f"token {pos} changed earlier logits")
        assert np.abs(with_prompt[k, :, pos:] - with_prompt[0, :, pos:]).max() > 1e-3
        leak = np.abs(everything[k, :, :pos] - everything[0, :, :pos]).max()
        assert leak > 1e-4, f"without a prompt mask token {pos} should reach earlier logits through the gates ({leak})"


def greedy_uncached(am, frozen, state, prompt, steps, prompt_only=True):
    """(tokens, last-position logits per step) of a greedy loop of full forwards on one unpadded prompt, with
    prompt_mask_bt on the original prompt (prompt_only=False: on every token, i.e. pooling over everything)."""
    seq, logits = list(prompt), []
    for _ in range(steps):
        ids = np.asarray([seq])
        pool = np.arange(len(seq)) < (len(prompt) if prompt_only else len(seq))
        row = forward(am, frozen, state, ids, np.ones_like(ids), {"prompt_mask_bt": pool[None].astype(np.int32)})[0, -1]
        logits.append(row)
        seq.append(int(np.argmax(row)))
    return seq[len(prompt):], np.stack(logits)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_cached_generation_equals_uncached_greedy_loop(name):
    tiny = hf_tiny.load(name, "causal_lm")
    am, st = adapted(tiny, LIVE_CFG)
    st = randomize(am, st, seed=8)
    frozen, steps = tiny.params, 4
    rs = np.random.RandomState(9)
    prompts = [rs.randint(3, hf_tiny.VOCAB, 6).tolist(), rs.randint(3, hf_tiny.VOCAB, 7).tolist()]
    refs = [greedy_uncached(am, frozen, st, p, steps) for p in prompts]

    got = generate(am.module, (frozen, st), prompts, max_new_tokens=steps,
                   model_fn=lambda p, ids, mask, cache: am.apply(p[0], p[1], ids, mask, cache=cache),
                   cache_key=(am, "t"), init_cache=lambda b, n: am.init_cache(st, b, n),
                   position_shift=am.max_position_shift())
    assert got == [toks for toks, _ in refs]

    # the cached logits themselves, step by step, on a left-padded batch (row 0 padded by 1)
    p_len = max(map(len, prompts))
    ids = np.zeros((2, p_len), np.int32)
    mask = np.zeros((2, p_len), np.int32)
    for r, p in enumerate(prompts):
        ids[r, p_len - len(p):], mask[r, p_len - len(p):] = p, 1
    step = jax.jit(lambda f, s, ids, mask, cache: am.apply(f, s, ids, mask, cache=cache))
    out = step(frozen, st, jnp.asarray(ids), jnp.asarray(mask), am.init_cache(st, 2, p_len + steps))
    for k in range(steps):
        for r in range(2):
            np.testing.assert_allclose(np.asarray(out.logits[r, -1]), refs[r][1][k], rtol=1e-5, atol=1e-5,
                                       err_msg=f"row {r} step {k}")
        nxt = np.asarray([[refs[0][0][k]], [refs[1][0][k]]], np.int32)
        out = step(frozen, st, jnp.asarray(nxt), jnp.ones((2, 1), jnp.int32), out.cache)

    # the reference is sensitive to what the gates pool: pooling over the generated tokens changes the logits
    _, leaky = greedy_uncached(am, frozen, st, prompts[1], 2, prompt_only=False)
    assert np.abs(leaky[1] - refs[1][1][1]).max() > 1e-4


# ---------------------------------------------------------------------------------------------- gates


def test_pool_hidden_matches_numpy_on_a_padded_batch():
    rs = np.random.RandomState(10)
    x = rs.randn(4, 7, 5).astype(np.float32)
    mask = np.ones((4, 7), bool)
    mask[1, :3] = False          # left padded
    mask[2, 4:] = False          # right padded
    mask[3, [0, 2, 5, 6]] = False  # holes (a prompt mask inside a padded row)
    for how in ("mean_nonpad", "first", "last"):
        got = np.asarray(pool_hidden(jnp.asarray(x), jnp.asarray(mask), how))
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, np_pool(x, mask, how), rtol=0, atol=1e-6, err_msg=how)
    np.testing.assert_array_equal(np.asarray(pool_hidden(jnp.asarray(x), jnp.asarray(mask), "first"))[3], x[3, 1])
    np.testing.assert_array_equal(np.asarray(pool_hidden(jnp.asarray(x), jnp.asarray(mask), "last"))[3], x[3, 4])
    bf16 = pool_hidden(jnp.asarray(x, jnp.bfloat16), jnp.asarray(mask), "mean_nonpad")
    assert bf16.dtype == jnp.float32


@functools.lru_cache(maxsize=None)
def bert_embeddings():
    """The tiny BERT's embedding output on `inputs`, positions shifted by l (what layer 0's hook receives)."""
    tiny = hf_tiny.load("bert", "seq_cls")
    ids, mask, kw = inputs(tiny)
    module = build_model(tiny.cfg, tiny.task)
    return np.asarray(jax.jit(lambda p, i, tt: module.apply({"params": p}, i, method=lambda m, i: m.embeddings(
        i, m.default_positions(i, jnp.full((len(ids),), L_SLOTS)), tt, True)))(
        tiny.params, jnp.asarray(ids), jnp.asarray(kw["token_type_ids_bt"])))


@pytest.mark.parametrize("how", ["mean_nonpad", "first", "last"])
def test_forward_gates_match_numpy_on_bert(how):
    """Encoders pool over every non-pad token; the recorded gates equal sigmoid(pool(h_{i-1}) W_i + c_i)."""
    tiny = hf_tiny.load("bert", "seq_cls")
    ids, mask, kw = inputs(tiny)
    _, st = adapted(tiny, LIVE_CFG)  # the state does not depend on the pool mode
    am = model(tiny, APTConfig(num_virtual_tokens=L_SLOTS, pool=how, **LIVE))
    st = randomize(am, st, seed=11)
    _, probes = probe(am, tiny.params, st, ids, mask, **kw)
    hook_x, pool_mask = probes["hook_x"], probes["hook_pool_mask"]
    assert hook_x.shape == (2, len(ids), ids.shape[1], tiny.cfg.hidden_size)
    np.testing.assert_array_equal(pool_mask, np.broadcast_to(mask.astype(bool), pool_mask.shape))
    # layer 0's h_{-1} is the embedding output (BERT positions shifted by l, as PEFT's past length)
    np.testing.assert_allclose(hook_x[0], bert_embeddings(), rtol=0, atol=1e-5)
    node = {k: np.asarray(v) for k, v in hook_node(am, st).items()}
    gates = probes[f"{NAME}:token_gate"]
    np.testing.assert_allclose(gates, np_gates(hook_x, pool_mask, node, how), rtol=0, atol=2e-6)
    np.testing.assert_allclose(probes[f"{NAME}:lambda"], node["lambda"], rtol=0, atol=0)
    assert gates.std() > 0.05, "gates spread away from 0.5"
    other = np_gates(hook_x, pool_mask, node, "first" if how != "first" else "last")
    assert np.abs(gates - other).max() > 1e-2, "the pool mode must matter"


def test_decoder_gates_pool_over_the_prompt_only():
    """llama, pool 'last' with a prompt mask on a padded batch: the gate reads the last prompt token."""
    tiny = hf_tiny.load("llama", "causal_lm")
    ids, mask, _ = inputs(tiny)
    prompt = (np.arange(ids.shape[1]) < 7)[None].repeat(len(ids), 0).astype(np.int32)
    _, st = adapted(tiny, LIVE_CFG)
    am = model(tiny, APTConfig(num_virtual_tokens=L_SLOTS, pool="last", **LIVE))
    st = randomize(am, st, seed=12)
    _, probes = probe(am, tiny.params, st, ids, mask, prompt_mask_bt=prompt)
    pool_mask = probes["hook_pool_mask"]
    np.testing.assert_array_equal(pool_mask[0], mask.astype(bool) & prompt.astype(bool))
    node = {k: np.asarray(v) for k, v in hook_node(am, st).items()}
    np.testing.assert_allclose(probes[f"{NAME}:token_gate"], np_gates(probes["hook_x"], pool_mask, node, "last"),
                               rtol=0, atol=2e-6)


def test_gate_on_v_leaves_keys_ungated():
    """lambda = 0 with gate_on 'v': keys stay P_K, values become 0 (a prefix with zero values); with gate_on 'kv'
    the keys are zeroed too, which attends differently."""
    tiny = hf_tiny.load("llama", "causal_lm")
    ids, mask, kw = inputs(tiny)
    outs = {}
    for gate_on in ("v", "kv"):
        _, st = adapted(tiny, LIVE_CFG)  # the state does not depend on gate_on
        am = model(tiny, APTConfig(num_virtual_tokens=L_SLOTS, gate_on=gate_on, **LIVE))
        st = randomize(am, st, seed=13)
        st = with_leaves(am, st, **{"lambda": np.zeros((2,))})
        outs[gate_on] = forward(am, tiny.params, st, ids, mask, kw)
        pk = np.asarray(hook_node(am, st)["prefix_k"])
    am_p, st_p = adapted(tiny, PREFIX)
    zero_v = forward(am_p, tiny.params, with_leaves(am_p, st_p, prefix_k=pk, prefix_v=np.zeros_like(pk)), ids, mask, kw)
    zero_kv = forward(am_p, tiny.params, with_leaves(am_p, st_p, prefix_k=np.zeros_like(pk),
                                                     prefix_v=np.zeros_like(pk)), ids, mask, kw)
    valid = mask.astype(bool)
    np.testing.assert_allclose(outs["v"][valid], zero_v[valid], rtol=0, atol=1e-6)
    np.testing.assert_allclose(outs["kv"][valid], zero_kv[valid], rtol=0, atol=1e-6)
    assert np.abs(zero_v - zero_kv)[valid].max() > 1e-3, "ungated keys must change the attention"


def test_gradients_reach_gates_lambda_and_prefixes():
    tiny = hf_tiny.load("llama", "causal_lm")
    ids, mask, _ = inputs(tiny)
    am, st = adapted(tiny, LIVE_CFG)
    labels = jnp.asarray(np.roll(ids, -1, axis=1))

    def loss(trainable):
        logits = am.apply(tiny.params, {"trainable": trainable, "extras": st["extras"]}, ids, mask).logits
        ll = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1)[..., 0]
        return -jnp.sum(ll * mask) / jnp.sum(mask)

    grads = jax.jit(jax.grad(loss))(st["trainable"])
    node = hook_node(am, {"trainable": grads})
    assert set(node) == {"prefix_k", "prefix_v", "gate_w", "gate_b", "lambda"}
    for key, g in node.items():
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), key
        per_layer = np.abs(g.reshape(g.shape[0], -1)).max(axis=1)
        assert np.all(per_layer > 1e-7), f"{key}: zero gradient in some layer {per_layer}"


# ---------------------------------------------------------------------------------------------- probes


def test_gate_statistics_report_and_prefix_lengths(tmp_path):
    tiny = hf_tiny.load("bert", "seq_cls")
    am, st = adapted(tiny, LIVE_CFG)
    st = randomize(am, st, seed=16)
    batches = []
    for seed, weight in ((0, [1, 1, 1, 1]), (1, [1, 0, 1, 0])):
        ids, mask = hf_tiny.batch(tiny, seed=seed)
        batches.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": hf_tiny.token_types(mask, seed),
                        "example_weight": np.asarray(weight, np.float32)})
    stats = gate_statistics(am, tiny.params, st, batches,
                            model_inputs=lambda b: {"token_type_ids_bt": b["token_type_ids"]}, name=NAME)

    node = {k: np.asarray(v) for k, v in hook_node(am, st).items()}
    total, rows = 0.0, 0
    for b in batches:
        _, probes = probe(am, tiny.params, st, b["input_ids"], b["attention_mask"],
                          token_type_ids_bt=b["token_type_ids"])
        gates = np_gates(probes["hook_x"], probes["hook_pool_mask"], node, "mean_nonpad")  # (L, B, l)
        keep = b["example_weight"] > 0
        total, rows = total + gates[:, keep].sum(1), rows + int(keep.sum())
    mean = total / rows
    assert stats["rows"] == rows == 6
    np.testing.assert_allclose(np.asarray(stats["mean_token_gate"]), mean, rtol=0, atol=2e-6)
    np.testing.assert_allclose(stats["lambda"], node["lambda"], rtol=0, atol=0)
    np.testing.assert_allclose(stats["effective"], node["lambda"] * mean.mean(1), rtol=1e-6, atol=1e-7)
    assert stats["layers_used"] == [0, 1] and stats["prefix_lengths"] == [L_SLOTS, L_SLOTS]

    paths = write_gate_report(stats, tmp_path / "report")
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(stats))
    png = paths["png"].read_bytes()
    assert paths["json"].name == "gates.json" and paths["png"].name == "gates.png"
    assert png[:8] == PNG_SIGNATURE and len(png) > 5000

    lengths = prefix_lengths_from_gates(stats)
    eff = np.abs(np.asarray(stats["effective"]))
    top = int(np.argmax(eff))
    assert lengths[top] == L_SLOTS
    assert lengths == tuple(max(1, round(L_SLOTS * e / eff.max())) for e in eff)


def test_gate_statistics_give_layers_without_a_prefix_no_effective_gate():
    """With layers_to_transform=(1,) layer 0 has no prefix: its gate is computed but gates nothing, so its effective
    gate is 0 and the PT-2* lengths must not hand it the longest prefix."""
    tiny = hf_tiny.load("bert", "seq_cls")
    am, st = adapted(tiny, APTConfig(num_virtual_tokens=L_SLOTS, layers_to_transform=(1,), **LIVE))
    st = randomize(am, st, seed=17)
    np.testing.assert_array_equal(np.asarray(hook_node(am, st, "extras")["layer_mask"]), [0.0, 1.0])
    ids, mask = hf_tiny.batch(tiny)
    stats = gate_statistics(am, tiny.params, st, [{"input_ids": ids, "attention_mask": mask}], name=NAME)
    assert stats["layers_used"] == [1]
    assert stats["effective"][1] > 0.05
    assert stats["effective"][0] == 0.0, f"layer 0 has no prefix but effective gate {stats['effective'][0]}"
    assert prefix_lengths_from_gates(stats)[1] == L_SLOTS


def test_prefix_lengths_from_gates_proportional_rounded_and_floored():
    stats = {"effective": [0.3, -0.9, 0.45, 0.02], "mean_token_gate": [[0.5] * 16] * 4, "prefix_lengths": [16] * 4}
    assert prefix_lengths_from_gates(stats, max_length=12) == (4, 12, 6, 1)
    assert prefix_lengths_from_gates(stats, max_length=12, min_length=3) == (4, 12, 6, 3)
    # default max: the APT run's longest prefix
    assert prefix_lengths_from_gates(stats) == (5, 16, 8, 1)
    # the result is a valid P-tuning v2 config
    assert PTuningV2Config(prefix_lengths=prefix_lengths_from_gates(stats)).prefix_lengths == (5, 16, 8, 1)
