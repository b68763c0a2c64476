"""BERT / RoBERTa vs transformers on tiny random checkpoints saved with save_pretrained, plus dropout behaviour.

BERT batches carry random segment ids; RoBERTa uses its default positions (padding_idx + 1 + count of non-pad
ids) on both sides. Every batch mixes full, left-padded and right-padded rows.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_tiny
from jaxpeft.models import build_model
from parity import assert_close, parity_errors

F32_TOL = dict(max_abs=1e-4, rel=1e-5)
PARITY = [("bert", "seq_cls"), ("bert", "token_cls"), ("bert", "base"),
          ("roberta", "seq_cls"), ("roberta", "token_cls"), ("roberta", "base")]


@pytest.mark.parametrize("name,task", PARITY, ids=[f"{n}-{t}" for n, t in PARITY])
def test_parity_with_transformers(name, task):
    tiny = hf_tiny.load(name, task)
    assert tiny.fresh == []
    out, ref, mask = hf_tiny.run_both(tiny)
    assert_close(*hf_tiny.main_output(tiny, out, ref, mask), **F32_TOL, what=f"{name} {task}")
    if task == "base":  # bare BertModel / RobertaModel: the pooler output too
        assert_close(out.pooled, ref.pooler_output.numpy(), **F32_TOL, what=f"{name} pooler_output")
    else:
        assert out.logits.dtype == jnp.float32


def test_roberta_seq_cls_head_is_dense_tanh_out_proj():
    tiny = hf_tiny.load("roberta", "seq_cls")
    assert set(tiny.params["classifier"]) == {"dense", "out_proj"}
    assert "pooler" not in tiny.params  # HF's RobertaForSequenceClassification has no pooler
    ids = np.array([[0, 5, 6, tiny.cfg.pad_token_id]])
    positions = build_model(tiny.cfg, "seq_cls").apply({"params": tiny.params}, ids, method="default_positions")
    assert positions.tolist() == [[2, 3, 4, 1]]  # padding_idx + 1 + count of non-pad ids; pads at padding_idx


MUTATIONS = [
    ("bert", dict(norm_eps=1e-1)),          # LayerNorm eps 1e-12 -> 1e-1
    ("bert", dict(hidden_act="gelu_tanh")),  # exact erf GELU -> tanh approximation (max-abs 2.5e-4 here)
    ("roberta", dict(pad_token_id=0)),      # positions shifted by one
]


@pytest.mark.parametrize("name,change", MUTATIONS, ids=[f"{n}-{next(iter(c))}" for n, c in MUTATIONS])
def test_parity_check_catches_a_wrong_option(name, change):
    tiny = hf_tiny.load(name, "seq_cls")
    out, ref, mask = hf_tiny.run_both(tiny, tiny.cfg.replace(**change))
    err, _ = parity_errors(*hf_tiny.main_output(tiny, out, ref, mask))
    assert err > F32_TOL["max_abs"], f"{change} went unnoticed: max-abs {err:.2e}"


def test_scan_and_unrolled_layers_agree():
    tiny = hf_tiny.load("bert", "seq_cls")
    cfg_u = tiny.config(scan_layers=False)
    params_u, _ = tiny.load(cfg_u)
    assert jax.tree.structure(params_u) == jax.tree.structure(tiny.params)
    assert [x.shape for x in jax.tree.leaves(params_u)] == [x.shape for x in jax.tree.leaves(tiny.params)]
    out_s, _, _ = hf_tiny.run_both(tiny)
    out_u, _, _ = hf_tiny.run_both(tiny, cfg_u, params_u)
    assert_close(out_u.logits, out_s.logits, max_abs=1e-5, what="unrolled vs scanned")


# measured on this seed: seq_cls logits max-abs 0.0083 (rel 0.004); base hidden max-abs 0.133 (rel 0.010)
@pytest.mark.parametrize("task,tol", [("seq_cls", dict(max_abs=0.03, rel=0.02)), ("base", dict(max_abs=0.3, rel=0.03))],
                         ids=["seq_cls", "base"])
def test_bfloat16_runs_close_to_float32(task, tol):
    tiny = hf_tiny.load("bert", task)
    cfg = tiny.config(dtype="bfloat16", param_dtype="bfloat16")
    params, _ = tiny.load(cfg)
    out, ref, mask = hf_tiny.run_both(tiny, cfg, params)
    if task == "seq_cls":
        assert out.logits.dtype == jnp.float32
    assert out.hidden.dtype == jnp.bfloat16
    actual, expected, m = hf_tiny.main_output(tiny, out, ref, mask)
    assert_close(actual, expected, m, **tol, what=f"bert {task} bf16 vs f32 HF")
    assert parity_errors(actual, expected, m)[0] > 1e-4


# ---------------------------------------------------------------------------------------------- dropout


def _dropout_forward(cfg, params, seed, task="seq_cls"):
    tiny = hf_tiny.load("bert", task)
    ids, mask, tt, _ = hf_tiny.reference("bert", task)
    return hf_tiny.jax_forward(cfg, task, params, ids, mask, deterministic=False,
                               rngs={"dropout": jax.random.key(seed)}, token_type_ids_bt=tt), tiny


def test_dropout_depends_on_the_rng_only():
    tiny = hf_tiny.load("bert", "seq_cls")
    assert tiny.cfg.hidden_dropout == 0.1 and tiny.cfg.attention_dropout == 0.1
    a, _ = _dropout_forward(tiny.cfg, tiny.params, 1)
    a2, _ = _dropout_forward(tiny.cfg, tiny.params, 1)
    b, _ = _dropout_forward(tiny.cfg, tiny.params, 2)
    np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(a2.logits))
    assert parity_errors(a.logits, b.logits)[0] > 1e-3, "two dropout rngs gave the same output"
    # deterministic=True ignores dropout: HF eval output
    det, ref, _ = hf_tiny.run_both(tiny)
    assert_close(det.logits, ref.logits.numpy(), **F32_TOL, what="deterministic")
    assert parity_errors(a.logits, det.logits)[0] > 1e-3, "deterministic=False applied no dropout"


def test_dropout_same_under_scan_and_unrolled():
    tiny = hf_tiny.load("bert", "seq_cls")
    a, _ = _dropout_forward(tiny.cfg, tiny.params, 3)
    u, _ = _dropout_forward(tiny.cfg.replace(scan_layers=False), tiny.params, 3)
    assert_close(u.logits, a.logits, max_abs=1e-5, what="dropout scan vs unrolled")


@pytest.mark.parametrize("scan", [True, False])
def test_dropout_masks_differ_per_layer(scan):
    """The 'dropout' rng is split per layer under nn.scan: layer 0 and layer 1 drop different units."""
    tiny = hf_tiny.load("bert", "base")
    cfg = tiny.cfg.replace(hidden_dropout=0.5, attention_dropout=0.0, scan_layers=scan)
    ids, mask, tt, _ = hf_tiny.reference("bert", "base")
    module = build_model(cfg, "base")
    _, state = jax.jit(lambda p: module.apply(
        {"params": p}, ids, mask, token_type_ids_bt=tt, deterministic=False, rngs={"dropout": jax.random.key(0)},
        capture_intermediates=True, mutable=["intermediates"]))(tiny.params)
    # output of the FFN-output dropout of every layer, stacked on the layer axis: (L, B, T, D)
    y = np.asarray(state["intermediates"]["encoder"]["layer"]["output"]["Dropout_0"]["__call__"][0])
    assert y.shape[0] == cfg.num_layers == 2
    kept = y != 0
    assert 0.3 < kept.mean() < 0.7  # rate 0.5 really applied
    assert (kept[0] != kept[1]).mean() > 0.3, "every layer used the same dropout mask"
    # and the attention-output dropout differs from the FFN-output dropout within a layer
    y_att = np.asarray(state["intermediates"]["encoder"]["layer"]["attention"]["output"]["Dropout_0"]["__call__"][0])
    assert ((y_att != 0)[0] != kept[0]).mean() > 0.3
