"""`load_pretrained`: the one entry point from a checkpoint (HF folder, GGUF file, asset name, hub id) to
(module, params, config, tokenizer).

Imports jaxpeft.models, jaxpeft.parallel, the sibling loaders and jaxpeft.assets; never adapters or training.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax

from jaxpeft.loading.convert import hf_to_params
from jaxpeft.loading.errors import CheckpointError
from jaxpeft.loading.hf_folder import read_config, read_safetensors
from jaxpeft.loading.tokenizer import TextTokenizer, tokenizer_from_folder
from jaxpeft.errors import ModelConfigError
from jaxpeft.models.config import ENCODER_ARCHS, ModelConfig
from jaxpeft.models.registry import build_model
from jaxpeft.parallel import place_host, sharding_for


@dataclass
class Pretrained:
    """A loaded checkpoint.

    module: the flax module; params: its plain param tree (apply with {'params': params});
    config: ModelConfig; tokenizer: TextTokenizer or None; task: the head built;
    hf_config: the HF config dict (for export); source: where it came from;
    newly_initialised: head params that were absent from the checkpoint and initialised fresh.
    """

    module: nn.Module
    params: dict[str, Any]
    config: ModelConfig
    tokenizer: TextTokenizer | None
    task: str
    hf_config: dict[str, Any]
    source: str
    newly_initialised: list[str] = field(default_factory=list)


def load_pretrained(path_or_name: str | os.PathLike, *, task: str = "causal_lm", dtype: str = "float32",
                    param_dtype: str | None = None, scan_layers: bool = True, remat: str = "dots_no_batch",
                    num_labels: int | None = None, revision: str | None = None, mesh: Any = None,
                    rules: Any = None, **config_overrides: Any) -> Pretrained:
    """Load a pretrained checkpoint into a jaxpeft backbone.

    path_or_name: a HF model folder (config.json + safetensors), a .gguf file (or a folder holding one),
        a jaxpeft asset name (`jaxpeft download --list`), or a Hugging Face hub id (needs network).
    task: 'causal_lm' | 'seq_cls' | 'token_cls' | 'base'. Missing head params are initialised and listed.
    dtype / param_dtype: compute and storage dtypes ('float32', 'bfloat16'); storage defaults to compute.
    mesh / rules: a `jax.sharding.Mesh` (e.g. `jaxpeft.parallel.make_mesh`) and logical-axis rules (default
        `jaxpeft.parallel.DEFAULT_RULES`): every tensor goes straight from host memory to its shards
        (`jax.make_array_from_callback`), sharded by its logical axes; each process fills only its own devices.
    Strict: missing, unexpected or mis-shaped backbone keys raise CheckpointError listing them.
    """
    path = _resolve(path_or_name, revision)
    overrides = dict(dtype=dtype, param_dtype=param_dtype or dtype, scan_layers=scan_layers, remat=remat,
                     **config_overrides)
    if num_labels is not None:
        overrides["num_labels"] = num_labels
    gguf_file = _gguf_in(path)
    if gguf_file is not None:
        from jaxpeft.loading.gguf import load_gguf

        ckpt = load_gguf(gguf_file)
        hf_config, keys, get = ckpt.hf_config, list(ckpt.tensors), ckpt.tensors.__getitem__
        tokenizer = _gguf_text_tokenizer(ckpt)
        reader = None
    else:
        hf_config = read_config(path)
        reader = read_safetensors(path)
        keys, get = reader.keys, reader.get
        tokenizer = tokenizer_from_folder(path, hf_config)
    cfg = ModelConfig.from_hf(hf_config, **overrides)
    if cfg.arch in ENCODER_ARCHS and task == "causal_lm":
        raise ModelConfigError(f"{path}: {cfg.arch} is an encoder: use task 'seq_cls', 'token_cls' or 'base', not "
                               "'causal_lm' (model.task, or --task for jaxpeft merge); generating text needs a decoder "
                               "checkpoint (llama, qwen2, gemma3, gpt2)")
    if cfg.arch == "bert" and task in ("base", "seq_cls"):
        has_pooler = any("pooler.dense" in k for k in keys)
        if task == "base" and not has_pooler:
            cfg = cfg.replace(add_pooler=False)
    try:
        params, fresh = hf_to_params(cfg, task, keys, get, place=None if mesh is None else _placer(mesh, rules))
    finally:
        if reader is not None:
            reader.close()
    return Pretrained(build_model(cfg, task), params, cfg, tokenizer, task, hf_config, str(path), fresh)


def _placer(mesh: Any, rules: Any) -> Any:
    def place(entry: Any, host: Any) -> jax.Array:
        return place_host(host, sharding_for(entry.axes, host.shape, mesh, rules))
    return place


def _gguf_text_tokenizer(ckpt: Any) -> TextTokenizer:
    sp = ckpt.special_tokens
    eos = sp.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    return TextTokenizer(ckpt.tokenizer, bos_token_id=sp.get("bos_token_id"), eos_token_ids=eos_ids,
                         pad_token_id=sp.get("pad_token_id"), chat_template=ckpt.chat_template,
                         special_tokens={k: v for k, v in sp.items() if isinstance(v, str)})


def _gguf_in(path: Path) -> Path | None:
    if path.is_file():
        if path.suffix == ".gguf" or _magic(path):
            return path
        if path.suffix == ".safetensors":
            raise CheckpointError(f"{path}: pass the folder holding config.json and this file, not the file itself")
        raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic) and not a model folder")
    if (path / "config.json").exists():
        return None
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if len(ggufs) > 1:
        raise CheckpointError(f"{path}: several .gguf files ({', '.join(p.name for p in ggufs)}); pass one of them")
    raise CheckpointError(f"{path}: neither a Hugging Face model folder (no config.json) nor a GGUF checkpoint")


def _magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _resolve(path_or_name: str | os.PathLike, revision: str | None) -> Path:
    """Local path, jaxpeft asset name, or hub id -> a local path."""
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    name = str(path_or_name)
    from jaxpeft import assets

    if name in assets.ASSETS:
        return Path(assets.fetch(name))
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return _from_hub(name, revision)
    raise CheckpointError(f"{name!r}: no such file or folder, not a jaxpeft asset "
                          f"({', '.join(sorted(assets.ASSETS))}) and not a hub id of the form 'org/name'; check the "
                          "path (relative paths start at the working directory), or pass one of those asset names")


def _from_hub(repo_id: str, revision: str | None) -> Path:
    """Download config, tokenizer and safetensors of a hub model (online users only)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt"]))
    except Exception as e:  # network errors, missing repo, offline mode: one clear message
        raise CheckpointError(f"cannot download {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}); "
                              "check the network (HF_HUB_OFFLINE must be unset) or pass a local folder") from e


def abstract_params(pretrained: Pretrained) -> Any:
    """ShapeDtypeStructs of the params (for sharding plans and checkpoint restore targets)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), pretrained.params)


def save_hf_folder(pretrained: Pretrained, out_dir: str | os.PathLike, params: Any = None) -> Path:
    """Write a loaded checkpoint (or other params of the same model, e.g. merged ones) as a Hugging Face folder:
    model.safetensors (HF key names and layouts, float32 as loaded), config.json and tokenizer.json, readable by
    `transformers.AutoModel*.from_pretrained` and by `load_pretrained`. Returns the folder."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    from jaxpeft.loading.convert import params_to_hf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = params_to_hf(pretrained.config, pretrained.task, pretrained.params if params is None else params)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(pretrained.hf_config, indent=2))
    if pretrained.tokenizer is not None:
        pretrained.tokenizer.tokenizer.save(str(out / "tokenizer.json"))
    return out
