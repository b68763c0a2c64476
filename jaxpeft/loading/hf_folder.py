"""Read a Hugging Face model folder without torch: config.json + safetensors (single or sharded index).

Imports safetensors/json and jaxpeft.loading.errors only. bf16 files load through safetensors' flax
framework (its numpy reader rejects bf16); tensors are read lazily, one at a time.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from jaxpeft.loading.errors import CheckpointError


class SafetensorsReader:
    """Lazy {key: tensor} view over one or several .safetensors files.

    keys: every tensor name; get(key) -> jax array in the file's dtype and HF layout.
    """

    def __init__(self, files_by_key: dict[str, Path]):
        self._files_by_key = files_by_key
        self._handles: dict[Path, Any] = {}

    @property
    def keys(self) -> list[str]:
        """Every tensor name, over all the files."""
        return list(self._files_by_key)

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = _open(path)
        return self._handles[path]

    def get(self, key: str):
        """Tensor `key` as a jax array in the file's dtype and HF layout (CheckpointError when it cannot be read)."""
        path = self._files_by_key[key]
        try:
            return self._handle(path).get_tensor(key)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({e}); the file is corrupt or truncated: "
                                  "download it again") from e

    def metadata(self) -> dict[str, str]:
        """Header metadata of the first file (e.g. {'format': 'pt'})."""
        first = next(iter(set(self._files_by_key.values())), None)
        return (self._handle(first).metadata() or {}) if first else {}

    def close(self) -> None:
        """Drop the open file handles (a later `get` opens the file again)."""
        self._handles.clear()


def _open(path: Path):
    try:
        return safe_open(str(path), framework="flax")
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e}); it is truncated or corrupt: "
                              "download or save it again") from e
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file not found (listed by the checkpoint index); the checkpoint folder is "
                              "incomplete: download or save it again") from e


def read_safetensors(path: str | os.PathLike) -> SafetensorsReader:
    """Reader over `model.safetensors`, a sharded `model.safetensors.index.json`, or one given .safetensors file."""
    path = Path(path)
    if path.is_file():
        return SafetensorsReader({k: path for k in _open(path).keys()})
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed safetensors index ({e}); the checkpoint folder is corrupt: "
                                  "download or save it again") from e
        return SafetensorsReader({k: path / f for k, f in weight_map.items()})
    single = path / "model.safetensors"
    if single.exists():
        return SafetensorsReader({k: single for k in _open(single).keys()})
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if len(others) == 1:
        return read_safetensors(path / others[0])
    hint = " (found pytorch_model.bin: convert it to safetensors; jaxpeft never imports torch)" \
        if (path / "pytorch_model.bin").exists() else ""
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a HF folder as a dict."""
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        raise CheckpointError(f"{path}: no config.json; a Hugging Face model folder needs config.json next to "
                              "its safetensors weights")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg}: invalid JSON ({e}); the checkpoint folder is corrupt: download or save it "
                              "again") from e


Getter = Callable[[str], Any]
