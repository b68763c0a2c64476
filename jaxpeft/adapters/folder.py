"""Adapter folders on disk: reading a (JSON description, safetensors weights) pair with clear errors, and writing a
folder atomically. Imports safetensors and jaxpeft.loading.errors only; both adapter formats use it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxpeft.faults import fault_point
from jaxpeft.loading.errors import CheckpointError
from jaxpeft.loading.fileperm import publish_dir, publish_file


def read_folder(path: str | os.PathLike, config_name: str, weights_name: str, what: str
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(description dict, {key: array}) of an adapter folder; CheckpointError for a missing, corrupt or truncated
    file (`what` names the format in messages, e.g. 'PEFT adapter')."""
    from safetensors.numpy import load_file

    path = Path(path)
    cfg_file, weights = path / config_name, path / weights_name
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a {what} folder ({'a file' if path.exists() else 'no such folder'}); "
                              f"pass the folder that holds {config_name} and {weights_name}")
    for f in (cfg_file, weights):
        if not f.exists():
            raise CheckpointError(f"{path}: not a {what} folder (missing {f.name}); pass the folder that holds "
                                  f"{config_name} and {weights_name}")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e}); the adapter folder is corrupt: export or copy "
                              "the adapter again") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object, got {type(raw).__name__}; the adapter folder "
                              "is corrupt: export or copy the adapter again")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error type for truncated files
        raise CheckpointError(f"{weights}: cannot read ({e}); the file is truncated or corrupt: export or copy "
                              "the adapter again") from e
    return raw, tensors


def write_atomically(out: str | os.PathLike, write: Callable[[Path], None], replaceable: tuple[str, ...] = ()) -> Path:
    """Fill a temporary sibling folder with `write(tmp)`, then rename it to `out`, so a half-written folder never
    carries the final name. An existing `out` is replaced only when it holds nothing but `replaceable` files (an
    older copy of the same folder); anything else there is an error, never deleted."""
    out = Path(out)
    if out.exists():
        other = sorted(p.name for p in out.iterdir()) if out.is_dir() else [out.name]
        other = [n for n in other if n not in replaceable]
        if other:
            raise FileExistsError(f"{out} exists and holds other files ({other[:5]}): choose an empty or new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        publish_dir(tmp)
        for f in tmp.iterdir():
            publish_file(f)
        fault_point("export.written")
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        fault_point("export.renamed")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
