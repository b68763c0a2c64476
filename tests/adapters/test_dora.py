"""DoRA vs PEFT 0.21.2 (`LoraConfig(use_dora=True)`) on tiny random llama / gpt2 / bert models.

jaxpeft's random non-zero adapter (init_lora_weights=False plus a perturbed magnitude) is copied into a
`peft.get_peft_model` model; logits and the adapter gradients must agree on non-pad positions of a batch with
left- and right-padded rows. Also: merged kernels reproduce the adapted forward, the default init is the base
model, the dropout path, trainable counts vs PEFT on BERT-base shapes, and config errors.
"""
import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax.core import meta

import hf_tiny
from jaxpeft.adapters.merge import merge
from jaxpeft.adapters import ALL, AdaptedModel
from jaxpeft.adapters.dora import Dora, DoraConfig, weight_norm
from jaxpeft.adapters.lora import LoraConfig
from jaxpeft.adapters.method import METHODS
from jaxpeft.models import ModelConfig, build_model
from parity import assert_close

NAME = "default"
CASES = {  # tiny model, task, jaxpeft config kwargs (PEFT gets the same values)
    "llama": ("llama", "causal_lm", dict(r=4, lora_alpha=12.0, target_modules=("q_proj", "v_proj", "down_proj"),
                                         layers_to_transform=(1,))),
    "gpt2": ("gpt2", "causal_lm", dict(r=4, lora_alpha=8.0, use_rslora=True)),  # default target c_attn (Conv1D)
    "bert": ("bert", "token_cls", dict(r=2, lora_alpha=5.0, target_modules=("query", "value", "output.dense"))),
}


# ---------------------------------------------------------------------------------------------- helpers

def _get(tree, path):
    for p in path.split("/"):
        tree = tree[p]
    return tree


def _random_adapter(case, seed=0):
    """(tiny, AdaptedModel, state) with random A, B and magnitude m = colnorm * (1 + N(0, 0.2^2))."""
    name, task, kw = CASES[case]
    tiny = hf_tiny.load(name, task)
    am = AdaptedModel.wrap(build_model(tiny.cfg, task)).add(NAME, DoraConfig(init_lora_weights=False, **kw))
    state = am.init(jax.random.key(seed), tiny.params)
    dense = state["trainable"][NAME]["modules"]
    rng = np.random.RandomState(seed)
    for t in am.spec(NAME).targets:
        node = _get(dense, t.flax_module)
        m = np.asarray(node["lora_magnitude_vector"])
        node["lora_magnitude_vector"] = jnp.asarray(m * (1 + 0.2 * rng.randn(*m.shape)), jnp.float32)
    return tiny, am, state


def _peft_model(tiny, am, state):
    """A PEFT DoRA model on a copy of the tiny HF model, holding jaxpeft's adapter weights."""
    cfg = am.spec(NAME).config
    pcfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora, use_dora=True,
                           init_lora_weights=False, target_modules=list(cfg.target_modules or ()) or None,
                           layers_to_transform=list(cfg.layers_to_transform) if cfg.layers_to_transform else None,
                           fan_in_fan_out=tiny.cfg.arch == "gpt2")
    pm = peft.get_peft_model(copy.deepcopy(tiny.hf), pcfg).eval()
    values = {}
    dense = state["trainable"][NAME]["modules"]
    for t in am.spec(NAME).targets:
        node = _get(dense, t.flax_module)
        for i in t.layers or (None,):
            pick = (lambda v: np.asarray(v)) if i is None else (lambda v, i=i: np.asarray(v)[i])
            pre = f"base_model.model.{t.hf_name(i)}."
            values[pre + "lora_A.default.weight"] = pick(node["lora_A"]).T            # (r, n_in)
            values[pre + "lora_B.default.weight"] = pick(node["lora_B"]).T            # (n_out, r)
            values[pre + "lora_magnitude_vector.default.weight"] = pick(node["lora_magnitude_vector"])
    params = dict(pm.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == set(values), f"PEFT trainables differ: {sorted(trainable ^ set(values))[:6]}"
    with torch.no_grad():
        for n, v in values.items():
            assert tuple(params[n].shape) == v.shape, (n, tuple(params[n].shape), v.shape)
            params[n].copy_(torch.from_numpy(np.ascontiguousarray(v)))
    return pm


def _inputs(tiny):
    ids, mask = hf_tiny.batch(tiny)
    tt = hf_tiny.token_types(mask) if tiny.cfg.arch == "bert" else None
    return ids, mask, tt


def _jax_logits(am, params, state, ids, mask, tt, active=ALL):
    kw = {} if tt is None else {"token_type_ids_bt": tt}
    return am.apply(params, state, ids, mask, active=active, **kw).logits


def _weights(shape, seed=3):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def _merged_params(am, params, state):
    """The base params with the adapter merged by the library (per layer, selected layers only)."""
    return merge(am, params, state, NAME)[0]


# ---------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("case", list(CASES))
def test_dora_matches_peft_logits_and_grads(case):
    tiny, am, state = _random_adapter(case)
    pm = _peft_model(tiny, am, state)
    ids, mask, tt = _inputs(tiny)
    out = _jax_logits(am, tiny.params, state, ids, mask, tt)
    base = _jax_logits(am, tiny.params, state, ids, mask, tt, active=None)
    ref = hf_tiny.hf_main(tiny, hf_tiny.hf_forward(dataclasses.replace(tiny, hf=pm), ids, mask, tt))
    assert float(jnp.abs(out - base).max()) > 0.1  # the adapter does something
    assert_close(out, ref, mask, max_abs=1e-4, what=f"dora {case} logits vs PEFT")

    # gradients of a masked weighted sum of the logits: checks the stop_gradient on the norm too
    w = _weights(ref.shape) * mask[..., None]
    trainable = state["trainable"]

    def loss(tr):
        return jnp.sum(_jax_logits(am, tiny.params, {**state, "trainable": tr}, ids, mask, tt) * w)

    grads = jax.grad(loss)(trainable)[NAME]["modules"]
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if tiny.cfg.is_decoder:
        kw["position_ids"] = torch.tensor(hf_tiny.decoder_positions(mask))
    if tt is not None:
        kw["token_type_ids"] = torch.tensor(tt)
    pm.zero_grad()
    (pm(**kw).logits * torch.from_numpy(w)).sum().backward()
    pgrads = {n: p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}
    for t in am.spec(NAME).targets:
        g = _get(grads, t.flax_module)
        for i in t.layers:
            pre = f"base_model.model.{t.hf_name(i)}."
            for ours, theirs in (("lora_A", "lora_A.default.weight"), ("lora_B", "lora_B.default.weight"),
                                 ("lora_magnitude_vector", "lora_magnitude_vector.default.weight")):
                expected = pgrads[pre + theirs]
                actual = np.asarray(g[ours][i])
                actual = actual.T if actual.ndim == 2 else actual
                scale = max(float(np.abs(expected).max()), 1.0)
                assert_close(actual / scale, expected / scale, max_abs=1e-4, what=f"grad {pre}{ours}")


@pytest.mark.parametrize("case", ["llama", "gpt2", "bert"])
def test_dora_merged_equals_unmerged(case):
    tiny, am, state = _random_adapter(case, seed=1)
    ids, mask, tt = _inputs(tiny)
    out = _jax_logits(am, tiny.params, state, ids, mask, tt)
    merged = _merged_params(am, tiny.params, state)
    kw = {} if tt is None else {"token_type_ids_bt": tt}
    plain = hf_tiny.jax_forward(tiny.cfg, tiny.task, merged, ids, mask, **kw).logits
    base = hf_tiny.jax_forward(tiny.cfg, tiny.task, tiny.params, ids, mask, **kw).logits
    assert float(jnp.abs(plain - base).max()) > 0.1
    assert_close(plain, out, mask, max_abs=1e-4, rel=1e-5, what=f"dora {case} merged vs unmerged")


@pytest.mark.parametrize("case", ["llama", "gpt2", "bert"])
def test_dora_default_init_is_base_model(case):
    name, task, kw = CASES[case]
    tiny = hf_tiny.load(name, task)
    am = AdaptedModel.wrap(build_model(tiny.cfg, task)).add(NAME, DoraConfig(**kw))
    state = am.init(jax.random.key(0), tiny.params)
    ids, mask, tt = _inputs(tiny)
    out = _jax_logits(am, tiny.params, state, ids, mask, tt)
    base = _jax_logits(am, tiny.params, state, ids, mask, tt, active=None)
    # m / n = 1 up to float32 rounding: n is recomputed inside the scanned layer, where XLA may sum in another order
    # (a 1-ulp ratio error shows as ~1e-6 on logits of size ~5); LoRA's B = 0 path is exact
    assert_close(out, base, mask, max_abs=5e-6, rel=1e-6, what=f"dora {case} at init")
    for t in am.spec(NAME).targets:  # m = column norms of W0 at init
        node = _get(state["trainable"][NAME]["modules"], t.flax_module)
        kernel = np.asarray(_get(tiny.params, t.flax_module)["kernel"], np.float64)
        assert_close(node["lora_magnitude_vector"], np.linalg.norm(kernel, axis=-2), max_abs=1e-5, what="m init")
        assert not np.any(np.asarray(node["lora_B"]))


# ---------------------------------------------------------------------------------------------- units

def test_dora_forward_formula_and_dropout_path():
    """The delta equals (m/n - 1)(x~ W0) + (m/n) s (x~ A) B for a dropped input x~ (computed in float64)."""
    rs = np.random.RandomState(0)
    n_in, n_out, r = 6, 5, 3
    kernel, bias = rs.randn(n_in, n_out), rs.randn(n_out)
    a, b, m = rs.randn(n_in, r), rs.randn(r, n_out), rs.rand(n_out) + 0.5
    x = rs.randn(2, 4, n_in)
    keep = (rs.rand(*x.shape) > 0.3) / 0.7
    s = 1.5
    j = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    cfg = DoraConfig(r=r)
    tr = {"lora_A": j(a), "lora_B": j(b), "lora_magnitude_vector": j(m)}
    base_out = j(x @ kernel + bias)

    def base_fn(z):
        return z @ j(kernel) + j(bias)

    w = kernel + s * a @ b
    mn = m / np.linalg.norm(w, axis=0)
    for drop, xd in ((lambda z: z, x), (lambda z: z * j(keep), x * keep)):
        delta = Dora().forward(cfg, {}, j(x), base_out, base_fn, j(kernel), j(bias), tr, {}, j(s), drop)
        expected = (mn - 1) * (xd @ kernel) + mn * s * (xd @ a @ b)
        assert_close(delta, expected, max_abs=1e-4, rel=1e-6, what="dora delta")
    k2, b2 = Dora().merge(cfg, {}, j(kernel), j(bias), tr, {}, j(s))
    init_tr, init_ex = Dora().init(DoraConfig(r=r, init_lora_weights=False), {}, j(kernel), j(bias), jax.random.key(0))
    assert init_ex == {} and np.any(np.asarray(init_tr["lora_B"]))
    ia, ib = np.asarray(init_tr["lora_A"], np.float64), np.asarray(init_tr["lora_B"], np.float64)
    assert_close(init_tr["lora_magnitude_vector"], np.linalg.norm(kernel + (8.0 / r) * ia @ ib, axis=0), max_abs=1e-5,
                 what="m init = column norms of W0 + s A B")
    assert_close(k2, w * mn, max_abs=1e-5, what="dora merged kernel")
    assert_close(b2, j(bias), max_abs=0.0, what="dora bias unchanged")
    assert_close(weight_norm(j(kernel), j(a), j(b), s), np.linalg.norm(w, axis=0), max_abs=1e-5, what="norm")


def test_dora_norm_gets_no_gradient():
    """Only the numerator m and the LoRA path carry gradients: d delta / d B with x = 0 except through x A B."""
    rs = np.random.RandomState(1)
    kernel = jnp.asarray(rs.randn(4, 3), jnp.float32)
    tr = {"lora_A": jnp.asarray(rs.randn(4, 2), jnp.float32), "lora_B": jnp.asarray(rs.randn(2, 3), jnp.float32),
          "lora_magnitude_vector": jnp.ones((3,), jnp.float32)}
    x = jnp.zeros((1, 4), jnp.float32)  # no input: only a norm dependence could give B a gradient

    def f(t):
        delta = Dora().forward(DoraConfig(r=2), {}, x, x @ kernel, lambda z: z @ kernel, kernel, None, t, {},
                               jnp.float32(2.0), lambda z: z)
        return jnp.sum(delta + 1.0)

    g = jax.grad(f)(tr)
    assert not np.any(np.asarray(g["lora_B"])) and not np.any(np.asarray(g["lora_A"]))


def test_dora_trainable_count_matches_peft_on_bert_base_shapes():
    from transformers import BertConfig, BertModel

    hfc = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     vocab_size=10)
    torch.manual_seed(0)
    with torch.device("meta"):
        hf = BertModel(hfc)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"],
                                                 use_dora=True))
    peft_trainable, _ = pm.get_nb_trainable_parameters()

    cfg = ModelConfig.from_hf(hfc.to_dict())
    module = build_model(cfg, "base")
    shapes = meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))["params"])
    am = AdaptedModel.wrap(module).add(NAME, DoraConfig(r=8, lora_alpha=8, target_modules=("query", "value")))
    state = jax.eval_shape(lambda p: am.init(jax.random.key(0), p), shapes)
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["trainable"][NAME]["modules"]))
    assert ours == peft_trainable == 313_344


def test_dora_config():
    cfg = DoraConfig(r=4, target_modules=["q_proj"])
    assert cfg.method == "dora" and cfg.target_modules == ("q_proj",)
    hash(cfg)  # a static jit argument
    assert isinstance(cfg, LoraConfig) and METHODS["dora"].config_cls is DoraConfig
    assert Dora().default_targets("llama") == ("q_proj", "v_proj")
    with pytest.raises(ValueError, match="r=0"):
        DoraConfig(r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        DoraConfig(lora_dropout=1.0)
    with pytest.raises(ValueError, match="init_lora_weights"):
        DoraConfig(init_lora_weights="pissa")
