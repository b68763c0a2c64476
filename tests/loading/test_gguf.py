"""Tests for jaxpeft.loading.gguf: torch-free GGUF -> HF-named tensors + HF config, cache, corrupt files.

Fast tests use tiny GGUFs written with gguf.GGUFWriter the way llama.cpp converts an HF state dict
(q/k row permutation for llama, norm + 1 for gemma3), with Q8_0 values chosen to round-trip exactly,
so the expected HF tensors are known independently of the loader. Real-file tests compare against
transformers' own GGUF loader (torch), which the library itself must never import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from jaxpeft.loading import gguf as jgguf
from jaxpeft.loading.errors import CheckpointError
from jaxpeft.loading.gguf import GGUFCheckpoint, load_gguf, read_gguf_config

Q8 = gguf.GGMLQuantizationType.Q8_0

# ------------------------------------------------------------------------------------------ tiny GGUFs


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _vocab() -> tuple[list[str], list[int]]:
    b2u = _bytes_to_unicode()
    tokens = SPECIALS + [b2u[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "in", "Ġa"]
    return tokens, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))


def _exact_q8(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values that survive Q8_0 quantization exactly: q/128 with |q| <= 127 and one 127 per block."""
    q = rng.integers(-127, 128, size=shape)
    q[..., ::32] = 127 * rng.choice([-1, 1], size=q[..., ::32].shape)
    return (q / 128).astype(np.float32)


def _dyadic(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 vector k/256 (|k| < 128): exact under x + 1 - 1, like gemma's stored norm offsets."""
    return (rng.integers(-127, 128, size=n) / 256).astype(np.float32)


def _permute_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rotate-half rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    n_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    ff: int = 128,
    untied: bool = False,
    extra_tensor: str | None = None,
) -> dict[str, np.ndarray]:
    """Write a small GGUF of `arch` as llama.cpp would convert it; return the HF state dict it encodes."""
    rng = np.random.default_rng(seed)
    tokens, types = _vocab()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", n_layers)
    w.add_uint32(f"{arch}.context_length", 256)
    w.add_uint32(f"{arch}.embedding_length", hidden)
    w.add_uint32(f"{arch}.feed_forward_length", ff)
    w.add_uint32(f"{arch}.attention.head_count", heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", kv_heads)
    w.add_float32(f"{arch}.rope.freq_base", 1e6 if arch != "llama" else 1e5)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6 if arch != "llama" else 1e-5)
    if arch == "llama":
        w.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    if arch == "gemma3":
        w.add_uint32(f"{arch}.attention.key_length", head_dim)
        w.add_uint32(f"{arch}.attention.value_length", head_dim)
        w.add_uint32(f"{arch}.attention.sliding_window", 8)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "smollm")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", MERGES)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    w.add_uint32("tokenizer.ggml.padding_token_id", 2)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_string("tokenizer.chat_template", TEMPLATE)

    hf: dict[str, np.ndarray] = {}
    gemma = arch == "gemma3"

    def mat(gname: str, hname: str, shape: tuple[int, int], permute_heads: int | None = None) -> None:
        value = _exact_q8(rng, shape)
        hf[hname] = value
        stored = _permute_llama_cpp(value, permute_heads) if permute_heads else value
        w.add_tensor(gname, gguf.quants.quantize(stored, Q8), raw_dtype=Q8)

    def vec(gname: str, hname: str, n: int, norm: bool = True) -> None:
        value = _dyadic(rng, n)
        hf[hname] = value
        w.add_tensor(gname, value + np.float32(1) if (gemma and norm) else value)

    q, kv = heads * head_dim, kv_heads * head_dim
    mat("token_embd.weight", "model.embed_tokens.weight", (vocab, hidden))
    if untied:
        mat("output.weight", "lm_head.weight", (vocab, hidden))
    vec("output_norm.weight", "model.norm.weight", hidden)
    for i in range(n_layers):
        b, h = f"blk.{i}.", f"model.layers.{i}."
        llama = arch == "llama"
        mat(b + "attn_q.weight", h + "self_attn.q_proj.weight", (q, hidden), heads if llama else None)
        mat(b + "attn_k.weight", h + "self_attn.k_proj.weight", (kv, hidden), kv_heads if llama else None)
        mat(b + "attn_v.weight", h + "self_attn.v_proj.weight", (kv, hidden))
        mat(b + "attn_output.weight", h + "self_attn.o_proj.weight", (hidden, q))
        mat(b + "ffn_gate.weight", h + "mlp.gate_proj.weight", (ff, hidden))
        mat(b + "ffn_up.weight", h + "mlp.up_proj.weight", (ff, hidden))
        mat(b + "ffn_down.weight", h + "mlp.down_proj.weight", (hidden, ff))
        vec(b + "attn_norm.weight", h + "input_layernorm.weight", hidden)
        if arch == "qwen2":
            vec(b + "attn_q.bias", h + "self_attn.q_proj.bias", q, norm=False)
            vec(b + "attn_k.bias", h + "self_attn.k_proj.bias", kv, norm=False)
            vec(b + "attn_v.bias", h + "self_attn.v_proj.bias", kv, norm=False)
        if gemma:
            vec(b + "ffn_norm.weight", h + "pre_feedforward_layernorm.weight", hidden)
            vec(b + "post_attention_norm.weight", h + "post_attention_layernorm.weight", hidden)
            vec(b + "post_ffw_norm.weight", h + "post_feedforward_layernorm.weight", hidden)
            vec(b + "attn_q_norm.weight", h + "self_attn.q_norm.weight", head_dim)
            vec(b + "attn_k_norm.weight", h + "self_attn.k_norm.weight", head_dim)
        else:
            vec(b + "ffn_norm.weight", h + "post_attention_layernorm.weight", hidden)
    if extra_tensor:
        w.add_tensor(extra_tensor, np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture
def tiny_llama(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / "tiny-llama.gguf"
    return path, write_tiny_gguf(path, "llama")


def _assert_same_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == np.float32, k
        assert got[k].shape == v.shape, (k, got[k].shape, v.shape)
        np.testing.assert_array_equal(got[k], v, err_msg=k)


# ------------------------------------------------------------------------------------------ fast tests


def test_library_never_imports_torch_or_transformers():
    code = (
        "import sys; import jaxpeft.loading.gguf, jaxpeft.loading.gguf_tokenizer; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("untied", [False, True])
def test_tiny_gguf_roundtrip_exact(tmp_path, arch, untied):
    """Name map, llama q/k un-permutation, gemma norm - 1, biases, tied/untied head: bit-exact."""
    path = tmp_path / f"tiny-{arch}.gguf"
    want = write_tiny_gguf(path, arch, untied=untied)
    ck = load_gguf(path, use_cache=False)
    assert isinstance(ck, GGUFCheckpoint)
    _assert_same_tensors(ck.tensors, want)
    assert ("lm_head.weight" in ck.tensors) == untied
    assert ck.hf_config["tie_word_embeddings"] is (not untied)
    for v in ck.tensors.values():
        assert v.flags.c_contiguous and v.flags.writeable


def test_tiny_config_fields(tmp_path):
    path = tmp_path / "g.gguf"
    write_tiny_gguf(path, "gemma3", n_layers=7, heads=2, kv_heads=1, head_dim=32)
    cfg = read_gguf_config(path)
    assert cfg["model_type"] == "gemma3_text"
    assert cfg["head_dim"] == 32 and cfg["num_attention_heads"] == 2 and cfg["num_key_value_heads"] == 1
    assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"]
    assert cfg["rope_parameters"]["full_attention"]["rope_theta"] == 1e6
    assert cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 1e4
    assert cfg["sliding_window"] == 8 and cfg["query_pre_attn_scalar"] == 256  # transformers' default
    assert cfg["vocab_size"] == len(_vocab()[0])
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"], cfg["unk_token_id"]) == (1, 2, 2, 0)
    write_tiny_gguf(tmp_path / "q.gguf", "qwen2")
    q = read_gguf_config(tmp_path / "q.gguf")
    assert q["model_type"] == "qwen2" and q["attention_bias"] is True and q["head_dim"] == 16
    json.dumps(cfg)  # a valid config.json


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "phi.gguf"
    write_tiny_gguf(path, "phi3")
    for fn in (read_gguf_config, load_gguf):
        with pytest.raises(CheckpointError, match=r"'phi3'.*llama, qwen2, gemma3"):
            fn(path)


def test_unknown_tensor_is_an_error(tmp_path):
    path = tmp_path / "x.gguf"
    write_tiny_gguf(path, "llama", extra_tensor="rope_freqs.weight")
    with pytest.raises(CheckpointError, match="rope_freqs.weight"):
        load_gguf(path, use_cache=False)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_gguf(tmp_path / "nope.gguf")


def _corrupt_variants(src: Path, dst_dir: Path) -> dict[str, Path]:
    data = src.read_bytes()
    variants = {
        "half": data[: len(data) // 2],
        "100 bytes": data[:100],
        "10 bytes": data[:10],
        "empty": b"",
        "bad magic": b"GGUX" + data[4:],
        "one byte short": data[:-1],
        "version 1": data[:4] + (1).to_bytes(4, "little") + data[8:],
        "huge count": data[:8] + (2**62).to_bytes(8, "little") + data[16:],
    }
    out = {}
    for i, (name, blob) in enumerate(variants.items()):
        p = dst_dir / f"v{i}" / src.name
        p.parent.mkdir()
        p.write_bytes(blob)
        out[name] = p
    return out


@pytest.mark.parametrize(
    "variant", ["half", "100 bytes", "10 bytes", "empty", "bad magic", "one byte short", "version 1", "huge count"]
)
def test_corrupt_or_truncated_gguf(tmp_path, tiny_llama, variant):
    from jaxpeft.loading.gguf_tokenizer import gguf_tokenizer

    path = _corrupt_variants(tiny_llama[0], tmp_path)[variant]
    for fn in (load_gguf, read_gguf_config, gguf_tokenizer):
        with pytest.raises(CheckpointError) as e:
            fn(path)
        msg = str(e.value)
        assert str(path) in msg and "GGUF file is truncated or corrupt" in msg and "jaxpeft download" in msg, msg


def test_truncation_message_names_the_problem(tmp_path, tiny_llama):
    variants = _corrupt_variants(tiny_llama[0], tmp_path)
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.\d+\.\w+\.weight' needs bytes .* only \d+ bytes"):
        load_gguf(variants["half"])
    with pytest.raises(CheckpointError, match="file ends at byte 100"):
        load_gguf(variants["100 bytes"])
    with pytest.raises(CheckpointError, match="bad magic"):
        load_gguf(variants["bad magic"])


QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def test_header_and_dequant_agree_with_gguf_reader(tmp_path):
    """Our bounds-checked header parser + dequantization == gguf.GGUFReader + gguf.quants.dequantize."""
    rng = np.random.default_rng(0)
    path = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("s", "héllo")
    w.add_float32("f", 1e-5)
    w.add_bool("b", True)
    w.add_int32("i", -7)
    w.add_uint64("u", 2**40)
    w.add_array("arr_s", ["a", "", "ß"])
    w.add_array("arr_i", [1, -2, 3])
    w.add_array("arr_f", [0.5, -1.25])
    for qname in QTYPES:
        qtype = gguf.GGMLQuantizationType[qname]
        x = rng.standard_normal((3, 64)).astype(np.float32)
        if qname == "F32":
            w.add_tensor(qname, x)
        elif qname == "F16":
            w.add_tensor(qname, x.astype(np.float16))
        else:
            w.add_tensor(qname, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    header = jgguf._read_header(path)
    reader = gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        ref = field.contents()
        got = header.metadata[key]
        got = got.tolist() if isinstance(got, np.ndarray) else got
        if isinstance(ref, float):
            assert got == float(np.float32(ref)), key
        else:
            assert got == ref, key
    assert header.metadata["f"] == 9.999999747378752e-06  # float(np.float32), as transformers parses it
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    assert [t.name for t in header.tensors] == QTYPES
    for info, t in zip(header.tensors, reader.tensors):
        assert info.offset == t.data_offset and info.n_bytes == t.n_bytes and info.qtype == t.tensor_type
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        got = jgguf._dequantize(raw[info.offset : info.offset + info.n_bytes], info)
        assert got.dtype == np.float32 and got.shape == (3, 64)
        np.testing.assert_array_equal(got, want, err_msg=info.name)


# ------------------------------------------------------------------------------------------ cache


def _same_checkpoint(a: GGUFCheckpoint, b: GGUFCheckpoint) -> None:
    _assert_same_tensors(a.tensors, b.tensors)
    assert a.hf_config == b.hf_config
    assert a.special_tokens == b.special_tokens
    assert a.chat_template == b.chat_template
    assert a.tokenizer.to_str() == b.tokenizer.to_str()


def _forbid_conversion(monkeypatch):
    import jaxpeft.loading.gguf_tokenizer as jtok

    def boom(*a, **k):
        raise AssertionError("cache was not used")

    monkeypatch.setattr(jgguf, "_convert_tensors", boom)
    monkeypatch.setattr(jtok, "_tokenizer_from_metadata", boom)


def test_cache_roundtrip_and_reuse(tmp_path, tiny_llama, monkeypatch):
    path, want = tiny_llama
    cache = tmp_path / "cache"
    first = load_gguf(path, cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted(jgguf._CACHE_FILES + (jgguf._KEY_FILE,))
    assert json.loads((cache / "config.json").read_text()) == first.hf_config
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]
    assert (cache / "model.safetensors").stat().st_mode & 0o044  # not left 0600 by safetensors
    _forbid_conversion(monkeypatch)
    second = load_gguf(path, cache_dir=cache)
    _same_checkpoint(first, second)
    _assert_same_tensors(second.tensors, want)


def test_cache_invalidated_by_changed_gguf(tmp_path, tiny_llama, monkeypatch):
    path, want = tiny_llama
    cache = tmp_path / "cache"
    load_gguf(path, cache_dir=cache)
    st = path.stat()
    want2 = write_tiny_gguf(path, "llama", seed=1)  # same size, different values
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime too: only the content hash differs
    assert path.stat().st_size == st.st_size
    ck = load_gguf(path, cache_dir=cache)
    _assert_same_tensors(ck.tensors, want2)
    assert not np.array_equal(want2["model.embed_tokens.weight"], want["model.embed_tokens.weight"])
    _forbid_conversion(monkeypatch)  # the rebuilt cache now serves the new file
    _assert_same_tensors(load_gguf(path, cache_dir=cache).tensors, want2)


def test_damaged_cache_is_rebuilt(tmp_path, tiny_llama):
    path, want = tiny_llama
    cache = tmp_path / "cache"
    load_gguf(path, cache_dir=cache)
    st = cache / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    _assert_same_tensors(load_gguf(path, cache_dir=cache).tensors, want)
    (cache / "tokenizer.json").unlink()
    _assert_same_tensors(load_gguf(path, cache_dir=cache).tensors, want)
    assert (cache / "tokenizer.json").exists()


def test_default_cache_dir_and_opt_out(tmp_path, tiny_llama):
    path, _ = tiny_llama
    load_gguf(path, use_cache=False)
    assert not path.with_name(path.name + ".jaxpeft").exists()
    load_gguf(path)
    assert (path.with_name(path.name + ".jaxpeft") / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------ vs transformers (tiny)


def _hf_reference(path: Path, model=None):
    """transformers' own GGUF loader on `path` (or its already loaded `model`): (config dict, float32 numpy
    state dict)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
    return cfg, {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


# Config fields that change the forward pass (or the special ids used to build inputs).
FORWARD_FIELDS = {
    "llama": ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
              "rope_parameters", "hidden_act", "attention_bias", "mlp_bias", "tie_word_embeddings",
              "bos_token_id", "eos_token_id", "pad_token_id"],
    "qwen2": ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
              "rope_parameters", "hidden_act", "use_sliding_window", "tie_word_embeddings",
              "bos_token_id", "eos_token_id", "pad_token_id"],
    "gemma3_text": ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                    "rms_norm_eps", "rope_parameters", "hidden_activation", "sliding_window", "layer_types",
                    "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping",
                    "attention_bias", "use_bidirectional_attention", "tie_word_embeddings",
                    "bos_token_id", "eos_token_id", "pad_token_id"],
}  # fmt: skip


def _assert_config_matches(mine: dict, ref: dict) -> None:
    fields = FORWARD_FIELDS[mine["model_type"]]
    diffs = {k: (mine.get(k), ref.get(k)) for k in fields if mine.get(k) != ref.get(k)}
    assert not diffs, diffs
    # Every key we emit that transformers also has must agree (architectures: transformers leaves None).
    extra = {k: (v, ref[k]) for k, v in mine.items() if k in ref and k != "architectures" and ref[k] != v}
    assert not extra, extra
    # and transformers rebuilds the same config from our dict (rope_theta + rope_parameters accepted)
    from transformers import AutoConfig

    rebuilt = AutoConfig.for_model(**mine).to_dict()
    diffs = {k: (rebuilt.get(k), ref[k]) for k in fields if rebuilt.get(k) != ref[k]}
    assert not diffs, diffs


def _assert_matches_reference(ck: GGUFCheckpoint, ref_sd: dict[str, np.ndarray], atol: float = 0.0) -> None:
    if ck.hf_config["tie_word_embeddings"]:
        assert set(ref_sd) == set(ck.tensors) | {"lm_head.weight"}
        np.testing.assert_array_equal(ref_sd["lm_head.weight"], ck.tensors["model.embed_tokens.weight"])
    else:
        assert set(ref_sd) == set(ck.tensors)
    for k, v in ck.tensors.items():
        assert v.shape == ref_sd[k].shape, k
        if atol:
            np.testing.assert_allclose(v, ref_sd[k], rtol=0, atol=atol, err_msg=k)
        else:
            np.testing.assert_array_equal(v, ref_sd[k], err_msg=k)


@pytest.mark.parametrize("arch,untied", [("llama", False), ("qwen2", True), ("gemma3", False)])
def test_tiny_matches_transformers(tmp_path, arch, untied):
    pytest.importorskip("torch")
    path = tmp_path / f"tiny-{arch}.gguf"
    write_tiny_gguf(path, arch, untied=untied)
    ck = load_gguf(path, use_cache=False)
    ref_cfg, ref_sd = _hf_reference(path)
    _assert_config_matches(ck.hf_config, ref_cfg)
    _assert_matches_reference(ck, ref_sd)


def test_cache_folder_is_a_transformers_checkpoint(tmp_path, tiny_llama):
    """The cache is a plain HF folder: transformers loads the same weights and tokenizer from it."""
    pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, want = tiny_llama
    cache = tmp_path / "cache"
    ck = load_gguf(path, cache_dir=cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype="float32")
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    _assert_matches_reference(ck, sd)
    tok = AutoTokenizer.from_pretrained(cache)
    for text in ["<|im_start|>user\nthe tin<|im_end|>", "a the in  x"]:
        assert tok(text).input_ids == ck.tokenizer.encode(text).ids


# ------------------------------------------------------------------------------------------ real files


@pytest.fixture(scope="module")
def smollm2_loaded(smollm2_gguf, tmp_path_factory):
    """(checkpoint loaded without cache into a fresh cache dir, seconds, cache dir)."""
    cache = tmp_path_factory.mktemp("smollm2-cache")
    t = time.perf_counter()
    ck = load_gguf(smollm2_gguf, cache_dir=cache)
    return ck, time.perf_counter() - t, cache


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf):
    pytest.importorskip("torch")
    return _hf_reference(Path(smollm2_gguf))


@pytest.mark.real_weights
def test_smollm2_tensors_match_transformers(smollm2_loaded, smollm2_reference):
    ck = smollm2_loaded[0]
    _assert_matches_reference(ck, smollm2_reference[1])
    assert len(ck.tensors) == 272
    assert ck.tensors["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert ck.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert ck.tensors["model.embed_tokens.weight"].shape == (49152, 576)


@pytest.mark.real_weights
def test_smollm2_config_matches_transformers(smollm2_gguf, smollm2_loaded, smollm2_reference):
    cfg = smollm2_loaded[0].hf_config
    _assert_config_matches(cfg, smollm2_reference[0])
    assert read_gguf_config(smollm2_gguf) == cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (30, 576, 3)
    assert cfg["rope_theta"] == 1e5 and cfg["tie_word_embeddings"] is True


@pytest.mark.real_weights
def test_smollm2_special_tokens(smollm2_loaded):
    ck = smollm2_loaded[0]
    assert ck.special_tokens == {
        "bos_token_id": 1, "bos_token": "<|im_start|>", "eos_token_id": 2, "eos_token": "<|im_end|>",
        "unk_token_id": 0, "unk_token": "<|endoftext|>", "pad_token_id": 2, "pad_token": "<|im_end|>",
        "add_bos_token": False, "add_eos_token": False,
    }  # fmt: skip
    assert ck.chat_template.startswith("{% for message in messages %}")


@pytest.mark.real_weights
def test_smollm2_second_load_reads_the_cache_without_converting_and_is_identical(smollm2_gguf, smollm2_loaded,
                                                                                monkeypatch):
    """The cached load never dequantizes (conversion is forbidden here) and gives identical tensors; its speed is
    a benchmark matter, not asserted in a unit test."""
    ck, _, cache = smollm2_loaded
    _forbid_conversion(monkeypatch)
    _same_checkpoint(ck, load_gguf(smollm2_gguf, cache_dir=cache))


@pytest.mark.real_weights
def test_smollm2_metadata_matches_gguf_reader(smollm2_gguf):
    header = jgguf._read_header(smollm2_gguf)
    reader = gguf.GGUFReader(smollm2_gguf)
    assert set(header.metadata) == {k for k in reader.fields if not k.startswith("GGUF.")}
    assert header.metadata["tokenizer.ggml.tokens"] == reader.fields["tokenizer.ggml.tokens"].contents()
    assert header.metadata["tokenizer.ggml.merges"] == reader.fields["tokenizer.ggml.merges"].contents()
    assert header.metadata["tokenizer.chat_template"] == reader.fields["tokenizer.chat_template"].contents()
    assert [(t.name, t.offset, t.n_bytes) for t in header.tensors] == [
        (t.name, t.data_offset, t.n_bytes) for t in reader.tensors
    ]


@pytest.mark.real_weights
def test_smollm2_truncated_real_file(smollm2_gguf, tmp_path):
    src = Path(smollm2_gguf)
    dst = tmp_path / src.name
    with open(src, "rb") as f:
        dst.write_bytes(f.read(src.stat().st_size // 2))
    with pytest.raises(CheckpointError) as e:
        load_gguf(dst)
    msg = str(e.value)
    assert "truncated or corrupt" in msg and "jaxpeft download smollm2-135m-instruct" in msg, msg
    assert not dst.with_name(dst.name + ".jaxpeft").exists()  # nothing cached for a broken file


@pytest.fixture(scope="module")
def gemma3_loaded(gemma3_gguf):
    return load_gguf(gemma3_gguf, use_cache=False)


@pytest.mark.slow
@pytest.mark.real_weights
def test_gemma3_matches_transformers(gemma3_gguf, gemma3_loaded, gemma3_transformers):
    ref_cfg, ref_sd = _hf_reference(Path(gemma3_gguf), gemma3_transformers)
    ck = gemma3_loaded
    _assert_config_matches(ck.hf_config, ref_cfg)
    _assert_matches_reference(ck, ref_sd)
    assert len(ck.tensors) == 236


@pytest.mark.real_weights
def test_gemma3_config(gemma3_gguf):
    cfg = read_gguf_config(gemma3_gguf)
    assert cfg["model_type"] == "gemma3_text"
    dims = (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["head_dim"], cfg["num_key_value_heads"])
    assert dims == (18, 640, 256, 1)
    assert [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"] == [5, 11, 17]
    assert cfg["rope_theta"] == 1e6 and cfg["rope_local_base_freq"] == 1e4 and cfg["query_pre_attn_scalar"] == 256
    assert cfg["sliding_window"] == 512 and cfg["hidden_activation"] == "gelu_pytorch_tanh"
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 1, 0)
