"""ModelConfig: from_hf on config.json files written by transformers' save_pretrained, legacy spellings, and
validation (bad values raise naming the field; unsupported features raise NotImplementedError)."""
import json

import pytest
import transformers

import hf_tiny
from jaxpeft.models import ModelConfig


def _saved_config(name, tmp_path, **kw) -> dict:
    hf_tiny.CONFIGS[name](**kw).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


@pytest.fixture(scope="module")
def llama_dict(tmp_path_factory):
    return _saved_config("llama", tmp_path_factory.mktemp("llama"))


# ---------------------------------------------------------------------------------------------- from_hf


EXPECTED = {
    "llama": dict(arch="llama", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  intermediate_size=48, norm_eps=1e-5, hidden_act="silu", rope_theta=500.0, rope_scaling=1.0,
                  tie_word_embeddings=False, qkv_bias=False, num_labels=3, pad_token_id=0, eos_token_id=2),
    "llama_linear": dict(rope_theta=500.0, rope_scaling=2.0),
    "qwen2": dict(arch="qwen2", qkv_bias=True, o_bias=False, tie_word_embeddings=True, norm_eps=1e-6),
    "gemma3": dict(arch="gemma3_text", head_dim=16, hidden_act="gelu_tanh", sliding_window=4,
                   layer_types=("sliding_attention", "full_attention") * 2, query_pre_attn_scalar=24,
                   rope_theta=1e6, rope_local_theta=1e4, norm_offset=1.0, qk_norm=True, sandwich_norm=True,
                   embed_scale=True, tie_word_embeddings=True),
    "gpt2": dict(arch="gpt2", num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8, intermediate_size=128,
                 max_position_embeddings=64, norm_eps=1e-5, hidden_act="gelu_tanh", tie_word_embeddings=True,
                 hidden_dropout=0.1, attention_dropout=0.1),
    "bert": dict(arch="bert", norm_eps=1e-12, hidden_act="gelu", type_vocab_size=2, pad_token_id=0,
                 hidden_dropout=0.1, attention_dropout=0.1, tie_word_embeddings=False),
    "roberta": dict(arch="roberta", pad_token_id=1, type_vocab_size=1, norm_eps=1e-12),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_from_hf_reads_saved_config_json(name, tmp_path):
    cfg = ModelConfig.from_hf(_saved_config(name, tmp_path))
    for field, want in EXPECTED[name].items():
        assert getattr(cfg, field) == want, f"{name}.{field}: {getattr(cfg, field)!r} != {want!r}"
    assert cfg.scan_layers and cfg.dtype == "float32" and cfg.remat == "dots_no_batch"
    hash(cfg)  # usable as a jit / lru_cache key


def test_attention_scale():
    g = ModelConfig.from_hf(hf_tiny.gemma3_config().to_dict())
    assert g.attn_scale == pytest.approx(24 ** -0.5)
    assert g.replace(query_pre_attn_scalar=None).attn_scale == pytest.approx(16 ** -0.5)


def test_overrides_and_replace(llama_dict):
    cfg = ModelConfig.from_hf(llama_dict, scan_layers=False, dtype="bfloat16", param_dtype="bfloat16", remat="dots")
    assert (cfg.scan_layers, cfg.dtype, cfg.param_dtype, cfg.remat) == (False, "bfloat16", "bfloat16", "dots")
    assert cfg.replace(scan_layers=True) == ModelConfig.from_hf(llama_dict, dtype="bfloat16",
                                                                 param_dtype="bfloat16", remat="dots")
    with pytest.raises(ValueError, match="remat"):
        cfg.replace(remat="sometimes")  # replace validates again
    assert "initializer_range" in cfg.extra  # unused HF entries are kept for export


def test_num_labels_from_id2label_and_eos_list(llama_dict):
    d = dict(llama_dict, id2label={"0": "a", "1": "b", "2": "c", "3": "d", "4": "e"}, eos_token_id=[2, 5])
    cfg = ModelConfig.from_hf(d)
    assert cfg.num_labels == 5 and cfg.eos_token_id == (2, 5)
    hash(cfg)


def test_gemma3_multimodal_wrapper_uses_text_config():
    text = hf_tiny.gemma3_config().to_dict()
    cfg = ModelConfig.from_hf({"model_type": "gemma3", "text_config": text})
    assert cfg == ModelConfig.from_hf(text)


@pytest.mark.parametrize("rope", [
    dict(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4.0}),
    dict(rope_theta=5e5, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    dict(rope_theta=5e5, rope_scaling=None),
], ids=["legacy-type", "legacy-rope_type", "no-scaling"])
def test_legacy_llama_rope_keys_match_transformers(llama_dict, rope):
    """An old config.json (rope_theta / rope_scaling) reads the same as transformers' normalised form."""
    old = {k: v for k, v in llama_dict.items() if k != "rope_parameters"} | rope
    via_hf = transformers.LlamaConfig(**{k: v for k, v in old.items() if k != "model_type"}).to_dict()
    a, b = ModelConfig.from_hf(old), ModelConfig.from_hf(via_hf)
    assert (a.rope_theta, a.rope_scaling) == (b.rope_theta, b.rope_scaling)
    assert a.rope_theta == 5e5 and a.rope_scaling == (4.0 if rope["rope_scaling"] else 1.0)


def _legacy_gemma3() -> dict:
    """A gemma-3 config.json as transformers 4.50 wrote it: sliding_window_pattern, no layer_types, no
    rope_parameters (e.g. google/gemma-3-1b-it)."""
    return dict(model_type="gemma3_text", vocab_size=97, hidden_size=32, intermediate_size=48,
                num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                sliding_window=4, sliding_window_pattern=6, rope_theta=1e6, rope_local_base_freq=1e4,
                rope_scaling={"rope_type": "linear", "factor": 8.0}, query_pre_attn_scalar=16,
                hidden_activation="gelu_pytorch_tanh", max_position_embeddings=64, rms_norm_eps=1e-6)


def test_legacy_gemma3_rope_keys_match_transformers():
    old = _legacy_gemma3()
    via_hf = transformers.Gemma3TextConfig(**{k: v for k, v in old.items() if k != "model_type"}).to_dict()
    a, b = ModelConfig.from_hf(old), ModelConfig.from_hf(via_hf)
    assert (a.rope_theta, a.rope_scaling, a.rope_local_theta) == (b.rope_theta, b.rope_scaling, b.rope_local_theta)
    assert (a.rope_theta, a.rope_scaling, a.rope_local_theta) == (1e6, 8.0, 1e4)


def test_legacy_gemma3_sliding_window_pattern_gives_sliding_layers():
    """Without `layer_types`, transformers derives them from sliding_window_pattern (5 local : 1 global);
    reading such a config.json as all-global attention would silently change every long-context output."""
    old = _legacy_gemma3()
    hf_types = transformers.Gemma3TextConfig(**{k: v for k, v in old.items() if k != "model_type"}).layer_types
    assert hf_types.count("full_attention") == 2
    cfg = ModelConfig.from_hf(old)
    assert cfg.sliding_layers == tuple(t == "sliding_attention" for t in hf_types)


# ---------------------------------------------------------------------------------------------- validation


def test_unknown_model_type_is_refused(llama_dict):
    with pytest.raises(ValueError, match="model_type 'mistral'"):
        ModelConfig.from_hf(dict(llama_dict, model_type="mistral"))
    cfg = ModelConfig.from_hf(llama_dict)
    with pytest.raises(ValueError, match=r"ModelConfig\.arch='mistral'"):
        cfg.replace(arch="mistral")


@pytest.mark.parametrize("change,field", [
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(hidden_act="mish"), "hidden_act"),
    (dict(dtype="float64"), "dtype"),
    (dict(param_dtype="int8"), "param_dtype"),
    (dict(remat="always"), "remat"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_layers=-1), "num_layers"),
    (dict(layer_types=("full_attention",)), "layer_types"),
    (dict(layer_types=("full_attention", "chunked_attention")), "layer_types"),
    (dict(layer_types=("sliding_attention", "full_attention"), sliding_window=None), "sliding_window"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_invalid_values_raise_naming_the_field(llama_dict, change, field):
    cfg = ModelConfig.from_hf(llama_dict)
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}="):
        cfg.replace(**change)


def test_invalid_values_in_config_json(llama_dict):
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig.from_hf(dict(llama_dict, num_key_value_heads=3))
    g = hf_tiny.gemma3_config().to_dict()
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig.from_hf(dict(g, layer_types=g["layer_types"][:3]))


@pytest.mark.parametrize("name,change,match", [
    ("llama", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                    "original_max_position_embeddings": 32}), "yarn"),
    ("llama", dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 32}), "llama3"),
    ("llama", dict(hidden_act="mish"), "mish"),
    ("gemma3", dict(final_logit_softcapping=30.0), "soft-capping"),
    ("qwen2", dict(use_sliding_window=True), "use_sliding_window"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    ("bert", dict(position_embedding_type="relative_key"), "absolute"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_unsupported_features_raise_not_implemented(name, change, match):
    d = hf_tiny.CONFIGS[name]().to_dict()
    with pytest.raises(NotImplementedError, match=match):
        ModelConfig.from_hf({**d, **change})


def test_gemma3_bidirectional_attention_is_refused():
    """EmbeddingGemma-style configs (use_bidirectional_attention=True) must not load as a causal model."""
    d = hf_tiny.gemma3_config().to_dict()
    assert d["use_bidirectional_attention"] is False
    with pytest.raises(NotImplementedError, match="bidirectional"):
        ModelConfig.from_hf(dict(d, use_bidirectional_attention=True))
