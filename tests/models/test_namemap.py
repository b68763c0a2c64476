"""The name map (flax path <-> HF key <-> layer <-> layout <-> logical axes) against real HF modules."""
import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

import hf_tiny
from jaxpeft.loading.convert import flatten_params, hf_to_params, params_to_hf
from jaxpeft.models import TASKS, ModelConfig, build_model
from jaxpeft.models.namemap import module_names, name_map

PREFIX = {"llama": "model.", "qwen2": "model.", "gemma3_text": "model.", "gpt2": "transformer.",
          "bert": "bert.", "roberta": "roberta."}
CASES = sorted(k for k in hf_tiny.HF_CLASSES if k[0] != "llama_linear" and k[1] in TASKS)


def _ids(cases):
    return [f"{n}-{t}" for n, t in cases]


def _cfg(name, task):
    return ModelConfig.from_hf(hf_tiny.saved(name, task)[2])


def _canon(cfg, task, hf_key):
    """HF task-model key -> the key in this HF module (bare backbones have no prefix)."""
    prefix = PREFIX[cfg.arch]
    return hf_key[len(prefix):] if task == "base" and hf_key.startswith(prefix) else hf_key


@pytest.mark.parametrize("name,task", CASES, ids=_ids(CASES))
def test_logical_axes_have_the_right_rank(name, task):
    cfg = _cfg(name, task)
    entries = name_map(cfg, task)
    assert entries
    for e in entries:
        assert len(e.axes) == len(e.shape), e
        assert None not in e.axes, f"{e.flax_path} has no logical axis names"
        if e.layered:
            assert e.axes[0] == "layers" and e.shape[0] == cfg.num_layers, e
            assert "layers" not in e.axes[1:]
        else:
            assert "layers" not in e.axes, e
    # the abstract init carries the same names on every leaf
    init = jax.eval_shape(build_model(cfg, task).init, jax.random.key(0), np.zeros((1, 2), np.int32))["params"]
    leaves = jax.tree.leaves(init, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.Partitioned) for x in leaves)
    assert len(leaves) == len(entries)


@pytest.mark.parametrize("name,task", CASES, ids=_ids(CASES))
def test_name_map_matches_the_hf_state_dict(name, task):
    """Every entry's HF key is in the HF module's state_dict with the layout-rule shape, and every HF parameter
    (the tied lm_head aside) is covered by some entry."""
    _, hf, _, _ = hf_tiny.saved(name, task)
    cfg = _cfg(name, task)
    sd = hf.state_dict()
    covered = set()
    for e in name_map(cfg, task):
        per_layer = e.shape[1:] if e.layered else e.shape
        for k in e.hf_keys(cfg.num_layers):
            key = _canon(cfg, task, k)
            assert key in sd, f"{e.flax_path} -> {k}: not in the HF state_dict"
            want = tuple(reversed(per_layer)) if e.transpose else tuple(per_layer)
            assert tuple(sd[key].shape) == want, f"{key}: HF {tuple(sd[key].shape)} vs layout rule {want}"
            covered.add(key)
    params = {n for n, _ in hf.named_parameters()}  # shared (tied) tensors listed once
    assert params - covered == set(), f"HF parameters the name map does not cover: {sorted(params - covered)}"


@pytest.mark.parametrize("name,task", CASES, ids=_ids(CASES))
def test_params_to_hf_round_trips_exactly(name, task):
    tiny = hf_tiny.load(name, task)
    exported = params_to_hf(tiny.cfg, task, tiny.params)
    expected = {PREFIX[tiny.cfg.arch] + k if task == "base" else k: v for k, v in tiny.state.items()}
    assert set(exported) == set(expected)
    for k, v in expected.items():
        assert exported[k].shape == v.shape and exported[k].dtype == v.dtype, k
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    back, fresh = hf_to_params(tiny.cfg, task, exported.keys(), exported.__getitem__)
    assert fresh == []
    assert jax.tree.structure(back) == jax.tree.structure(tiny.params)
    flat_a, flat_b = flatten_params(back), flatten_params(tiny.params)
    for k in flat_b:
        np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=k)
    # the name map describes exactly the loaded tree
    assert {e.flax_path: e.shape for e in name_map(tiny.cfg, task)} == {k: v.shape for k, v in flat_b.items()}


@pytest.mark.parametrize("name,task,flax_module,hf_module", [
    ("llama", "causal_lm", "layers/self_attn/q_proj", "model.layers.{i}.self_attn.q_proj"),
    ("llama", "causal_lm", "layers/mlp/down_proj", "model.layers.{i}.mlp.down_proj"),
    ("llama", "causal_lm", "lm_head", "lm_head"),
    ("llama", "seq_cls", "score", "score"),
    ("gemma3", "causal_lm", "layers/mlp/gate_proj", "model.layers.{i}.mlp.gate_proj"),
    ("gpt2", "causal_lm", "h/attn/c_attn", "transformer.h.{i}.attn.c_attn"),
    ("gpt2", "causal_lm", "h/mlp/c_proj", "transformer.h.{i}.mlp.c_proj"),
    ("bert", "seq_cls", "encoder/layer/attention/self/query", "bert.encoder.layer.{i}.attention.self.query"),
    ("bert", "seq_cls", "encoder/layer/attention/output/dense", "bert.encoder.layer.{i}.attention.output.dense"),
    ("bert", "seq_cls", "pooler/dense", "bert.pooler.dense"),
    ("bert", "seq_cls", "classifier", "classifier"),
    ("roberta", "seq_cls", "classifier/out_proj", "classifier.out_proj"),
])
def test_module_names(name, task, flax_module, hf_module):
    assert module_names(_cfg(name, task), task)[flax_module] == hf_module


@pytest.mark.parametrize("name,task", CASES, ids=_ids(CASES))
def test_module_names_are_the_hf_dense_modules(name, task):
    """module_names covers exactly HF's Linear / Conv1D modules (adapter targets), each resolvable per layer."""
    from transformers.pytorch_utils import Conv1D

    _, hf, _, _ = hf_tiny.saved(name, task)
    cfg = _cfg(name, task)
    names = module_names(cfg, task)
    resolved = set()
    for flax_mod, hf_mod in names.items():
        for i in range(cfg.num_layers) if "{i}" in hf_mod else [None]:
            path = _canon(cfg, task, hf_mod.format(i=i) + ".weight")[:-len(".weight")]
            sub = hf.get_submodule(path)
            assert isinstance(sub, (torch.nn.Linear, Conv1D)), f"{flax_mod} -> {path} is {type(sub).__name__}"
            resolved.add(path)
    dense = {n for n, m in hf.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    if cfg.tie_word_embeddings:
        dense.discard("lm_head")
    assert dense - resolved == set(), f"HF dense modules missing from module_names: {sorted(dense - resolved)}"
