"""(IA)^3 vs PEFT 0.21.2 on tiny random llama / gpt2 / bert models.

jaxpeft's random non-zero vectors (init_ia3_weights=False) are copied into a `peft.get_peft_model` model; logits
and the vectors' gradients must agree on non-pad positions of a batch with left- and right-padded rows. Also:
merged kernels reproduce the adapted forward, the default init is exactly the base model, PEFT's default
targets / feed-forward modules, trainable counts vs PEFT on BERT-base shapes, and config errors.
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
from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
                                  TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING)

import hf_tiny
from jaxpeft.adapters.merge import merge
from jaxpeft.adapters import ALL, AdaptedModel
from jaxpeft.adapters.ia3 import DEFAULT_FEEDFORWARD, DEFAULT_TARGETS, IA3, IA3Config, is_feedforward
from jaxpeft.adapters.method import METHODS
from jaxpeft.adapters.targeting import dense_modules
from jaxpeft.models import ModelConfig, build_model
from parity import assert_close

NAME = "default"
CASES = {  # tiny model, task, config kwargs (PEFT gets the same values; None targets = both use their defaults)
    "llama": ("llama", "causal_lm", {}),
    "gpt2": ("gpt2", "causal_lm", {}),
    "bert": ("bert", "token_cls", {}),  # output.dense also makes attention.output.dense feed-forward
    "llama-explicit": ("llama", "causal_lm", dict(target_modules=("q_proj", "o_proj", "gate_proj"),
                                                  feedforward_modules=("o_proj", "gate_proj"),
                                                  exclude_modules=("model.layers.1.mlp.gate_proj",))),
    "gpt2-regex": ("gpt2", "causal_lm", dict(target_modules=r"transformer\.h\.\d+\.(attn\.c_proj|mlp\.c_fc)",
                                             feedforward_modules=r".*mlp\.c_fc")),
}


# ---------------------------------------------------------------------------------------------- helpers

def _get(tree, path):
    for p in path.split("/"):
        tree = tree[p]
    return tree


def _random_adapter(case, seed=0, **over):
    name, task, kw = CASES[case]
    tiny = hf_tiny.load(name, task)
    am = AdaptedModel.wrap(build_model(tiny.cfg, task)).add(NAME, IA3Config(**{"init_ia3_weights": False, **kw,
                                                                                 **over}))
    return tiny, am, am.init(jax.random.key(seed), tiny.params)


def _peft_name(t, i, key="ia3_l"):
    return f"base_model.model.{t.hf_name(i)}.{key}.default"


def _peft_model(tiny, am, state):
    """A PEFT (IA)^3 model on a copy of the tiny HF model, holding jaxpeft's vectors."""
    cfg = am.spec(NAME).config
    listify = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    pcfg = peft.IA3Config(target_modules=listify(cfg.target_modules),
                          feedforward_modules=listify(cfg.feedforward_modules),
                          exclude_modules=listify(cfg.exclude_modules),
                          init_ia3_weights=False, fan_in_fan_out=tiny.cfg.arch == "gpt2")
    pm = peft.get_peft_model(copy.deepcopy(tiny.hf), pcfg).eval()
    values = {}
    for t in am.spec(NAME).targets:
        ell = np.asarray(_get(state["trainable"][NAME]["modules"], t.flax_module)["ia3_l"])
        for i in t.layers or (None,):
            v = ell if i is None else ell[i]
            values[_peft_name(t, i)] = v[None, :] if dict(t.layer_options[0])["feedforward"] else v[:, None]
    params = dict(pm.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == set(values), f"PEFT trainables differ: {sorted(trainable ^ set(values))[:6]}"
    with torch.no_grad():
        for n, v in values.items():  # a wrong feed-forward flag shows as a shape mismatch here
            assert tuple(params[n].shape) == v.shape, (n, tuple(params[n].shape), v.shape)
            params[n].copy_(torch.from_numpy(np.array(v)))
    return pm


def _inputs(tiny):
    ids, mask = hf_tiny.batch(tiny)
    tt = hf_tiny.token_types(mask) if tiny.cfg.arch == "bert" else None
    return ids, mask, tt


def _jax_logits(am, params, state, ids, mask, tt, active=ALL):
    kw = {} if tt is None else {"token_type_ids_bt": tt}
    return am.apply(params, state, ids, mask, active=active, **kw).logits


def _hf_kwargs(tiny, ids, mask, tt):
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if tiny.cfg.is_decoder:
        kw["position_ids"] = torch.tensor(hf_tiny.decoder_positions(mask))
    if tt is not None:
        kw["token_type_ids"] = torch.tensor(tt)
    return kw


def _merged_params(am, params, state):
    """The base params with the adapter merged by the library (per layer, selected layers only)."""
    return merge(am, params, state, NAME)[0]


# ---------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("case", list(CASES))
def test_ia3_matches_peft_logits_and_grads(case):
    tiny, am, state = _random_adapter(case)
    pm = _peft_model(tiny, am, state)
    ids, mask, tt = _inputs(tiny)
    out = _jax_logits(am, tiny.params, state, ids, mask, tt)
    base = _jax_logits(am, tiny.params, state, ids, mask, tt, active=None)
    ref = hf_tiny.hf_main(tiny, hf_tiny.hf_forward(dataclasses.replace(tiny, hf=pm), ids, mask, tt))
    assert float(jnp.abs(out - base).max()) > 0.1  # the adapter does something
    assert_close(out, ref, mask, max_abs=1e-4, what=f"ia3 {case} logits vs PEFT")

    w = np.random.RandomState(3).randn(*ref.shape).astype(np.float32) * mask[..., None]

    def loss(tr):
        return jnp.sum(_jax_logits(am, tiny.params, {**state, "trainable": tr}, ids, mask, tt) * w)

    grads = jax.grad(loss)(state["trainable"])[NAME]["modules"]
    pm.zero_grad()
    (pm(**_hf_kwargs(tiny, ids, mask, tt)).logits * torch.from_numpy(w)).sum().backward()
    pgrads = {n: p.grad.numpy().reshape(-1) for n, p in pm.named_parameters() if p.requires_grad}
    for t in am.spec(NAME).targets:
        g = np.asarray(_get(grads, t.flax_module)["ia3_l"])
        for i in t.layers or (None,):
            expected = pgrads[_peft_name(t, i)]
            scale = max(float(np.abs(expected).max()), 1.0)
            actual = g if i is None else g[i]
            assert_close(actual / scale, expected / scale, max_abs=1e-4, what=f"grad {_peft_name(t, i)}")


@pytest.mark.parametrize("case", ["llama", "gpt2", "bert", "llama-explicit"])
def test_ia3_merged_equals_unmerged(case):
    tiny, am, state = _random_adapter(case, seed=1)
    ids, mask, tt = _inputs(tiny)
    out = _jax_logits(am, tiny.params, state, ids, mask, tt)
    kw = {} if tt is None else {"token_type_ids_bt": tt}
    plain = hf_tiny.jax_forward(tiny.cfg, tiny.task, _merged_params(am, tiny.params, state), ids, mask, **kw).logits
    base = hf_tiny.jax_forward(tiny.cfg, tiny.task, tiny.params, ids, mask, **kw).logits
    assert float(jnp.abs(plain - base).max()) > 0.1
    assert_close(plain, out, mask, max_abs=1e-4, rel=1e-5, what=f"ia3 {case} merged vs unmerged")


@pytest.mark.parametrize("case", ["llama", "gpt2", "bert"])
def test_ia3_default_init_is_base_model(case):
    tiny, am, state = _random_adapter(case, init_ia3_weights=True)
    for leaf in jax.tree.leaves(state["trainable"][NAME]["modules"]):
        assert np.all(np.asarray(leaf) == 1.0)
    ids, mask, tt = _inputs(tiny)
    f = jax.jit(lambda s, active: _jax_logits(am, tiny.params, s, ids, mask, tt, active=active),
                static_argnames="active")
    # The delta is exactly zero (test_ia3_delta_is_exactly_zero_at_init), but adapting BERT's output.dense changes
    # how XLA fuses the base ops around it (LoRA with B = 0 on the same modules shows the same 8.6e-7): allow 1 ulp.
    assert_close(f(state, ALL), f(state, None), mask, max_abs=2e-6, rel=1e-6, what=f"ia3 {case} at init")


@pytest.mark.parametrize("ff", [False, True])
def test_ia3_delta_is_exactly_zero_at_init(ff):
    rs = np.random.RandomState(2)
    kernel, bias, x = (jnp.asarray(rs.randn(*s), jnp.float32) for s in ((6, 5), (5,), (2, 3, 6)))
    cfg = IA3Config()
    tr, _ = IA3().init(cfg, {"feedforward": ff}, kernel, bias, jax.random.key(0))
    assert tr["ia3_l"].shape == ((6,) if ff else (5,))
    delta = jax.jit(lambda x, k, b, t: IA3().forward(cfg, {"feedforward": ff}, x, x @ k + b, lambda z: z @ k + b, k, b,
                                                     t, {}, jnp.float32(1.0), lambda z: z))(x, kernel, bias, tr)
    assert_close(delta, np.zeros(delta.shape), max_abs=0.0, what="ia3 delta at init")


# ---------------------------------------------------------------------------------------------- defaults

ARCH_CASES = [("llama", "causal_lm"), ("qwen2", "causal_lm"), ("gemma3", "causal_lm"), ("gpt2", "causal_lm"),
              ("bert", "token_cls"), ("roberta", "seq_cls")]


def test_ia3_defaults_are_peft_defaults():
    for arch in DEFAULT_TARGETS:
        assert set(DEFAULT_TARGETS[arch]) == set(TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[arch]), arch
        assert set(DEFAULT_FEEDFORWARD[arch]) == set(TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[arch])
        assert IA3().default_targets(arch) == DEFAULT_TARGETS[arch]
        assert IA3().default_feedforward(arch) == DEFAULT_FEEDFORWARD[arch]


@pytest.mark.parametrize("name,task", ARCH_CASES, ids=[n for n, _ in ARCH_CASES])
def test_ia3_default_feedforward_flags_per_arch(name, task):
    """feedforward_modules=None flags exactly what the arch's own PEFT default flags (extra_options sees no arch)."""
    cfg = ModelConfig.from_hf(hf_tiny.CONFIGS[name]().to_dict())
    own = DEFAULT_FEEDFORWARD[cfg.arch]
    flagged = []
    for m in dense_modules(cfg, task):
        hf_name = m.hf_module.format(i=0)
        ff = IA3().extra_options(IA3Config(), hf_name)["feedforward"]
        assert ff == is_feedforward(own, hf_name), hf_name
        flagged.append(ff)
    assert any(flagged)
    for m in dense_modules(cfg, task):  # with the architecture passed (a core that gives extra_options the arch)
        hf_name = m.hf_module.format(i=0)
        assert IA3().extra_options(IA3Config(), hf_name, arch=cfg.arch)["feedforward"] == is_feedforward(own, hf_name)
    if cfg.arch in ("bert", "roberta"):  # PEFT's plain-suffix rule: attention.output.dense is feed-forward too
        assert IA3().extra_options(IA3Config(), "bert.encoder.layer.0.attention.output.dense")["feedforward"]


def test_ia3_count_matches_peft_on_bert_base_shapes():
    from transformers import BertConfig, BertModel

    hfc = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     vocab_size=10)
    with torch.device("meta"):
        hf = BertModel(hfc)
    peft_trainable, _ = peft.get_peft_model(hf, peft.IA3Config()).get_nb_trainable_parameters()

    cfg = ModelConfig.from_hf(hfc.to_dict())
    module = build_model(cfg, "base")
    shapes = meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))["params"])
    am = AdaptedModel.wrap(module).add(NAME, IA3Config())
    state = jax.eval_shape(lambda p: am.init(jax.random.key(0), p), shapes)
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["trainable"][NAME]["modules"]))
    assert ours == peft_trainable == 64_512


# ---------------------------------------------------------------------------------------------- units

def test_ia3_forward_and_merge_formulas():
    rs = np.random.RandomState(0)
    kernel, bias = rs.randn(6, 5), rs.randn(5)
    x = rs.randn(2, 3, 6)
    j = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    base_out = x @ kernel + bias

    def base_fn(z):
        return z @ j(kernel) + j(bias)

    cfg = IA3Config(target_modules=("a",))
    for ff, ell in ((False, rs.rand(5) + 0.5), (True, rs.rand(6) + 0.5)):
        expected = (x * ell) @ kernel + bias if ff else base_out * ell
        delta = IA3().forward(cfg, {"feedforward": ff}, j(x), j(base_out), base_fn, j(kernel), j(bias),
                              {"ia3_l": j(ell)}, {}, j(1.0), lambda z: z)
        assert_close(j(base_out) + delta, expected, max_abs=1e-5, what=f"ia3 forward ff={ff}")
        k2, b2 = IA3().merge(cfg, {"feedforward": ff}, j(kernel), j(bias), {"ia3_l": j(ell)}, {}, j(1.0))
        assert_close(x @ np.asarray(k2) + np.asarray(b2), expected, max_abs=1e-5, what=f"ia3 merge ff={ff}")
        assert_close(b2, bias if ff else bias * ell, max_abs=1e-6, what=f"ia3 merged bias ff={ff}")


def test_ia3_config():
    cfg = IA3Config(target_modules=["k", "v", "ff"], feedforward_modules=["ff"])
    assert cfg.method == "ia3" and cfg.feedforward_modules == ("ff",) and cfg.target_modules == ("k", "v", "ff")
    assert METHODS["ia3"].config_cls is IA3Config
    hash(cfg)  # a static jit argument
    with pytest.raises(ValueError, match="feedforward_modules"):
        IA3Config(target_modules=["key", "value"], feedforward_modules=["output.dense"])
    with pytest.raises(ValueError, match="feedforward_modules"):  # PEFT refuses the same config
        peft.IA3Config(target_modules=["key", "value"], feedforward_modules=["output.dense"])
    with pytest.raises(ValueError, match="feedforward_modules"):
        IA3Config(feedforward_modules="(unclosed")
    with pytest.raises(ValueError, match="init_ia3_weights"):
        IA3Config(init_ia3_weights="ones")
    # a regex on either side, or default targets: no subset check (as in PEFT)
    IA3Config(target_modules=r".*\.(k|v)_proj", feedforward_modules=["down_proj"])
    IA3Config(feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="feedforward_modules"):  # not a jaxpeft backbone: no default
        IA3().extra_options(IA3Config(target_modules=("fc",)), "blocks.0.fc", arch=None)
    assert IA3().extra_options(IA3Config(target_modules=("fc",), feedforward_modules=()), "blocks.0.fc",
                               arch=None) == {"feedforward": False}
    random_init = IA3().init(IA3Config(init_ia3_weights=False), {"feedforward": True}, jnp.ones((7, 3)), None,
                             jax.random.key(0))[0]["ia3_l"]
    assert random_init.shape == (7,) and float(jnp.abs(random_init - 1).min()) > 0
