"""hf_to_params / params_to_hf on real save_pretrained files: strict errors that name the key, bare-backbone
keys, the tied lm_head alias, freshly initialised task heads."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_tiny
from jaxpeft.loading.convert import flatten_params, hf_to_params
from jaxpeft.loading.errors import CheckpointError
from jaxpeft.models import ModelConfig


def _load(cfg, task, state, **kw):
    return hf_to_params(cfg, task, state.keys(), state.__getitem__, **kw)


def _assert_same_tree(a, b, prefix=""):
    fa, fb = flatten_params(a), flatten_params(b)
    assert set(fa) == set(fb)
    for k in fb:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=prefix + k)


@pytest.fixture(scope="module")
def llama():
    return hf_tiny.load("llama", "causal_lm")


# ---------------------------------------------------------------------------------------------- strict errors


def test_missing_key_is_named(llama):
    key = "model.layers.1.mlp.up_proj.weight"
    state = {k: v for k, v in llama.state.items() if k != key}
    with pytest.raises(CheckpointError, match=r"missing keys \(1\)[\s\S]*" + re.escape(key)):
        _load(llama.cfg, "causal_lm", state)


def test_unexpected_key_is_named(llama):
    key = "model.layers.0.self_attn.extra_proj.weight"
    state = dict(llama.state, **{key: np.zeros((4, 4), np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\)[\s\S]*" + re.escape(key)):
        _load(llama.cfg, "causal_lm", state)


def test_wrong_shape_is_named(llama):
    key = "model.layers.0.self_attn.k_proj.weight"
    state = dict(llama.state, **{key: llama.state[key][:8]})
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\)[\s\S]*" + re.escape(key) + r".*\(32, 8\).*\(32, 16\)"):
        _load(llama.cfg, "causal_lm", state)


def test_every_problem_is_reported_at_once(llama):
    state = dict(llama.state)
    del state["model.norm.weight"]
    state["model.layers.0.mlp.gate_proj.weight"] = state["model.layers.0.mlp.gate_proj.weight"].T
    state["model.layers.9.mlp.gate_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError) as info:
        _load(llama.cfg, "causal_lm", state)
    msg = str(info.value)
    for part in ("missing keys (1)", "model.norm.weight", "unexpected keys (1)", "model.layers.9.mlp.gate_proj.weight",
                 "shape mismatches (1)", "model.layers.0.mlp.gate_proj.weight"):
        assert part in msg, f"{part!r} not in:\n{msg}"


def test_layer_count_mismatch(llama):
    with pytest.raises(CheckpointError, match=re.escape("model.layers.2.self_attn.q_proj.weight")):
        _load(llama.cfg.replace(num_layers=3), "causal_lm", llama.state)
    with pytest.raises(CheckpointError, match=re.escape("model.layers.1.self_attn.q_proj.weight")):
        _load(llama.cfg.replace(num_layers=1), "causal_lm", llama.state)


def test_untied_model_needs_its_embedding(llama):
    state = {("lm_head.weight" if k == "model.embed_tokens.weight" else k): v
             for k, v in llama.state.items() if k != "lm_head.weight"}
    with pytest.raises(CheckpointError, match=re.escape("model.embed_tokens.weight")):
        _load(llama.cfg, "causal_lm", state)


def test_buffers_are_ignored(llama):
    state = dict(llama.state, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(4, np.float32),
                                 "model.rotary_emb.inv_freq": np.zeros(4, np.float32)})
    params, _ = _load(llama.cfg, "causal_lm", state)
    _assert_same_tree(params, llama.params)
    gpt2 = hf_tiny.load("gpt2", "causal_lm")
    state = dict(gpt2.state, **{"transformer.h.0.attn.bias": np.zeros((1, 1, 4, 4), np.float32),
                                "transformer.h.1.attn.masked_bias": np.zeros((), np.float32)})
    params, _ = _load(gpt2.cfg, "causal_lm", state)
    _assert_same_tree(params, gpt2.params)


# ---------------------------------------------------------------------------------------------- key spellings


def test_bare_decoder_keys_load(llama):
    """A LlamaModel-style file (no 'model.' prefix) with the head at the root loads the same tree."""
    bare = {(k if k.startswith("lm_head.") else k[len("model."):]): v for k, v in llama.state.items()}
    assert "embed_tokens.weight" in bare
    params, fresh = _load(llama.cfg, "causal_lm", bare)
    assert fresh == []
    _assert_same_tree(params, llama.params)


def test_bare_gpt2_hub_keys_load():
    """GPT-2 hub files have no 'transformer.' prefix (and carry attn.bias buffers)."""
    base = hf_tiny.load("gpt2", "base")
    assert "wte.weight" in base.state  # the GPT2Model save really is bare
    state = dict(base.state, **{"h.0.attn.bias": np.zeros((1, 1, 4, 4), np.float32)})
    params, fresh = _load(base.cfg, "causal_lm", state)  # tied: the LM head is wte
    assert fresh == []
    _assert_same_tree(params, base.params)


def test_bare_bert_loads_for_classification_with_a_fresh_head():
    base = hf_tiny.load("bert", "base")
    assert "embeddings.word_embeddings.weight" in base.state  # the BertModel save really is bare
    params, fresh = _load(base.cfg, "seq_cls", base.state)
    assert sorted(fresh) == ["classifier/bias", "classifier/kernel"]
    k, b = np.asarray(params["classifier"]["kernel"]), np.asarray(params["classifier"]["bias"])
    assert k.shape == (32, 3) and b.shape == (3,)
    assert np.all(b == 0) and 0.005 < k.std() < 0.05  # filled like the module's init (N(0, 0.02), zeros)
    # everything else is the checkpoint's (the pooler included)
    flat, ref = flatten_params(params), flatten_params(base.params)
    for key, v in ref.items():
        np.testing.assert_array_equal(np.asarray(flat[key]), np.asarray(v), err_msg=key)
    # same file with the 'bert.' prefix: same result
    prefixed = {"bert." + k: v for k, v in base.state.items()}
    params2, fresh2 = _load(base.cfg, "seq_cls", prefixed)
    assert fresh2 == fresh
    _assert_same_tree(params2, params)
    # token classification: no pooler in the model, the checkpoint's pooler is dropped, head is fresh
    params3, fresh3 = _load(base.cfg, "token_cls", base.state)
    assert sorted(fresh3) == ["classifier/bias", "classifier/kernel"] and "pooler" not in params3
    # strict mode refuses instead, naming the head keys
    with pytest.raises(CheckpointError, match=re.escape("classifier.weight")):
        _load(base.cfg, "seq_cls", base.state, allow_missing_heads=False)


def test_bare_roberta_gets_a_fresh_classification_head():
    base = hf_tiny.load("roberta", "base")
    params, fresh = _load(base.cfg, "seq_cls", base.state)
    assert sorted(fresh) == ["classifier/dense/bias", "classifier/dense/kernel",
                             "classifier/out_proj/bias", "classifier/out_proj/kernel"]
    assert params["classifier"]["out_proj"]["kernel"].shape == (32, 3)
    ids, mask = hf_tiny.batch(base)
    out = hf_tiny.jax_forward(base.cfg, "seq_cls", params, ids, mask)
    assert out.logits.shape == (hf_tiny.B, 3) and bool(jnp.all(jnp.isfinite(out.logits)))


@pytest.mark.parametrize("task", ["seq_cls", "token_cls"])
@pytest.mark.parametrize("name,pretraining", [("bert", "pretraining"), ("roberta", "masked_lm")])
def test_pretraining_checkpoint_loads_for_fine_tuning(name, pretraining, task):
    """Hub encoders ship pre-training heads (bert-base-uncased: cls.predictions.* / cls.seq_relationship.*,
    roberta-base: lm_head.*); like transformers, fine-tuning tasks drop them and initialise their own head."""
    _, _, hf_config, state = hf_tiny.saved(name, pretraining)
    assert any(k.startswith(("cls.", "lm_head.")) for k in state)
    cfg = ModelConfig.from_hf(hf_config)
    params, fresh = _load(cfg, task, state)
    assert fresh and all(p.startswith("classifier/") for p in fresh)
    np.testing.assert_array_equal(np.asarray(params["embeddings"]["word_embeddings"]["embedding"]),
                                  state[f"{name}.embeddings.word_embeddings.weight"])


def test_task_head_swaps_follow_hf():
    """A causal-LM file loads as seq_cls (lm_head dropped, score fresh); a seq_cls file loads as base."""
    llama = hf_tiny.load("llama", "causal_lm")
    params, fresh = _load(llama.cfg, "seq_cls", llama.state)
    assert fresh == ["score/kernel"] and "lm_head" not in params
    cls = hf_tiny.load("bert", "seq_cls")
    params, fresh = _load(cls.cfg, "base", cls.state)
    assert fresh == [] and "classifier" not in params and "pooler" in params


# ---------------------------------------------------------------------------------------------- tied lm_head alias


@pytest.mark.parametrize("name,embed_key,embed_path", [
    ("qwen2", "model.embed_tokens.weight", ("embed_tokens", "embedding")),
    ("gpt2", "transformer.wte.weight", ("wte", "embedding")),
])
def test_tied_model_loads_from_lm_head_only(name, embed_key, embed_path):
    """An exported safetensors may keep only `lm_head.weight` of a shared tensor: it is the embedding."""
    tiny = hf_tiny.load(name, "causal_lm")
    assert tiny.cfg.tie_word_embeddings and embed_key in tiny.state
    state = {("lm_head.weight" if k == embed_key else k): v for k, v in tiny.state.items()}
    params, fresh = _load(tiny.cfg, "causal_lm", state)
    assert fresh == []
    np.testing.assert_array_equal(np.asarray(params[embed_path[0]][embed_path[1]]), tiny.state[embed_key])
    _assert_same_tree(params, tiny.params)
    # both copies present (a torch state_dict of a tied model): the duplicate head is dropped
    both = dict(tiny.state, **{"lm_head.weight": tiny.state[embed_key]})
    params, _ = _load(tiny.cfg, "causal_lm", both)
    _assert_same_tree(params, tiny.params)


def test_param_dtype_is_applied(llama):
    params, _ = _load(llama.cfg.replace(param_dtype="bfloat16"), "causal_lm", llama.state)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert params["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 32, 32)
    # kernels are transposed from PyTorch (out, in) and stacked on the layer axis
    np.testing.assert_array_equal(np.asarray(llama.params["layers"]["self_attn"]["k_proj"]["kernel"][1]),
                                  llama.state["model.layers.1.self_attn.k_proj.weight"].T)
