"""The jaxpeft adapter format, for methods (or settings) Hugging Face PEFT cannot hold, and the save/load entry
points that pick the format.

Imports numpy/safetensors and sibling adapter modules. A folder holds:
- `jaxpeft_adapter.json`: {"format": "jaxpeft-adapter", "version": 1, "method", "config" (every field of the
  method's config class), "task", "arch", "base_model_name_or_path", "layers"};
- `adapter.safetensors`: every array of the adapter's state, float32 or its own dtype, keyed by its path in the
  state: 'trainable/modules/<flax module path>/<name>' (stacked on the layer axis, as in memory),
  'trainable/shared/...', 'trainable/saved/<module>/...' (modules trained in full), 'extras/modules/...' and
  'extras/shared/...' (frozen extras are saved too, so loading never recomputes them);
- `README.md`.
Prefix adapters trained with a reparameterisation MLP are saved folded (plain prefixes). Folders are written
under a temporary name and renamed into place, so a half-written folder never carries the final name.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.adapters.core import AdaptedModel, AdapterState
from jaxpeft.adapters.folder import read_folder, write_atomically
from jaxpeft.adapters.method import METHODS, method_for
from jaxpeft.loading.errors import CheckpointError

FORMAT, VERSION = "jaxpeft-adapter", 1
CONFIG_FILE, WEIGHTS_FILE = "jaxpeft_adapter.json", "adapter.safetensors"


def config_dict(cfg: Any) -> dict[str, Any]:
    """The init fields of an adapter config as JSON-ready values (pattern tuples become dicts)."""
    out = {}
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        v = getattr(cfg, f.name)
        if f.name in ("rank_pattern", "alpha_pattern"):
            v = dict(v)
        elif dataclasses.is_dataclass(v):  # a wrapped method's config (IMSM's inner)
            v = {"method": v.method, **config_dict(v)}
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def config_from_dict(method: str, fields: Mapping[str, Any]) -> Any:
    """An adapter config from `config_dict` output (CheckpointError for an unknown method or field)."""
    if not isinstance(fields, Mapping):
        raise CheckpointError(f"{method} adapter config is not a JSON object (got {type(fields).__name__})")
    if method not in METHODS:
        raise CheckpointError(f"adapter method {method!r} is not registered in this jaxpeft (have {sorted(METHODS)})")
    cls = METHODS[method].config_cls
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(f"{method} adapter config has unknown fields {unknown}: saved by a newer jaxpeft?")
    try:
        return cls(**dict(fields))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{method} adapter config is invalid: {e}") from e


def _flatten(tree: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            _flatten(v, f"{prefix}/{k}", out)
    elif tree is not None:
        out[prefix] = np.ascontiguousarray(np.asarray(jax.device_get(tree)))


def state_arrays(model: AdaptedModel, state: AdapterState, name: str, *, fold: bool = True
                 ) -> tuple[Any, dict[str, np.ndarray]]:
    """(config, {state path: array}) of adapter `name`; fold=True folds training-only machinery away."""
    spec = model.spec(name)
    cfg, tr, ex = spec.config, state["trainable"][name], state["extras"][name]
    method = method_for(cfg)
    if fold and method.kind == "prefix":
        cfg, tr, ex = method.fold(cfg, spec.sites, tr, ex)
    if spec.wrapper is not None:  # saved as the wrapper, the (folded) inner config inside it
        cfg = dataclasses.replace(spec.wrapper, inner=cfg)
    arrays: dict[str, np.ndarray] = {}
    _flatten(tr, "trainable", arrays)
    _flatten(ex, "extras", arrays)
    return cfg, arrays


def save_adapter(model: AdaptedModel, state: AdapterState, name: str, out_dir: str | os.PathLike,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter `name` in the jaxpeft format (see the module docstring); returns the folder."""
    from safetensors.numpy import save_file

    cfg, arrays = state_arrays(model, state, name)
    spec = model.spec(name)
    meta = {"format": FORMAT, "version": VERSION, "method": cfg.method, "config": config_dict(cfg),
            "task": model.task, "arch": model.model_cfg.arch if model.model_cfg else None,
            "base_model_name_or_path": base_model_name_or_path,
            "layers": {s.flax_module: list(s.layers) for s in spec.sites}}

    def write(tmp: Path) -> None:
        save_file(arrays, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(
            f"# {name}\n\nA {cfg.method} adapter in the jaxpeft format (no Hugging Face PEFT form). Load it with "
            "`jaxpeft.adapters.load_adapter(model, frozen_params, path)` or `jaxpeft eval/generate --adapter PATH`.\n")

    return write_atomically(out_dir, write, replaceable=(CONFIG_FILE, WEIGHTS_FILE, "README.md"))


def load_adapter(model: AdaptedModel, frozen: Mapping[str, Any], path: str | os.PathLike, name: str = "default",
                 rng: jax.Array | None = None) -> tuple[AdaptedModel, AdapterState]:
    """Load a jaxpeft-format adapter folder as adapter `name`: (model with it added, its state).

    Strict: every array the adapter needs must be present with its shape, and no other array may be.
    """
    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    meta, tensors = read_folder(path, CONFIG_FILE, WEIGHTS_FILE, "jaxpeft adapter")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file}: not a jaxpeft adapter description (format {FORMAT!r} expected)")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{cfg_file}: format version {meta['version']} is newer than this jaxpeft reads "
                              f"({VERSION}); upgrade jaxpeft")
    arch = model.model_cfg.arch if model.model_cfg else None
    if meta.get("arch") != arch:
        raise CheckpointError(f"{path}: the adapter was made for a {meta.get('arch')} model, this one is {arch}: "
                              f"load it on the base model it was trained on{_made_for(meta)}")
    if meta.get("task") not in (None, model.task):
        raise CheckpointError(f"{path}: the adapter was made for task {meta.get('task')!r}, this model's task is "
                              f"{model.task!r}: load the base with that task (model.task, or --task for jaxpeft "
                              "merge)")
    config = config_from_dict(str(meta.get("method", "")), meta.get("config"))
    model = model.add(name, config)
    placeholder = model.placeholder_calibration(name)  # the saved extras replace what these would give
    state = model.init(rng if rng is not None else jax.random.key(0), frozen, names=[name],
                       calibration=None if placeholder is None else {name: placeholder})
    _, template = state_arrays(model, state, name, fold=False)
    if model.has_train_hooks():  # a hook's saved values (AdaLoRA's rank mask) are there when written after training
        hooked = model.with_hook_extras(state, model.init_hook_state(state))
        _, hooked_template = state_arrays(model, hooked, name, fold=False)
        if (set(hooked_template) - set(template)) & set(tensors):
            state, template = hooked, hooked_template
    missing = sorted(set(template) - set(tensors))
    unexpected = sorted(set(tensors) - set(template))
    if missing or unexpected:
        raise CheckpointError(f"{weights}: does not fit the {config.method} adapter on this model: missing "
                              f"{missing[:8]}, unexpected {unexpected[:8]}; the adapter was made for another model "
                              f"size{_made_for(meta)}, or its weights and {CONFIG_FILE} come from different saves")
    for key, want in template.items():
        if tensors[key].shape != want.shape:
            raise CheckpointError(f"{weights}: {key} has shape {tensors[key].shape}, this model needs {want.shape}: "
                                  f"the adapter was made for a base model of other sizes{_made_for(meta)}; load it "
                                  "on its own base model")
    group = {"trainable": state["trainable"][name], "extras": state["extras"][name]}

    def fill(tree: dict[str, Any], prefix: str) -> None:
        for k, v in tree.items():
            if isinstance(v, Mapping):
                fill(v, f"{prefix}/{k}")
            else:
                tree[k] = jnp.asarray(tensors[f"{prefix}/{k}"], dtype=v.dtype)

    fill(group["trainable"], "trainable")
    fill(group["extras"], "extras")
    return model, state


def _made_for(meta: Mapping[str, Any]) -> str:
    """' (base_model_name_or_path=...)' from an adapter description, or '' when it names none."""
    base = meta.get("base_model_name_or_path")
    return f" (base_model_name_or_path={base!r})" if base else ""


def is_native(path: str | os.PathLike) -> bool:
    """True when the folder `path` holds a jaxpeft-format adapter (a jaxpeft_adapter.json)."""
    return (Path(path) / CONFIG_FILE).exists()


def save_any(model: AdaptedModel, state: AdapterState, name: str, out_dir: str | os.PathLike,
             base_model_name_or_path: str | None = None) -> tuple[Path, str]:
    """Write adapter `name` as HF PEFT when PEFT can hold it, else in the jaxpeft format: (folder, 'peft'|'jaxpeft')."""
    from jaxpeft.adapters.peft_io import export_peft, peft_unsupported_reason

    if peft_unsupported_reason(model, name) is None:
        return export_peft(model, state, name, out_dir, base_model_name_or_path), "peft"
    return save_adapter(model, state, name, out_dir, base_model_name_or_path), "jaxpeft"


def load_any(model: AdaptedModel, frozen: Mapping[str, Any], path: str | os.PathLike, name: str = "default",
             rng: jax.Array | None = None) -> tuple[AdaptedModel, AdapterState]:
    """Load an adapter folder in either format (jaxpeft when it holds jaxpeft_adapter.json, else HF PEFT)."""
    from jaxpeft.adapters.peft_io import import_peft

    if is_native(path):
        return load_adapter(model, frozen, path, name, rng)
    return import_peft(model, frozen, path, name, rng)
