"""LoRA / rsLoRA: trainable counts vs PEFT 0.21.2, init statistics vs PEFT's own init, scale, dropout, config checks.

Counts use shape-only trees (jax.eval_shape) on full-size configs (SmolLM2-135M, GPT-2, BERT-base shapes with a
small vocabulary) and PEFT models built on the meta device, so nothing large is allocated. docs/methods/lora.md
(Trainable parameters) gives 460,800 (SmolLM2 q,v) and 294,912 (BERT-base q,v; GPT-2 c_attn) for r=8.
"""
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

sys.path.insert(0, os.path.dirname(__file__))
import adapter_fixtures as af  # noqa: E402
from jaxpeft.adapters import ALL, AdaptedModel, LoraConfig  # noqa: E402
from jaxpeft.adapters.merge import merge  # noqa: E402
from jaxpeft.adapters.partition import count_parameters  # noqa: E402
from jaxpeft.models import ModelConfig, build_model  # noqa: E402
from parity import assert_close  # noqa: E402

# ---------------------------------------------------------------------------------------------- counts


def _smollm2():
    return transformers.LlamaConfig(vocab_size=64, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                    num_key_value_heads=3, intermediate_size=1536, tie_word_embeddings=True)


def _gpt2():
    return transformers.GPT2Config(vocab_size=64, n_embd=768, n_layer=12, n_head=12, bos_token_id=0, eos_token_id=0)


def _bert():
    return transformers.BertConfig(vocab_size=64, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                   intermediate_size=3072, num_labels=2)


# id -> (HF config, HF class, jaxpeft task, PEFT task_type, PEFT kwargs, jaxpeft extra kwargs, PEFT trainable count)
COUNTS = {
    "smollm2_qv": (_smollm2, transformers.LlamaForCausalLM, "causal_lm", "CAUSAL_LM",
                   dict(target_modules=["q_proj", "v_proj"]), {}, 460_800),
    "smollm2_qv_layers0to9": (_smollm2, transformers.LlamaForCausalLM, "causal_lm", "CAUSAL_LM",
                              dict(target_modules=["q_proj", "v_proj"], layers_to_transform=list(range(10))), {},
                              153_600),
    "gpt2_c_attn": (_gpt2, transformers.GPT2LMHeadModel, "causal_lm", "CAUSAL_LM",
                    dict(target_modules=["c_attn"], fan_in_fan_out=True), {}, 294_912),
    # PEFT adds the classifier to modules_to_save for SEQ_CLS and counts it as trainable (768 * 2 + 2)
    "bert_seq_cls_qv": (_bert, transformers.BertForSequenceClassification, "seq_cls", "SEQ_CLS",
                        dict(target_modules=["query", "value"]), dict(modules_to_save=("classifier",)),
                        294_912 + 768 * 2 + 2),
    "bert_base_qv": (_bert, transformers.BertModel, "base", "FEATURE_EXTRACTION",
                     dict(target_modules=["query", "value"]), {}, 294_912),
}


def _peft_counts(case):
    make, cls, _, task_type, pkw, _, _ = COUNTS[case]
    with torch.device("meta"):
        model = cls(make())
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, task_type=task_type, **pkw))
    return pm.get_nb_trainable_parameters()


def _our_counts(case, **override):
    make, _, task, _, pkw, ours, _ = COUNTS[case]
    cfg = ModelConfig.from_hf(make().to_dict())
    kw = dict(target_modules=tuple(pkw["target_modules"]), **ours)
    if "layers_to_transform" in pkw:
        kw["layers_to_transform"] = tuple(pkw["layers_to_transform"])
    kw.update(override)
    frozen = af.abstract_params(cfg, task)
    am = AdaptedModel.wrap(build_model(cfg, task)).add("default", LoraConfig(r=8, **kw))
    state = jax.eval_shape(lambda fr: am.init(jax.random.key(0), fr), frozen)
    return count_parameters(am, state, frozen)


@pytest.mark.parametrize("case", list(COUNTS))
def test_trainable_count_equals_peft(case):
    expected = COUNTS[case][-1]
    theirs = _peft_counts(case)
    assert theirs[0] == expected
    assert _our_counts(case)[0] == theirs[0]


def test_bert_seq_cls_count_needs_the_classifier():
    """PEFT's SEQ_CLS count includes the classifier: without modules_to_save ours is the bare 294,912."""
    assert _our_counts("bert_seq_cls_qv", modules_to_save=())[0] == 294_912
    assert _peft_counts("bert_seq_cls_qv")[0] == 294_912 + 1538


@pytest.mark.parametrize("case", [c for c in COUNTS if c != "bert_seq_cls_qv"])
def test_all_params_count_equals_peft(case):
    assert _our_counts(case)[1] == _peft_counts(case)[1]


def test_all_params_count_with_modules_to_save_equals_peft():
    assert _our_counts("bert_seq_cls_qv")[1] == _peft_counts("bert_seq_cls_qv")[1]


# ---------------------------------------------------------------------------------------------- init

N_IN, R = 128, 16


@pytest.fixture(scope="module")
def init_model():
    """One small llama (hidden 128) with four adapters initialised together."""
    cfg = af.small_cfg(hidden_size=N_IN, head_dim=32, intermediate_size=64)
    params = af.random_params(cfg, "causal_lm")
    qv = ("q_proj", "v_proj")
    am = (AdaptedModel.wrap(build_model(cfg))
          .add("kaiming", LoraConfig(r=R, target_modules=qv))
          .add("gauss", LoraConfig(r=R, target_modules=qv, init_lora_weights="gaussian"))
          .add("plain", LoraConfig(r=R, lora_alpha=8.0, target_modules=qv, rank_pattern={"v_proj": 4},
                                   alpha_pattern={"q_proj": 12.0}, init_lora_weights=False))
          .add("rs", LoraConfig(r=R, lora_alpha=8.0, target_modules=qv, rank_pattern={"v_proj": 4},
                                alpha_pattern={"q_proj": 12.0}, use_rslora=True, init_lora_weights=False)))
    state = am.init(jax.random.key(0), params)
    return cfg, params, am, state


def _peft_linear_factors(init, n_in=N_IN, r=R, seed=0):
    """lora_A / lora_B weights PEFT creates for one Linear(n_in, n_in)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(n_in, n_in))
    pm = peft.get_peft_model(net, peft.LoraConfig(r=r, target_modules=["0"], init_lora_weights=init))
    lin = pm.base_model.model[0]
    return lin.lora_A["default"].weight.detach().numpy(), lin.lora_B["default"].weight.detach().numpy()


def _factors(state, name, leaf):
    dense = state["trainable"][name]["modules"]["layers"]["self_attn"]
    return np.concatenate([np.asarray(dense[m][leaf]).ravel() for m in ("q_proj", "v_proj")])


def test_default_init_is_kaiming_uniform_like_peft(init_model):
    _, _, _, state = init_model
    a = _factors(state, "kaiming", "lora_A")
    bound = 1 / math.sqrt(N_IN)
    assert a.size == 2 * 2 * N_IN * R
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.97 * bound
    assert abs(a.mean()) < 0.03 * bound
    assert a.var() == pytest.approx(bound**2 / 3, rel=0.05)
    assert np.all(_factors(state, "kaiming", "lora_B") == 0)
    pa, pb = _peft_linear_factors(True)  # PEFT: kaiming_uniform(a=sqrt 5) on (r, n_in): the same bound
    assert np.abs(pa).max() <= bound and np.abs(pa).max() > 0.97 * bound and np.all(pb == 0)
    # layers and modules draw different values
    q = np.asarray(state["trainable"]["kaiming"]["modules"]["layers"]["self_attn"]["q_proj"]["lora_A"])
    v = np.asarray(state["trainable"]["kaiming"]["modules"]["layers"]["self_attn"]["v_proj"]["lora_A"])
    assert not np.allclose(q[0], q[1]) and not np.allclose(q, v)


def test_gaussian_init_std_is_one_over_r_like_peft(init_model):
    _, _, _, state = init_model
    a = _factors(state, "gauss", "lora_A")
    assert a.std() == pytest.approx(1 / R, rel=0.05)
    assert abs(a.mean()) < 0.05 / R
    assert np.all(_factors(state, "gauss", "lora_B") == 0)
    pa, pb = _peft_linear_factors("gaussian")
    assert pa.std() == pytest.approx(1 / R, rel=0.1) and np.all(pb == 0)


def test_zero_b_gives_the_base_logits(init_model):
    """B = 0: the adapted model is the base model at step 0 (hidden 128; bitwise on hidden 32 below).

    Not bitwise here: XLA CPU compiles the base path inside the adapted graph with different fusions (RoPE on
    the adapted q_proj output), which moves logits by ~1e-5 even though the adapter's delta is exactly 0."""
    cfg, params, am, state = init_model
    ids = jnp.asarray(np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 7)))
    mask = jnp.ones_like(ids)
    zero_b = {g: {n: state[g][n] for n in ("kaiming", "gauss")} for g in state}
    both = af.jitted(am, ALL)(params, zero_b, ids, mask, {})
    base = af.jitted_base(cfg, "causal_lm")(params, ids, mask, {})
    assert_close(both, base, max_abs=5e-5, rel=1e-6, what="B=0 vs base")


def test_zero_b_gives_exactly_the_base_logits_small(dropout_model):
    cfg, params, am, state, ids, f, _ = dropout_model
    y = np.asarray(f(params, state, ids, None, "zero", True))
    base = np.asarray(af.jitted_base(cfg, "causal_lm")(params, ids, jnp.ones_like(ids), {}))
    assert np.array_equal(y, base)


def _peft_scalings(use_rslora):
    hf = transformers.LlamaConfig(vocab_size=61, hidden_size=N_IN, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=32, intermediate_size=64)
    with torch.device("meta"):
        m = transformers.LlamaForCausalLM(hf)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=R, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                rank_pattern={"v_proj": 4}, alpha_pattern={"q_proj": 12},
                                                use_rslora=use_rslora))
    attn = pm.base_model.model.model.layers[0].self_attn
    return {"q_proj": attn.q_proj.scaling["default"], "v_proj": attn.v_proj.scaling["default"]}


@pytest.mark.parametrize("name,rs", [("plain", False), ("rs", True)])
def test_scale_alpha_over_r_or_sqrt_r_with_patterns(init_model, name, rs):
    _, _, _, state = init_model
    expected = {"q_proj": 12.0 / (math.sqrt(R) if rs else R), "v_proj": 8.0 / (2.0 if rs else 4.0)}
    assert _peft_scalings(rs) == pytest.approx(expected)
    extras = state["extras"][name]["modules"]["layers"]["self_attn"]
    for m, s in expected.items():
        np.testing.assert_allclose(np.asarray(extras[m]["scale"]), [s, s], rtol=1e-7)
        np.testing.assert_array_equal(np.asarray(extras[m]["layer_mask"]), [1.0, 1.0])
    assert state["trainable"][name]["modules"]["layers"]["self_attn"]["v_proj"]["lora_A"].shape == (2, N_IN, 4)


def test_rslora_delta_is_sqrt_r_times_the_plain_delta(init_model):
    """Same A, B under both configs: the merged weight change scales by sqrt(r) (q_proj) and sqrt(4) (v_proj)."""
    _, params, am, state = init_model
    st = {"trainable": dict(state["trainable"], rs=state["trainable"]["plain"]), "extras": state["extras"]}
    mp, _ = merge(am, params, st, "plain")
    mr, _ = merge(am, params, st, "rs")
    for m, ratio in (("q_proj", math.sqrt(R)), ("v_proj", 2.0)):
        w0 = np.asarray(params["layers"]["self_attn"][m]["kernel"])
        dp = np.asarray(mp["layers"]["self_attn"][m]["kernel"]) - w0
        dr = np.asarray(mr["layers"]["self_attn"][m]["kernel"]) - w0
        assert np.abs(dp).max() > 1e-3
        assert_close(dr, ratio * dp, max_abs=1e-5, rel=1e-5, what=m)


# ---------------------------------------------------------------------------------------------- dropout


@pytest.fixture(scope="module")
def dropout_model():
    cfg = af.small_cfg()  # base model dropout 0: only the adapter's dropout can act
    params = af.random_params(cfg, "causal_lm", seed=1)
    am = (AdaptedModel.wrap(build_model(cfg))
          .add("drop", LoraConfig(r=4, lora_dropout=0.5, init_lora_weights=False))
          .add("zero", LoraConfig(r=4, lora_dropout=0.5)))
    state = am.init(jax.random.key(1), params)
    ids = jnp.asarray(np.random.RandomState(1).randint(3, cfg.vocab_size, (2, 9)))

    def f(frozen, st, ids, rngs, active, deterministic):
        return am.apply(frozen, st, ids, active=active, deterministic=deterministic, rngs=rngs).logits

    return cfg, params, am, state, ids, jax.jit(f, static_argnames=("active", "deterministic")), f


def test_dropout_only_when_not_deterministic(dropout_model):
    cfg, params, am, state, ids, f, _ = dropout_model
    k1, k2 = {"dropout": jax.random.key(1)}, {"dropout": jax.random.key(2)}
    det = np.asarray(f(params, state, ids, None, "drop", True))
    det_rng = np.asarray(f(params, state, ids, k1, "drop", True))
    assert np.array_equal(det, det_rng), "deterministic=True must ignore the dropout rng"
    y1 = np.asarray(f(params, state, ids, k1, "drop", False))
    y1b = np.asarray(f(params, state, ids, k1, "drop", False))
    y2 = np.asarray(f(params, state, ids, k2, "drop", False))
    assert np.array_equal(y1, y1b), "same rng, same dropout mask"
    assert np.abs(y1 - y2).max() > 1e-3, "different rngs must give different dropout masks"
    assert np.abs(y1 - det).max() > 1e-3, "dropout must act when deterministic=False"


def test_dropout_is_on_the_adapter_input_only(dropout_model):
    """With B = 0 the adapter path is exactly zero: training-mode output == base output bitwise."""
    cfg, params, am, state, ids, f, _ = dropout_model
    y = np.asarray(f(params, state, ids, {"dropout": jax.random.key(3)}, "zero", False))
    base = np.asarray(af.jitted_base(cfg, "causal_lm")(params, ids, jnp.ones_like(ids), {}))
    assert np.array_equal(y, base)


def test_dropout_without_rng_raises(dropout_model):
    cfg, params, am, state, ids, _, f_eager = dropout_model
    with pytest.raises(Exception, match="dropout"):
        f_eager(params, state, ids, None, "drop", False)


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("kw,match", [(dict(r=0), "rank"), (dict(lora_dropout=1.0), "lora_dropout"),
                                      (dict(init_lora_weights="pissa"), "init_lora_weights")])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kw)


def test_config_normalises_lists_and_dicts_to_hashable():
    c = LoraConfig(target_modules=["q_proj"], layers_to_transform=[1], rank_pattern={"q_proj": 2},
                   modules_to_save=["classifier"])
    hash(c)
    assert c.target_modules == ("q_proj",) and c.layers_to_transform == (1,)
    assert c.rank_pattern == (("q_proj", 2),) and c.modules_to_save == ("classifier",)
    assert LoraConfig(layers_to_transform=3).layers_to_transform == (3,)
