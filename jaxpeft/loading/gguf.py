"""Torch-free GGUF loading: metadata -> HF config dict, tensors -> HF-named float32 arrays, safetensors cache.

Imports only numpy, gguf, tokenizers, safetensors and jaxpeft.loading (errors, gguf_tokenizer); never torch.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import secrets
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as _gguf_dequantize

from jaxpeft.loading.errors import CheckpointError
from jaxpeft.loading.fileperm import publish_file

__all__ = ["GGUFCheckpoint", "load_gguf", "read_gguf_config"]

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")
"""GGUF `general.architecture` values this module converts (HF model_type: llama, qwen2, gemma3_text)."""

_CACHE_FORMAT = 1  # bump when the conversion changes, so old caches are rebuilt
_GGUF_MAGIC = b"GGUF"

# Known files -> `jaxpeft download` names, for the re-download hint in error messages.
_ASSET_NAMES = {
    "smollm2-135m-instruct.q4_1.gguf": "smollm2-135m-instruct",
    "gemma-3-270m-q4_k_m.gguf": "gemma3-270m",
}


@dataclass(frozen=True)
class GGUFCheckpoint:
    """Everything a model loader needs from one GGUF file, in Hugging Face conventions.

    Attributes:
        hf_config: transformers-style `config.json` dict (model_type 'llama' | 'qwen2' | 'gemma3_text').
        tensors: HF state-dict names -> float32 arrays in PyTorch layout (`(out, in)` for projections,
            `(vocab, hidden)` for embeddings, `(dim,)` for norms/biases). llama q/k row permutation is
            undone and gemma3 norm weights are stored as HF holds them (GGUF value minus 1).
            `lm_head.weight` is present only when the GGUF has a separate `output.weight`.
        tokenizer: `tokenizers.Tokenizer` built from the GGUF metadata (same ids as transformers').
        chat_template: Jinja chat template from `tokenizer.chat_template`, or None.
        special_tokens: `{bos,eos,pad,unk}_token_id`, `{bos,eos,pad,unk}_token` (str or None),
            `add_bos_token`, `add_eos_token`.
    """

    hf_config: dict
    tensors: dict[str, np.ndarray]
    tokenizer: tokenizers.Tokenizer
    chat_template: str | None
    special_tokens: dict


# --------------------------------------------------------------------------------------------------
# Header parsing (bounds-checked; GGUFReader takes ~9 s on a 262k-token vocabulary and fails with
# numpy reshape errors on truncated files, so the header is read here directly)
# --------------------------------------------------------------------------------------------------


class _Corrupt(Exception):
    """Internal: the file is truncated or malformed; `load_gguf` turns it into a CheckpointError."""


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # PyTorch order (reversed GGUF `ne`), e.g. (out, in)
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int


@dataclass(frozen=True)
class _GGUFHeader:
    path: Path
    file_size: int
    version: int
    metadata: dict[str, Any]
    tensors: tuple[_TensorInfo, ...]


# GGUFValueType code -> struct format (scalars) / numpy dtype (arrays)
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_DTYPE = {
    0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
    6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64,
}  # fmt: skip
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Bounds-checked little-endian reader over a buffer; any read past the end raises _Corrupt."""

    def __init__(self, buf: Any, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Corrupt(f"file ends at byte {self.size} while reading {what} at byte {self.pos}")

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self._need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        self._need(n, what)
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def strings(self, count: int, what: str) -> list[str]:
        out: list[str] = []
        buf, pos, size = self.buf, self.pos, self.size
        unpack_from = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self._need(8, what)
            (n,) = unpack_from(buf, pos)
            pos += 8
            if pos + n > size:
                self.pos = pos
                self._need(n, what)
            out.append(buf[pos : pos + n].decode("utf-8", errors="replace"))
            pos += n
        self.pos = pos
        return out

    def array(self, dtype: Any, count: int, what: str) -> np.ndarray:
        n = np.dtype(dtype).itemsize * count
        self._need(n, what)
        a = np.frombuffer(self.buf[self.pos : self.pos + n], dtype=np.dtype(dtype).newbyteorder("<"), count=count)
        self.pos += n
        return a.astype(dtype)  # native byte order, owns its memory


def _read_value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype in _SCALAR_FMT:
        v = cur.unpack(_SCALAR_FMT[vtype], key)
        # float(np.float32) exactly as transformers' GGUF parser does (1e-5 stays 9.999999747378752e-06)
        return float(v) if vtype in (6, 12) else (bool(v) if vtype == 7 else int(v))
    if vtype == _STRING:
        return cur.string(key)
    if vtype == _ARRAY:
        itype = cur.unpack("<I", key)
        count = cur.unpack("<Q", key)
        if count > cur.size:  # each element is at least one byte
            raise _Corrupt(f"array {key!r} claims {count} elements, more than the file has bytes")
        if itype == _STRING:
            return cur.strings(count, key)
        if itype in _ARRAY_DTYPE:
            return cur.array(_ARRAY_DTYPE[itype], count, key)
        if itype == _ARRAY:
            return [_read_value(cur, _ARRAY, key) for _ in range(count)]
        raise _Corrupt(f"array {key!r} has unknown element type {itype}")
    raise _Corrupt(f"metadata {key!r} has unknown value type {vtype}")


def _parse_header(path: Path) -> _GGUFHeader:
    """Parse magic, metadata and the tensor table; check every tensor's bytes lie inside the file."""
    try:
        file_size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read GGUF file ({e})") from e
    if file_size < 24:
        raise _Corrupt(f"only {file_size} bytes, a GGUF header needs at least 24")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != _GGUF_MAGIC:
            raise _Corrupt(f"bad magic {bytes(mm[:4])!r}, expected {_GGUF_MAGIC!r}")
        cur = _Cursor(mm, file_size)
        cur.pos = 4
        version = cur.unpack("<I", "version")
        if version & 0xFFFF == 0:
            raise _Corrupt("big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise _Corrupt(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors = cur.unpack("<Q", "tensor count")
        n_kv = cur.unpack("<Q", "metadata count")
        if n_tensors > file_size or n_kv > file_size:
            raise _Corrupt(f"header claims {n_tensors} tensors and {n_kv} metadata entries")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            vtype = cur.unpack("<I", f"type of {key!r}")
            metadata[key] = _read_value(cur, vtype, key)
        raw = []
        for _ in range(n_tensors):
            name = cur.string("tensor name")
            n_dims = cur.unpack("<I", f"dims of {name!r}")
            if n_dims > 8:
                raise _Corrupt(f"tensor {name!r} claims {n_dims} dimensions")
            ne = [cur.unpack("<Q", f"shape of {name!r}") for _ in range(n_dims)]
            qtype = cur.unpack("<I", f"type of {name!r}")
            rel = cur.unpack("<Q", f"offset of {name!r}")
            raw.append((name, ne, qtype, rel))
        data_start = cur.pos
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Corrupt(f"general.alignment {alignment!r} is not a power of two")
    data_start += -data_start % alignment
    tensors = []
    for name, ne, qtype_id, rel in raw:
        try:
            qtype = GGMLQuantizationType(qtype_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise _Corrupt(f"tensor {name!r} has unknown ggml type {qtype_id}") from None
        if ne and ne[0] % block:
            raise _Corrupt(f"tensor {name!r} row length {ne[0]} is not a multiple of {qtype.name} block {block}")
        n_elems = int(np.prod(ne, dtype=np.uint64)) if ne else 1
        n_bytes = n_elems // block * type_size
        start = data_start + rel
        if start + n_bytes > file_size:
            raise _Corrupt(
                f"tensor {name!r} needs bytes {start}..{start + n_bytes} but the file has only {file_size} bytes"
            )
        tensors.append(_TensorInfo(name, qtype, tuple(int(x) for x in reversed(ne)), start, n_bytes))
    return _GGUFHeader(path, file_size, version, metadata, tuple(tensors))


def _corrupt_error(path: Path, detail: str) -> CheckpointError:
    name = _ASSET_NAMES.get(path.name.lower(), "NAME")
    return CheckpointError(
        f"{path}: GGUF file is truncated or corrupt ({detail}); re-download it with "
        f"`jaxpeft download {name}` (or delete the file so it is fetched again)"
    )


def _read_header(path: str | os.PathLike) -> _GGUFHeader:
    """`_parse_header` with every parsing failure turned into a CheckpointError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: GGUF file not found")
    try:
        return _parse_header(p)
    except _Corrupt as e:
        raise _corrupt_error(p, str(e)) from None
    except CheckpointError:
        raise
    except (ValueError, struct.error, OverflowError, MemoryError) as e:  # e.g. mmap of a file cut to 0 bytes
        raise _corrupt_error(p, f"{type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


def _arch(header: _GGUFHeader) -> str:
    arch = header.metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{header.path}: GGUF architecture {arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _hf_config(header: _GGUFHeader) -> dict:
    """Build the transformers config dict from GGUF metadata (values as transformers' AutoConfig builds them)."""
    md, arch = header.metadata, _arch(header)

    def key(name: str, default: Any = KeyError) -> Any:
        full = f"{arch}.{name}"
        if full in md:
            return md[full]
        if default is KeyError:
            raise CheckpointError(f"{header.path}: GGUF metadata lacks {full!r}; the file is incomplete")
        return default

    scaling = key("rope.scaling.type", None)
    if scaling not in (None, "none"):
        raise CheckpointError(
            f"{header.path}: GGUF uses RoPE scaling {scaling!r} (factor {key('rope.scaling.factor', None)}), "
            "which jaxpeft does not implement"
        )
    names = {t.name for t in header.tensors}
    hidden = int(key("embedding_length"))
    n_heads = int(key("attention.head_count"))
    n_kv = key("attention.head_count_kv", n_heads)
    if isinstance(n_kv, np.ndarray):  # per-layer counts (hybrid models); all equal here
        if len(set(n_kv.tolist())) != 1:
            raise CheckpointError(f"{header.path}: per-layer KV head counts {n_kv.tolist()} are not supported")
        n_kv = int(n_kv[0])
    n_layers = int(key("block_count"))
    tokens = md.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size", None)
    if vocab is None:
        vocab = len(tokens) if tokens is not None else None
    if vocab is None:  # fall back on the embedding matrix rows
        emb = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
        vocab = emb.shape[0] if emb is not None else None
    cfg: dict[str, Any] = {
        "model_type": _MODEL_TYPES[arch],
        "architectures": [_ARCHITECTURES[arch]],
        "vocab_size": int(vocab) if vocab is not None else None,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
    }
    theta_default = {"llama": 10000.0, "qwen2": 10000.0, "gemma3": 1000000.0}[arch]
    rope_theta = float(key("rope.freq_base", theta_default))
    if arch == "llama":
        cfg["head_dim"] = int(key("rope.dimension_count", hidden // n_heads))
        cfg |= {
            "hidden_act": "silu",
            "rope_theta": rope_theta,
            "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
            "attention_bias": "blk.0.attn_q.bias" in names,
            "mlp_bias": False,
            "attention_dropout": 0.0,
        }
    elif arch == "qwen2":
        cfg["head_dim"] = hidden // n_heads
        cfg |= {
            "hidden_act": "silu",
            "rope_theta": rope_theta,
            "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
            "attention_bias": True,  # Qwen2 always has q/k/v biases
            "attention_dropout": 0.0,
            "use_sliding_window": False,
        }
    else:  # gemma3
        head_dim = int(key("attention.key_length", 256))
        local_theta = 10000.0  # not stored in GGUF; llama.cpp and transformers both use 10k on sliding layers
        pattern = key("attention.sliding_window_pattern", 6)
        if isinstance(pattern, np.ndarray):  # per-layer flags, True = sliding
            layer_types = ["sliding_attention" if bool(s) else "full_attention" for s in pattern.tolist()]
        else:
            layer_types = [
                "full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention" for i in range(n_layers)
            ]
        cfg["head_dim"] = head_dim
        cfg |= {
            "hidden_activation": "gelu_pytorch_tanh",
            "rope_theta": rope_theta,
            "rope_local_base_freq": local_theta,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
                "full_attention": {"rope_type": "default", "rope_theta": rope_theta},
            },
            "sliding_window": int(key("attention.sliding_window", 512)),
            "layer_types": layer_types,
            # Not in GGUF. transformers uses its config default 256, which is right for every Gemma 3 size
            # except 27B (62 layers; its config.json says 168 = hidden/heads, as llama.cpp computes it).
            "query_pre_attn_scalar": hidden // n_heads if n_layers == 62 else 256,
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_bidirectional_attention": False,
        }
    cfg["tie_word_embeddings"] = "output.weight" not in names
    for hf_key, gguf_key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
        ("unk_token_id", "unknown_token_id"),
    ):
        v = md.get(f"tokenizer.ggml.{gguf_key}")
        cfg[hf_key] = int(v) if v is not None else None
    return cfg


def read_gguf_config(path: str | os.PathLike) -> dict:
    """Return the transformers-style config dict of a GGUF file, from its metadata only (no dequantization).

    Raises CheckpointError for a missing/truncated/corrupt file or an unsupported architecture.
    """
    return _hf_config(_read_header(path))


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------

_COMMON_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
_LAYER_NAMES = {
    "llama": _COMMON_NAMES | {"ffn_norm": "post_attention_layernorm"},
    "qwen2": _COMMON_NAMES | {"ffn_norm": "post_attention_layernorm"},
    "gemma3": _COMMON_NAMES
    | {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
    },
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output": "lm_head", "output_norm": "model.norm"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _hf_name(arch: str, gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None when unknown."""
    if m := _BLOCK_RE.fullmatch(gguf_name):
        sub = _LAYER_NAMES[arch].get(m[2])
        return f"model.layers.{m[1]}.{sub}.{m[3]}" if sub else None
    stem, _, suffix = gguf_name.rpartition(".")
    return f"{_GLOBAL_NAMES[stem]}.{suffix}" if stem in _GLOBAL_NAMES and suffix in ("weight", "bias") else None


def _expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF name -> PyTorch shape of every tensor the model needs (lm_head only when untied)."""
    d, ff, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg["vocab_size"], d),
                                          "model.norm.weight": (d,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], d)
    gemma = cfg["model_type"] == "gemma3_text"
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        layer = {
            "self_attn.q_proj.weight": (q, d),
            "self_attn.k_proj.weight": (kv, d),
            "self_attn.v_proj.weight": (kv, d),
            "self_attn.o_proj.weight": (d, q),
            "mlp.gate_proj.weight": (ff, d),
            "mlp.up_proj.weight": (ff, d),
            "mlp.down_proj.weight": (d, ff),
            "input_layernorm.weight": (d,),
            "post_attention_layernorm.weight": (d,),
        }
        if cfg.get("attention_bias"):
            layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
        if gemma:
            layer |= {
                "pre_feedforward_layernorm.weight": (d,),
                "post_feedforward_layernorm.weight": (d,),
                "self_attn.q_norm.weight": (hd,),
                "self_attn.k_norm.weight": (hd,),
            }
        shapes |= {p + k: v for k, v in layer.items()}
    return shapes


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: rows grouped (head, 2, half) -> HF's (head, half, 2) order.

    w: (n_head * head_dim, in) or (n_head * head_dim,) -> same shape.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(data: np.ndarray, info: _TensorInfo) -> np.ndarray:
    """Raw bytes of one tensor -> float32 array of shape `info.shape` (PyTorch order)."""
    shape = info.shape or (1,)
    if info.qtype == GGMLQuantizationType.F32:
        return np.array(data.view(np.float32).reshape(shape), dtype=np.float32, copy=True)
    block, type_size = GGML_QUANT_SIZES[info.qtype]
    rows = data.reshape(*shape[:-1], shape[-1] // block * type_size)
    try:
        w = _gguf_dequantize(rows, info.qtype)
    except NotImplementedError as e:
        raise CheckpointError(f"tensor {info.name!r}: cannot dequantize ggml type {info.qtype.name} ({e})") from e
    return np.asarray(w, dtype=np.float32).reshape(shape)


def _convert_tensors(header: _GGUFHeader, cfg: dict) -> dict[str, np.ndarray]:
    """Dequantize every tensor, rename to HF, apply the per-architecture fixes, check names and shapes."""
    arch = header.metadata["general.architecture"]
    unknown = [t.name for t in header.tensors if _hf_name(arch, t.name) is None]
    if unknown:
        raise CheckpointError(
            f"{header.path}: GGUF tensors with no Hugging Face {cfg['model_type']} counterpart: {unknown[:8]}"
            f"{' ...' if len(unknown) > 8 else ''}"
        )
    out: dict[str, np.ndarray] = {}
    raw = np.memmap(header.path, dtype=np.uint8, mode="r")
    try:
        for info in header.tensors:
            name = _hf_name(arch, info.name)
            w = _dequantize(raw[info.offset : info.offset + info.n_bytes], info)
            if arch == "llama" and (".attn_q." in info.name or ".attn_k." in info.name):
                heads = cfg["num_attention_heads"] if ".attn_q." in info.name else cfg["num_key_value_heads"]
                w = _unpermute_rows(w, heads)
            if arch == "gemma3" and info.name.endswith("norm.weight"):
                w = w - np.float32(1.0)  # GGUF stores Gemma's (1 + w) scale; HF holds w
            if not np.isfinite(w).all():
                raise _corrupt_error(header.path, f"tensor {info.name!r} dequantizes to NaN/inf")
            out[name] = np.ascontiguousarray(w, dtype=np.float32)
    finally:
        del raw
    expected = _expected_shapes(cfg)
    missing = sorted(set(expected) - set(out))
    extra = sorted(set(out) - set(expected))
    wrong = {k: (out[k].shape, v) for k, v in expected.items() if k in out and out[k].shape != v}
    if missing or extra or wrong:
        raise CheckpointError(
            f"{header.path}: GGUF tensors do not match its own metadata ({cfg['model_type']}): "
            f"missing {missing[:5]}, unexpected {extra[:5]}, wrong shapes {dict(list(wrong.items())[:5])}"
        )
    return out


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------

_CACHE_FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json")
_KEY_FILE = "gguf_source.json"


def _source_key(path: Path) -> dict:
    """Identity of a GGUF file for cache invalidation: size, mtime and a hash of its first MiB."""
    st = path.stat()
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {"format": _CACHE_FORMAT, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_sha256": head}


def _default_cache_dir(path: Path) -> Path | None:
    parent = path.resolve().parent
    return path.resolve().with_name(path.name + ".jaxpeft") if os.access(parent, os.W_OK) else None


def _atomic_write(dest: Path, write) -> None:
    """Call `write(tmp_path)` on a temp file next to `dest`, then os.replace it into place.

    The temp file is created by `write` itself (normal umask permissions, unlike mkstemp's 0600).
    """
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(str(tmp))
        publish_file(tmp)  # safetensors creates its file 0600
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _tokenizer_config(special: dict, chat_template: str | None) -> dict:
    cfg = {k: special.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    cfg |= {
        "add_bos_token": special.get("add_bos_token", False),
        "add_eos_token": special.get("add_eos_token", False),
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "jaxpeft_special_tokens": special,
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    return cfg


def _write_cache(cache: Path, key: dict, ckpt: GGUFCheckpoint) -> None:
    from safetensors.numpy import save_file

    cache.mkdir(parents=True, exist_ok=True)
    key_path = cache / _KEY_FILE
    key_path.unlink(missing_ok=True)  # invalidate first; written again last

    def dump(obj):
        return lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")

    meta = {"format": "pt", "jaxpeft_gguf_source": json.dumps(key, sort_keys=True)}
    _atomic_write(cache / "model.safetensors", lambda tmp: save_file(ckpt.tensors, tmp, metadata=meta))
    _atomic_write(cache / "config.json", dump(ckpt.hf_config))
    _atomic_write(cache / "tokenizer.json", lambda tmp: ckpt.tokenizer.save(tmp))
    _atomic_write(cache / "tokenizer_config.json", dump(_tokenizer_config(ckpt.special_tokens, ckpt.chat_template)))
    _atomic_write(key_path, dump(key))


def _read_cache(cache: Path, key: dict) -> GGUFCheckpoint | None:
    """The cached checkpoint when every file is present and keyed to this exact GGUF, else None."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    try:
        if json.loads((cache / _KEY_FILE).read_text(encoding="utf-8")) != key:
            return None
        st_path = str(cache / "model.safetensors")
        with safe_open(st_path, framework="numpy") as f:
            meta = f.metadata() or {}
        if meta.get("jaxpeft_gguf_source") != json.dumps(key, sort_keys=True):
            return None
        tensors = load_file(st_path)
        hf_config = json.loads((cache / "config.json").read_text(encoding="utf-8"))
        tok_cfg = json.loads((cache / "tokenizer_config.json").read_text(encoding="utf-8"))
        tokenizer = tokenizers.Tokenizer.from_file(str(cache / "tokenizer.json"))
    except Exception:  # missing or damaged cache (OSError, JSON/safetensors errors...): rebuild it
        return None
    return GGUFCheckpoint(
        hf_config=hf_config,
        tensors=tensors,
        tokenizer=tokenizer,
        chat_template=tok_cfg.get("chat_template"),
        special_tokens=tok_cfg["jaxpeft_special_tokens"],
    )


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def load_gguf(
    path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, use_cache: bool = True
) -> GGUFCheckpoint:
    """Load a GGUF file as HF-named float32 tensors + HF config + `tokenizers` tokenizer, without torch.

    Args:
        path: the `.gguf` file (architectures: llama, qwen2, gemma3).
        cache_dir: folder for the dequantized result (`model.safetensors`, `config.json`, `tokenizer.json`,
            `tokenizer_config.json`, `gguf_source.json`). Default: `<path>.jaxpeft/` when the GGUF's folder
            is writable, else no cache. A cache built from a different GGUF (size, mtime or first-MiB hash
            differ) is rebuilt.
        use_cache: False neither reads nor writes a cache.

    Returns:
        GGUFCheckpoint; tensors are `(out, in)` float32, e.g. SmolLM2 `model.layers.0.self_attn.q_proj.weight`
        has shape (576, 576) and `model.embed_tokens.weight` (49152, 576).

    Raises:
        CheckpointError: missing, truncated or corrupt file; unsupported architecture or tensor type.
    """
    from jaxpeft.loading.gguf_tokenizer import _tokenizer_from_metadata

    p = Path(path)
    header = _read_header(p)
    cfg = _hf_config(header)
    cache: Path | None = None
    key: dict | None = None
    if use_cache:
        cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir(p)
        if cache is not None:
            key = _source_key(p)
            cached = _read_cache(cache, key)
            if cached is not None:
                return cached
    tensors = _convert_tensors(header, cfg)
    tokenizer, info = _tokenizer_from_metadata(header.metadata, str(p))
    chat_template = info.pop("chat_template", None)
    ckpt = GGUFCheckpoint(hf_config=cfg, tensors=tensors, tokenizer=tokenizer, chat_template=chat_template,
                          special_tokens=info)  # fmt: skip
    if cache is not None and key is not None:
        try:
            _write_cache(cache, key, ckpt)
        except OSError as e:
            warnings.warn(f"could not cache the converted GGUF in {cache}: {e}", stacklevel=2)
    return ckpt

