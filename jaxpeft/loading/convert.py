"""HF state dict <-> jaxpeft param tree, strictly, through the architecture's name map.

Imports numpy/jax and jaxpeft.models; weights are placed into the abstract (eval_shape) tree, never into a
random init first.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.loading.errors import CheckpointError
from jaxpeft.models.config import ModelConfig
from jaxpeft.models.namemap import ARCH_NAMES, IGNORED_HF_KEYS, ParamEntry, name_map

Getter = Callable[[str], Any]
Placer = Callable[[ParamEntry, np.ndarray], Any]


def canonical_keys(cfg: ModelConfig, keys: Iterable[str]) -> dict[str, str]:
    """Map each file key to its canonical HF key (backbone keys carry the task-model prefix).

    Bare backbone files (`BertModel`, `LlamaModel` saves, hub GPT-2 files without 'transformer.') get the
    prefix added; head keys stay at the root.
    """
    names = ARCH_NAMES[cfg.arch]
    heads = tuple(h + "." for h in names.heads)
    out = {}
    for k in keys:
        if IGNORED_HF_KEYS.search(k):
            continue
        canon = k if (k.startswith(names.base_prefix) or k.startswith(heads)) else names.base_prefix + k
        out[canon] = k
    return out


def hf_to_params(cfg: ModelConfig, task: str, keys: Iterable[str], get: Getter, *,
                 allow_missing_heads: bool = True, place: Placer | None = None) -> tuple[dict[str, Any], list[str]]:
    """Build the flax params tree from HF tensors.

    keys: the checkpoint's keys; get(key) -> array-like in HF layout (PyTorch (out, in) for Linear).
    place: place(entry, host array) -> the leaf (e.g. `jax.make_array_from_callback` onto the entry's
        sharding): each tensor is prepared in host memory (layers stacked, layout and dtype applied) and goes
        straight to its devices, never through one device first. Default: jnp arrays on the default device.
    Returns (params, newly_initialised) where newly_initialised lists task-head params absent from the
    checkpoint (e.g. a classifier on a bare encoder), filled by the module's own initialiser (seed 0).
    Raises CheckpointError listing every missing, unexpected and mis-shaped key.
    """
    entries = name_map(cfg, task)
    canon = canonical_keys(cfg, keys)
    tied_alias = (cfg.tie_word_embeddings and "lm_head.weight" in canon and
                  _embed_key(cfg) not in canon and task == "causal_lm")
    if tied_alias:  # safetensors drops shared tensors: an export may hold only lm_head.weight
        canon[_embed_key(cfg)] = canon.pop("lm_head.weight")
    expected = {k for e in entries for k in e.hf_keys(cfg.num_layers)}
    head_tops = ARCH_NAMES[cfg.arch].heads
    missing, bad_shape, fresh = [], [], []
    leaves: dict[str, np.ndarray | jax.Array] = {}
    dtype = jnp.dtype(cfg.param_dtype)
    for e in entries:
        keys_e = e.hf_keys(cfg.num_layers)
        absent = [k for k in keys_e if k not in canon]
        if absent:
            if allow_missing_heads and e.flax_path.split("/", 1)[0] in head_tops:
                fresh.append(e.flax_path)
                continue
            missing += absent
            continue
        parts = []
        for k in keys_e:
            w = get(canon[k])
            want = e.shape[1:] if e.layered else e.shape
            w = jnp.asarray(w) if place is None else np.asarray(w)
            if e.transpose:
                w = w.T
            if tuple(w.shape) != tuple(want):
                bad_shape.append(f"{canon[k]}: checkpoint {tuple(w.shape)} (after layout rule) vs model {tuple(want)}")
                continue
            parts.append(w.astype(dtype))
        if len(parts) == len(keys_e):
            if place is None:
                leaves[e.flax_path] = jnp.stack(parts) if e.layered else parts[0]
            else:
                leaves[e.flax_path] = place(e, np.stack(parts) if e.layered else parts[0])
                del parts
    droppable = _droppable(cfg, task)
    unexpected = sorted(canon[k] for k in canon if k not in expected and not droppable(k))
    if missing or unexpected or bad_shape:
        raise CheckpointError(_report(cfg, missing, unexpected, bad_shape))
    params = _unflatten(leaves)
    if fresh:
        params = _init_missing(cfg, task, params, fresh)
        if place is not None:
            entries_at = entries_by_path(cfg, task)
            flat = _flatten(params)
            params = _unflatten({k: place(entries_at[k], np.asarray(v)) if k in fresh else v for k, v in flat.items()})
    return params, fresh


def params_to_hf(cfg: ModelConfig, task: str, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of hf_to_params: flax params -> {HF key: numpy array in HF layout}, layers split."""
    flat = _flatten(params)
    out = {}
    for e in name_map(cfg, task):
        if e.flax_path not in flat:
            continue
        value = np.asarray(jax.device_get(flat[e.flax_path]))
        values = list(value) if e.layered else [value]
        for k, v in zip(e.hf_keys(cfg.num_layers), values):
            out[k] = np.ascontiguousarray(v.T if e.transpose else v)
    return out


def _embed_key(cfg: ModelConfig) -> str:
    return {"gpt2": "transformer.wte.weight"}.get(cfg.arch, ARCH_NAMES[cfg.arch].base_prefix + "embed_tokens.weight")


def _droppable(cfg: ModelConfig, task: str) -> Callable[[str], bool]:
    """Keys a checkpoint may carry that this model/task does not use (as HF itself ignores them)."""
    prefix = ARCH_NAMES[cfg.arch].base_prefix
    drop = []
    if cfg.tie_word_embeddings or task != "causal_lm":
        drop.append("lm_head.")  # tied copy, or an LM head under a classification task
    if not cfg.add_pooler or task in ("token_cls", "causal_lm") or (cfg.arch == "roberta" and task != "base"):
        drop.append(prefix + "pooler.")
    if cfg.arch in ("bert", "roberta"):  # pre-training heads (MLM / NSP), dropped for fine-tuning as HF does
        drop += [prefix + "cls.", prefix + "lm_head."]
    if task != "seq_cls" and task != "token_cls":
        drop += ["score.", "classifier."]
    return lambda k: k.startswith(tuple(drop))


def _report(cfg: ModelConfig, missing: list[str], unexpected: list[str], bad_shape: list[str]) -> str:
    def block(title: str, items: list[str]) -> str:
        shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
        return f"\n  {title} ({len(items)}):\n    {shown}"

    msg = f"checkpoint does not match the {cfg.arch} model (layers={cfg.num_layers}, hidden={cfg.hidden_size}):"
    if missing:
        msg += block("missing keys", missing)
    if unexpected:
        msg += block("unexpected keys", unexpected)
    if bad_shape:
        msg += block("shape mismatches", bad_shape)
    return msg + ("\n  Fix: check that config.json belongs to these weights, that the file is complete, and "
                  "that the task head matches (task='causal_lm' | 'seq_cls' | 'token_cls' | 'base').")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        out.update(_flatten(v, path) if isinstance(v, Mapping) else {path: v})
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _init_missing(cfg: ModelConfig, task: str, params: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """Fill the head params named in `paths` as the modules' initialisers do (kernels N(0, 0.02), biases 0),
    with a fixed seed; the rest of the model is never initialised."""
    entries = entries_by_path(cfg, task)
    flat = _flatten(params)
    dtype = jnp.dtype(cfg.param_dtype)
    for n, path in enumerate(sorted(paths)):
        shape = entries[path].shape
        if path.endswith("/bias"):
            flat[path] = jnp.zeros(shape, dtype)
        else:
            flat[path] = (0.02 * jax.random.normal(jax.random.key(n), shape)).astype(dtype)
    return _unflatten(flat)


def flatten_params(tree: Mapping[str, Any]) -> dict[str, Any]:
    """{'a': {'b': x}} -> {'a/b': x} ('/'-joined flax paths, as in the name map)."""
    return _flatten(tree)


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of flatten_params."""
    return _unflatten(flat)


def entries_by_path(cfg: ModelConfig, task: str) -> dict[str, ParamEntry]:
    """The name map keyed by flax path."""
    return {e.flax_path: e for e in name_map(cfg, task)}
