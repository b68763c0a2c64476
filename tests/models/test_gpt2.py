"""GPT-2 vs transformers on tiny random checkpoints saved with save_pretrained (left and right padding rows)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_tiny
from parity import assert_close, parity_errors

F32_TOL = dict(max_abs=1e-4, rel=1e-5)
PARITY = [("gpt2", "causal_lm"), ("gpt2", "seq_cls"), ("gpt2", "token_cls"), ("gpt2", "base")]


@pytest.mark.parametrize("name,task", PARITY, ids=[t for _, t in PARITY])
def test_parity_with_transformers(name, task):
    tiny = hf_tiny.load(name, task)
    assert tiny.fresh == []
    out, ref, mask = hf_tiny.run_both(tiny)
    assert_close(*hf_tiny.main_output(tiny, out, ref, mask), **F32_TOL, what=f"gpt2 {task}")


def test_tied_head_and_config():
    tiny = hf_tiny.load("gpt2", "causal_lm")
    cfg = tiny.cfg
    assert cfg.tie_word_embeddings and "lm_head" not in tiny.params
    assert cfg.hidden_act == "gelu_tanh" and cfg.intermediate_size == 4 * cfg.hidden_size
    # save_pretrained drops the tied lm_head: the file holds the embedding only
    assert "lm_head.weight" not in tiny.state and "transformer.wte.weight" in tiny.state


@pytest.mark.parametrize("change", [dict(hidden_act="gelu"), dict(norm_eps=1e-3)], ids=["gelu", "eps"])
def test_parity_check_catches_a_wrong_option(change):
    tiny = hf_tiny.load("gpt2", "causal_lm")
    out, ref, mask = hf_tiny.run_both(tiny, tiny.cfg.replace(**change))
    err, _ = parity_errors(*hf_tiny.main_output(tiny, out, ref, mask))
    assert err > 3 * F32_TOL["max_abs"], f"{change} went unnoticed: max-abs {err:.2e}"


def test_scan_and_unrolled_layers_agree():
    tiny = hf_tiny.load("gpt2", "causal_lm")
    cfg_u = tiny.config(scan_layers=False)
    params_u, _ = tiny.load(cfg_u)
    assert jax.tree.structure(params_u) == jax.tree.structure(tiny.params)
    assert [x.shape for x in jax.tree.leaves(params_u)] == [x.shape for x in jax.tree.leaves(tiny.params)]
    out_s, _, mask = hf_tiny.run_both(tiny)
    out_u, _, _ = hf_tiny.run_both(tiny, cfg_u, params_u)
    assert_close(out_u.logits, out_s.logits, mask, max_abs=1e-5, what="unrolled vs scanned")


# measured on this seed: max-abs 0.069, norm-relative 0.0098 (|logits| <= ~4.2)
BF16_TOL = dict(max_abs=0.2, rel=0.03)


def test_bfloat16_runs_close_to_float32():
    tiny = hf_tiny.load("gpt2", "causal_lm")
    cfg = tiny.config(dtype="bfloat16", param_dtype="bfloat16")
    params, _ = tiny.load(cfg)
    out, ref, mask = hf_tiny.run_both(tiny, cfg, params)
    assert out.logits.dtype == jnp.float32 and out.hidden.dtype == jnp.bfloat16
    actual, expected, m = hf_tiny.main_output(tiny, out, ref, mask)
    assert_close(actual, expected, m, **BF16_TOL, what="gpt2 bf16 vs f32 HF")
    assert parity_errors(actual, expected, m)[0] > 1e-3


def test_learned_positions_follow_the_mask():
    """A left-padded row equals the same tokens unpadded: wpe is indexed by the count of real tokens."""
    tiny = hf_tiny.load("gpt2", "causal_lm")
    ids, mask = hf_tiny.batch(tiny)
    row, left = 1, int((mask[1] == 0).sum())
    padded = hf_tiny.jax_forward(tiny.cfg, "causal_lm", tiny.params, ids, mask).logits[row, left:]
    unpadded = hf_tiny.jax_forward(tiny.cfg, "causal_lm", tiny.params, ids[row:row + 1, left:],
                                   np.ones_like(mask[row:row + 1, left:])).logits[0]
    assert_close(padded, unpadded, max_abs=1e-5, what="gpt2 left padding")


# HF config entries -> the rate GPT2ForTokenClassification's own `self.dropout` uses (read from the module below)
HEAD_DROPOUT = [dict(classifier_dropout=0.3), dict(hidden_dropout=0.25), dict(summary_first_dropout=0.45),
                dict(hidden_dropout=0.25, classifier_dropout=0.0)]


@pytest.mark.parametrize("hf_kw", HEAD_DROPOUT, ids=["classifier_dropout", "hidden_dropout", "default", "zero"])
def test_token_cls_head_dropout_rate_is_the_one_hf_uses(hf_kw):
    """classifier_dropout, else hidden_dropout, else 0.1: never resid_pdrop (0.35 here) or summary_first_dropout."""
    import transformers

    from jaxpeft.models import ModelConfig
    from jaxpeft.models.gpt2 import classifier_dropout_rate

    hf_cfg = hf_tiny.gpt2_config(resid_pdrop=0.35, **hf_kw)
    expected = transformers.GPT2ForTokenClassification(hf_cfg).dropout.p
    assert classifier_dropout_rate(ModelConfig.from_hf(hf_cfg.to_dict())) == pytest.approx(expected, abs=1e-12)


def test_token_cls_train_mode_drops_the_classifier_input_at_hf_rate():
    """HF applies dropout to the final hidden states before `classifier`. With every other dropout 0
    (resid/embd/attn), train mode must leave `hidden` untouched and zero a fraction p of the classifier's input,
    scaling the rest by 1 / (1 - p), p = 0.3 being HF's rate here. An identity classifier exposes the mask."""
    from jaxpeft.models import ModelConfig
    from parity import assert_token_head_dropout

    hf_cfg = hf_tiny.gpt2_config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=32,
                                 classifier_dropout=0.3)
    cfg = ModelConfig.from_hf(hf_cfg.to_dict())
    assert cfg.hidden_dropout == 0.0 and cfg.attention_dropout == 0.0
    assert_token_head_dropout(cfg, "classifier", 0.3)
