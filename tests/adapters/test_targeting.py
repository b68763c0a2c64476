"""Adapter targeting: which modules a config selects, compared with the modules PEFT 0.21.2 itself targets.

PEFT runs on meta-device copies of the tiny HF models (no weights); jaxpeft resolves the same config on the
matching ModelConfig. Both sides must select exactly the same concrete module paths. Then the error paths:
an entry that matches nothing (named, with close candidates), out-of-range layers, strict=False.
"""
import math

import peft
import pytest
import torch

import hf_tiny
from jaxpeft.adapters import AdaptedModel, LoraConfig
from jaxpeft.adapters.lora import lora_scale
from jaxpeft.adapters.peft_io import _hf_module_path
from jaxpeft.models import ModelConfig, build_model

# id -> (tiny model, task, PEFT LoraConfig kwargs; jaxpeft gets the same with lists as tuples)
CASES = {
    "suffixes": ("llama", "causal_lm", dict(target_modules=["q_proj", "v_proj"])),
    "dotted_suffixes": ("llama", "causal_lm", dict(target_modules=["self_attn.q_proj", "mlp.down_proj"])),
    "regex_full_path": ("llama", "causal_lm", dict(target_modules=r"model\.layers\.\d+\.self_attn\.(q|v)_proj")),
    "regex_layer1": ("llama", "causal_lm", dict(target_modules=r".*\.1\..*_proj")),
    "exclude_list": ("llama", "causal_lm", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                exclude_modules=["k_proj"])),
    "exclude_regex": ("llama", "causal_lm", dict(target_modules=r".*_proj", exclude_modules=r".*\.0\..*")),
    "exclude_one_layer_suffix": ("llama", "causal_lm", dict(target_modules=["q_proj"],
                                                            exclude_modules=["layers.0.self_attn.q_proj"])),
    "layers_to_transform": ("llama", "causal_lm", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    "lm_head": ("llama", "causal_lm", dict(target_modules=["lm_head", "q_proj"])),
    "seq_cls_score": ("llama", "seq_cls", dict(target_modules=["score", "o_proj"])),
    "gpt2_c_proj_both": ("gpt2", "causal_lm", dict(target_modules=["c_proj"], fan_in_fan_out=True)),
    "gpt2_attn_c_proj": ("gpt2", "causal_lm", dict(target_modules=["attn.c_proj", "c_fc"], fan_in_fan_out=True)),
    "bert_output_dense": ("bert", "seq_cls", dict(target_modules=["output.dense"])),
    "bert_dense_incl_pooler": ("bert", "seq_cls", dict(target_modules=["dense"])),
    "bert_exclude_regex": ("bert", "seq_cls", dict(target_modules=["query", "value"],
                                                   exclude_modules=r".*layer\.0\..*")),
    "bert_base_suffixes": ("bert", "base", dict(target_modules=["query", "value"])),
}
# bare backbones (task 'base' = PEFT FEATURE_EXTRACTION on BertModel / LlamaModel): PEFT matches a regex against
# paths WITHOUT the task-model prefix ('encoder.layer.0...'); jaxpeft matches it against 'bert.encoder.layer.0...'
BASE_REGEX = {
    "bert_base_regex": ("bert", "base", dict(target_modules=r"encoder\.layer\.\d+\.attention\.self\.query")),
    "llama_base_regex": ("llama", "base", dict(target_modules=r"layers\.\d+\.self_attn\.q_proj")),
}


def _peft_targets(name, task, kw):
    cls = hf_tiny.HF_CLASSES[(name, task)]
    with torch.device("meta"):
        model = cls(hf_tiny.CONFIGS[name]())
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, **kw))
    return sorted(pm.base_model.targeted_module_names)


def _jax_config(kw):
    kw = {k: v for k, v in kw.items() if k != "fan_in_fan_out"}
    for k in ("target_modules", "exclude_modules", "layers_to_transform"):
        if isinstance(kw.get(k), list):
            kw[k] = tuple(kw[k])
    return LoraConfig(r=2, **kw)


def _cfg(name):
    return ModelConfig.from_hf(hf_tiny.CONFIGS[name]().to_dict())


def _model(name, task):
    return AdaptedModel.wrap(build_model(_cfg(name), task))


def _our_targets(am, adapter="x"):
    """Concrete module paths inside the HF task model (bare backbones without the task-model prefix)."""
    out = []
    for t in am.spec(adapter).targets:
        for layer in (t.layers if t.layered else (None,)):
            out.append(_hf_module_path(am, t.hf_name(layer)))
    return sorted(out)


@pytest.mark.parametrize("case", list(CASES))
def test_targets_equal_peft(case):
    name, task, kw = CASES[case]
    theirs = _peft_targets(name, task, kw)
    assert theirs, "PEFT selected nothing: the case is broken"
    am = _model(name, task).add("x", _jax_config(kw))
    assert _our_targets(am) == theirs


@pytest.mark.parametrize("case", list(BASE_REGEX))
def test_base_task_regex_targets_equal_peft(case):
    name, task, kw = BASE_REGEX[case]
    theirs = _peft_targets(name, task, kw)
    assert theirs
    am = _model(name, task).add("x", _jax_config(kw))
    assert _our_targets(am) == theirs


def test_layered_targets_carry_layer_indices_and_shapes():
    lora = LoraConfig(target_modules=("q_proj", "v_proj"), layers_to_transform=(1,))
    am = _model("llama", "causal_lm").add("x", lora)
    cfg = am.model_cfg
    got = {t.flax_module: t for t in am.spec("x").targets}
    assert set(got) == {"layers/self_attn/q_proj", "layers/self_attn/v_proj"}
    q, v = got["layers/self_attn/q_proj"], got["layers/self_attn/v_proj"]
    assert q.layered and q.layers == (1,) and q.num_layers == cfg.num_layers
    assert (q.n_in, q.n_out) == (cfg.hidden_size, cfg.num_heads * cfg.head_dim)
    assert (v.n_in, v.n_out) == (cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim)


def test_alpha_pattern_per_layer_matches_peft_scaling():
    """alpha_pattern keyed on one layer's path gives that layer its own scale, as PEFT does."""
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj"], alpha_pattern={"layers.1.self_attn.q_proj": 32})
    with torch.device("meta"):
        model = hf_tiny.HF_CLASSES[("llama", "causal_lm")](hf_tiny.CONFIGS["llama"]())
    pm = peft.get_peft_model(model, peft.LoraConfig(**kw))
    theirs = [layer.self_attn.q_proj.scaling["default"] for layer in pm.base_model.model.model.layers]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj",), alpha_pattern=kw["alpha_pattern"])
    (t,) = _model("llama", "causal_lm").add("x", cfg).spec("x").targets
    ours = [lora_scale(cfg, dict(o)) for o in t.layer_options]
    assert ours == pytest.approx(theirs) and theirs == pytest.approx([2.0, 8.0])


def test_rank_pattern_per_layer_is_rejected_with_a_reason():
    cfg = LoraConfig(r=4, target_modules=("q_proj",), rank_pattern={"layers.1.self_attn.q_proj": 8})
    with pytest.raises(ValueError, match="different ranks per layer"):
        _model("llama", "causal_lm").add("x", cfg)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("targets,bad,suggest", [
    (("q_prj",), "q_prj", "q_proj"),
    (("q_proj", "v_prjo"), "v_prjo", "v_proj"),
    (("self_atn.o_proj",), "self_atn.o_proj", "self_attn.o_proj"),
    (("mlp.dwn_proj",), "mlp.dwn_proj", "down_proj"),
])
def test_entry_matching_nothing_names_it_and_close_candidates(targets, bad, suggest):
    with pytest.raises(ValueError) as e:
        _model("llama", "causal_lm").add("x", LoraConfig(target_modules=targets))
    msg = str(e.value)
    assert repr(bad) in msg and "close candidates" in msg and suggest in msg.split("close candidates")[1], msg


def test_bert_typo_suggests_bert_names():
    with pytest.raises(ValueError, match=r"'quer'.*close candidates.*query"):
        _model("bert", "seq_cls").add("x", LoraConfig(target_modules=("quer", "value")))


def test_regex_matching_nothing_raises():
    with pytest.raises(ValueError, match=r"is one regex string, matched against whole module paths, and matches none"):
        _model("llama", "causal_lm").add("x", LoraConfig(target_modules=r"model\.layers\.\d+\.attn\.q"))


def test_regex_is_a_full_match_not_a_search():
    with pytest.raises(ValueError, match=r"matches none .* for suffix matching write a list instead"):
        _model("llama", "causal_lm").add("x", LoraConfig(target_modules=r"q_proj"))


@pytest.mark.parametrize("layers", [(2,), (0, 5), (-1,)])
def test_layer_index_out_of_range(layers):
    with pytest.raises(ValueError, match=r"out of range.*2 layers"):
        _model("llama", "causal_lm").add("x", LoraConfig(target_modules=("q_proj",), layers_to_transform=layers))


def test_exclude_everything_selects_nothing():
    with pytest.raises(ValueError, match="selects no module"):
        _model("llama", "causal_lm").add("x", LoraConfig(target_modules=("q_proj",), exclude_modules=("q_proj",)))


def test_strict_false_is_lenient_per_entry_but_not_for_an_empty_selection():
    am = _model("llama", "causal_lm").add("x", LoraConfig(target_modules=("q_proj", "nope")), strict=False)
    assert [t.flax_module for t in am.spec("x").targets] == ["layers/self_attn/q_proj"]
    with pytest.raises(ValueError, match="selects no module"):
        _model("llama", "causal_lm").add("y", LoraConfig(target_modules=("nope", "nada")), strict=False)
    with pytest.raises(ValueError, match="'nope'"):
        _model("llama", "causal_lm").add("z", LoraConfig(target_modules=("q_proj", "nope")))


def test_default_targets_per_architecture():
    for name, task, expected in (("llama", "causal_lm", {"q_proj", "v_proj"}), ("gpt2", "causal_lm", {"c_attn"}),
                                 ("bert", "seq_cls", {"query", "value"})):
        am = _model(name, task).add("x", LoraConfig())
        assert {t.flax_module.rsplit("/", 1)[1] for t in am.spec("x").targets} == expected
        assert all(t.layers == tuple(range(2)) for t in am.spec("x").targets)
    assert math.isclose(lora_scale(LoraConfig(), {}), 1.0)
