"""Hugging Face PEFT interop, both ways: `adapter_config.json` + `adapter_model.safetensors`.

Imports numpy/safetensors, jaxpeft.loading.convert and sibling adapter modules. Stacked adapter weights are
split per layer on export and re-stacked on import; flax (n_in, r) / (r, n_out) factors are stored transposed
as PEFT's (r, n_in) / (n_out, r) for every architecture, GPT-2's Conv1D included.
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

from jaxpeft.errors import AdapterError, UnsupportedError
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import AdaptedModel, AdapterState
from jaxpeft.adapters.folder import write_atomically
from jaxpeft.adapters.method import get_path, merge_paths, method_for
from jaxpeft.loading.errors import CheckpointError
from jaxpeft.models.namemap import ARCH_NAMES

PEFT_VERSION = "0.21.2"
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS", "base": "FEATURE_EXTRACTION"}
SUPPORTED_PEFT_TYPES = ("LORA", "ADALORA", "IA3", "PREFIX_TUNING")
"""adapter_config.json `peft_type`s `import_peft` reads (LORA with use_dora or kasa_config included)."""
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
"""init_lora_weights values whose init rewrites the base weights: the saved (unconverted) adapter is a delta on that
rewritten base, meaningless on the original checkpoint."""
PREFIX = "base_model.model."
PROMPT_PREFIX = "base_model."
"""Prompt-learning methods (prefix tuning) save modules_to_save without the extra 'model.' level."""

# per method: (PEFT file key suffix, jaxpeft trainable name, layout) ; layout 'T' = transposed matrix,
# 'v' = vector as is, 'ia3' = (n_out, 1) or (1, n_in) by the feed-forward flag
_FILE_KEYS = {
    "lora": (("lora_A.weight", "lora_A", "T"), ("lora_B.weight", "lora_B", "T")),
    "dora": (("lora_A.weight", "lora_A", "T"), ("lora_B.weight", "lora_B", "T"),
             ("lora_magnitude_vector", "lora_magnitude_vector", "v")),
    "ia3": (("ia3_l", "ia3_l", "ia3"),),
    "kasa": (("lora_A.weight", "lora_A", "T"), ("lora_B.weight", "lora_B", "T"), ("lora_diag", "lora_diag", "v")),
}


def _hf_module_path(model: AdaptedModel, hf_name: str) -> str:
    """Module path inside the HF model PEFT wraps: bare backbones ('base') have no task-model prefix."""
    prefix = ARCH_NAMES[model.model_cfg.arch].base_prefix
    if model.task == "base" and hf_name.startswith(prefix):
        return hf_name[len(prefix):]
    return hf_name


def _to_file(value: np.ndarray, layout: str, options: dict[str, Any]) -> np.ndarray:
    if layout == "T":
        return value.T
    if layout == "ia3":
        return value[None, :] if options.get("feedforward") else value[:, None]
    return value


def _from_file(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "T":
        return value.T
    if layout == "ia3":
        return value.reshape(-1)
    return value


def peft_unsupported_reason(model: AdaptedModel, name: str) -> str | None:
    """Why adapter `name` has no HF PEFT form (None when `export_peft` can write it)."""
    spec = model.spec(name)
    if spec.wrapper is not None:
        return f"method {spec.wrapper.method!r} (wrapping {spec.config.method!r}) has no Hugging Face PEFT format"
    cfg = spec.config
    method = method_for(cfg)
    lora_form = hasattr(method, "lora_equivalent")
    if not method.has_peft_format or (cfg.method not in _FILE_KEYS and cfg.method not in ("prefix", "adalora")
                                      and not lora_form):
        return f"method {cfg.method!r} has no Hugging Face PEFT format"
    if lora_form and (cfg.rank_pattern or cfg.alpha_pattern):
        return (f"{cfg.method} is written as a rank-2r LoRA on the original base, which is implemented for one rank "
                "and alpha per adapter: drop rank_pattern / alpha_pattern")
    if model.model_cfg is None:
        return "the model is not a jaxpeft backbone (PEFT keys come from its Hugging Face module names)"
    if cfg.method == "adalora" and cfg.total_step is None:
        return "AdaLoRA without total_step: PEFT's AdaLoraConfig requires it (runs fill it from train.steps)"
    if cfg.method == "kasa":
        if cfg.truncation != "hf":
            return ("KaSA truncation 'official' (K = n_in - r): PEFT recomputes the truncation on load with its own "
                    "rule (K = min(n_in, n_out) - r), which would change the base")
        if model.model_cfg.arch == "gpt2":
            return "PEFT rejects KaSA on GPT-2's Conv1D layers (fan_in_fan_out)"
    if cfg.method == "prefix":
        if cfg.position_offset != "l":
            return "position_offset=0: PEFT always shifts positions by the prefix length"
        if cfg.layers_to_transform is not None:
            return "layers_to_transform: PEFT prefix tuning puts a prefix in every layer"
    return None


def _prefix_sites(model: AdaptedModel, state: AdapterState, name: str):
    """(site, folded modules tree) of a prefix adapter (the reparameterisation MLP, if any, folded in)."""
    spec = model.spec(name)
    method = method_for(spec.config)
    _, tr, _ = method.fold(spec.config, spec.hooks, state["trainable"][name], state["extras"][name])
    if len(spec.hooks) != 1 or not spec.hooks[0].layered:
        raise UnsupportedError("PEFT prefix export needs one scan-stacked attention stack")
    return spec.hooks[0], tr["modules"]


def _prefix_tensors(model: AdaptedModel, state: AdapterState, name: str) -> dict[str, np.ndarray]:
    site, modules = _prefix_sites(model, state, name)
    node = get_path(modules, site.flax_module)
    k = np.asarray(jax.device_get(node["prefix_k"]), np.float32)  # (L, l, H_kv, d_h)
    v = np.asarray(jax.device_get(node["prefix_v"]), np.float32)
    kv = np.stack([k, v], axis=1)  # (L, 2, l, H, d): slot 2i keys of layer i, 2i+1 values
    n_layers, _, l, h, d = kv.shape
    return {"prompt_embeddings": np.ascontiguousarray(kv.transpose(2, 0, 1, 3, 4).reshape(l, 2 * n_layers * h * d))}


def adapter_tensors(model: AdaptedModel, state: AdapterState, name: str) -> dict[str, np.ndarray]:
    """{PEFT key: array} for adapter `name` (selected layers only; layer masks and scales are not saved)."""
    spec = model.spec(name)
    reason = peft_unsupported_reason(model, name)
    if reason is not None:
        raise UnsupportedError(f"adapter {name!r} cannot be written in PEFT format: {reason}; save it with "
                                  "jaxpeft.adapters.native_io.save_adapter (the jaxpeft format) instead")
    if spec.config.method == "prefix":
        out = _prefix_tensors(model, state, name)
        saved = state["trainable"][name]["saved"]
        if saved:
            from jaxpeft.loading.convert import params_to_hf

            for key, value in params_to_hf(model.model_cfg, model.task, saved).items():
                out[PROMPT_PREFIX + _hf_module_path(model, key)] = value
        return out
    method = method_for(spec.config)
    if spec.config.method == "adalora":
        return _adalora_tensors(model, state, name)
    keys = _FILE_KEYS.get(spec.config.method)
    dense = state["trainable"][name]["modules"]
    if hasattr(method, "lora_equivalent"):
        dense, keys = _lora_equivalent_tree(model, state, name), _FILE_KEYS["lora"]
    if keys is None:
        raise UnsupportedError(f"PEFT export of method {spec.config.method!r} is not supported yet")
    out = {}
    for t in spec.targets:
        node = get_path(dense, t.flax_module)
        for j, layer in enumerate(t.layers if t.layered else (None,)):
            path = PREFIX + _hf_module_path(model, t.hf_name(layer))
            for suffix, leaf, layout in keys:
                value = np.asarray(jax.device_get(node[leaf]), np.float32)
                value = value[layer] if t.layered else value
                out[f"{path}.{suffix}"] = np.ascontiguousarray(_to_file(value, layout, dict(t.layer_options[j])))
    saved = state["trainable"][name]["saved"]
    if saved:
        from jaxpeft.loading.convert import params_to_hf

        for key, value in params_to_hf(model.model_cfg, model.task, saved).items():
            out[PREFIX + _hf_module_path(model, key)] = value
    return out


def _lora_equivalent_tree(model: AdaptedModel, state: AdapterState, name: str) -> dict[str, Any]:
    """{flax module path...: {'lora_A' (L, n_in, 2r), 'lora_B' (L, 2r, n_out)}} of a residual method (PiSSA, CorDA,
    SORSA): the same change to the ORIGINAL base as a plain LoRA of rank 2r with the same scale."""
    spec = model.spec(name)
    method = method_for(spec.config)
    out: dict[str, Any] = {}
    for t in spec.targets:
        tr = get_path(state["trainable"][name]["modules"], t.flax_module)
        ex = get_path(state["extras"][name]["modules"], t.flax_module)
        fn = lambda tr_, ex_: method.lora_equivalent(spec.config, tr_, ex_)  # noqa: E731
        a, b = jax.vmap(fn)(dict(tr), dict(ex)) if t.layered else fn(dict(tr), dict(ex))
        out[t.flax_module] = {"lora_A": a, "lora_B": b}
    return merge_paths({}, out)


def peft_config_dict(model: AdaptedModel, name: str, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The adapter_config.json contents PEFT 0.21.2 reads for adapter `name`."""
    spec = model.spec(name)
    cfg = spec.config
    method = method_for(cfg)
    if cfg.method == "prefix":
        site = spec.hooks[0]
        d_kv = site.num_kv_heads * site.head_dim
        return {"peft_version": PEFT_VERSION, "base_model_name_or_path": base_model_name_or_path, "revision": None,
                "task_type": TASK_TYPES[model.task], "inference_mode": True,
                "modules_to_save": list(cfg.modules_to_save) or None, "peft_type": "PREFIX_TUNING",
                "num_virtual_tokens": cfg.num_virtual_tokens, "token_dim": d_kv, "num_layers": site.num_layers,
                "num_attention_heads": site.num_kv_heads, "num_transformer_submodules": 1,
                "encoder_hidden_size": cfg.encoder_hidden_size or d_kv, "prefix_projection": False,
                "init_weights": None}
    targets = cfg.target_modules if cfg.target_modules is not None else method.default_targets(model.model_cfg.arch)
    common = {
        "peft_version": PEFT_VERSION, "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "task_type": TASK_TYPES[model.task], "inference_mode": True,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "exclude_modules": cfg.exclude_modules if isinstance(cfg.exclude_modules, (str, type(None)))
        else sorted(cfg.exclude_modules),
        "modules_to_save": list(cfg.modules_to_save) or None,
        "layers_to_transform": list(cfg.layers_to_transform) if cfg.layers_to_transform is not None else None,
        "layers_pattern": None,
        "fan_in_fan_out": model.model_cfg.arch == "gpt2",
    }
    if cfg.method == "adalora":
        return {**common, "peft_type": "ADALORA", "r": 8, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
                "init_r": cfg.init_r, "target_r": cfg.target_r, "tinit": cfg.tinit, "tfinal": cfg.tfinal,
                "deltaT": cfg.deltaT, "beta1": cfg.beta1, "beta2": cfg.beta2, "orth_reg_weight": cfg.orth_reg_weight,
                "total_step": cfg.total_step, "rank_pattern": None, "init_lora_weights": True, "bias": "none",
                "use_rslora": False, "use_dora": False}
    if hasattr(method, "lora_equivalent"):  # PiSSA, CorDA, SORSA: A B - L0 R0 as a plain rank-2r LoRA on W0
        scale = method.scale(cfg, {})
        return {**common, "peft_type": "LORA", "r": 2 * cfg.r, "lora_alpha": scale * 2 * cfg.r,
                "lora_dropout": cfg.lora_dropout, "use_rslora": False, "use_dora": False,
                "init_lora_weights": True, "bias": "none", "lora_bias": False, "rank_pattern": {},
                "alpha_pattern": {}}
    if cfg.method in ("lora", "dora", "kasa"):
        out = {**common, "peft_type": "LORA", "r": cfg.r, "lora_alpha": cfg.lora_alpha,
               "lora_dropout": cfg.lora_dropout, "use_rslora": cfg.use_rslora, "use_dora": cfg.method == "dora",
               "init_lora_weights": cfg.init_lora_weights, "bias": "none", "lora_bias": False,
               "rank_pattern": dict(cfg.rank_pattern), "alpha_pattern": dict(cfg.alpha_pattern)}
        if cfg.method == "kasa":  # PEFT recomputes the (hf-rule) truncation of the original base when it loads
            out["kasa_config"] = {"beta": cfg.beta, "gamma": cfg.gamma}
        return out
    if cfg.method == "ia3":
        ff = cfg.feedforward_modules if cfg.feedforward_modules is not None else method.default_feedforward(
            model.model_cfg.arch)
        return {**common, "peft_type": "IA3", "feedforward_modules": ff if isinstance(ff, str) else sorted(ff),
                "init_ia3_weights": cfg.init_ia3_weights}
    raise UnsupportedError(f"PEFT export of method {cfg.method!r} is not supported yet")


def export_peft(model: AdaptedModel, state: AdapterState, name: str, out_dir: str | os.PathLike,
                base_model_name_or_path: str | None = None) -> Path:
    """Write adapter `name` as a PEFT folder (adapter_config.json, adapter_model.safetensors, README.md): the three
    files are written into a temporary sibling folder that is then renamed, so a folder under `out_dir`'s name is
    always complete (an older adapter folder there is replaced; a folder holding other files is an error)."""
    from safetensors.numpy import save_file

    tensors = adapter_tensors(model, state, name)
    cfg = peft_config_dict(model, name, base_model_name_or_path)
    if cfg["peft_type"] == "ADALORA":
        cfg["rank_pattern"] = {f"{hf}.lora_E": keep.tolist() for hf, keep in _adalora_masks(model, state, name)}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(f"# {name}\n\nA {cfg['peft_type']} adapter exported by jaxpeft for "
                                       f"PEFT {PEFT_VERSION} (task {cfg['task_type']}).\n")

    return write_atomically(out_dir, write, replaceable=("adapter_model.safetensors", "adapter_config.json",
                                                         "README.md"))


def _refuse_base_changing_init(init: Any) -> None:
    """UnsupportedError for a LoRA saved with an init that rewrote the base (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA)
    and not converted: its tensors are a delta on that rewritten base, not on the checkpoint jaxpeft loads."""
    if not isinstance(init, str):
        return
    kind = next((k for k in _BASE_CHANGING_INITS if init.startswith(k)), None)
    if kind is None:
        return
    problem = (f"adapter_config.json init_lora_weights={init!r}: an unconverted {kind} adapter; its weights apply to "
               f"the base that {kind} rewrote at init, not to the original checkpoint, so loading them on the "
               "original base would compute something else")
    if kind in ("pissa", "olora", "corda"):
        fix = ("convert it in PEFT first: model.save_pretrained(out_dir, path_initial_model_for_weight_conversion="
               "<the adapter folder saved right after init, before training>) (older PEFT: convert_pissa_to_lora=...) "
               "writes a plain LoRA of rank 2r on the original base, which jaxpeft loads")
    else:
        fix = "merge it in PEFT (merge_and_unload) and use the merged model as the base"
    raise UnsupportedError(f"{problem}: {fix}")


def config_from_peft(d: Mapping[str, Any]) -> AdapterConfig:
    """A jaxpeft adapter config from an adapter_config.json dict (unsupported non-default options raise)."""
    peft_type = d.get("peft_type")
    common = dict(target_modules=d.get("target_modules"), exclude_modules=d.get("exclude_modules"),
                  layers_to_transform=d.get("layers_to_transform"), modules_to_save=tuple(d.get("modules_to_save") or ()))
    if d.get("layers_pattern"):
        raise UnsupportedError(f"layers_pattern={d['layers_pattern']!r} is not supported; layers are indexed "
                                  "by the architecture's name map")
    if peft_type == "LORA":
        _refuse_base_changing_init(d.get("init_lora_weights", True))
        for key, default in (("lora_bias", False), ("bias", "none"), ("corda_config", None),
                             ("eva_config", None), ("loftq_config", {}), ("use_qalora", False)):
            if d.get(key, default) not in (default, None, {}, False, "none"):
                raise UnsupportedError(f"adapter_config.json {key}={d[key]!r} is not supported yet: re-export the "
                                       "adapter from PEFT without it, or merge it in PEFT (merge_and_unload) and use "
                                       "the merged model as the base")
        init = d.get("init_lora_weights", True)
        init = init if init in (True, False, "gaussian") else True  # the saved weights overwrite the init anyway
        kw = dict(common, r=d.get("r", 8), lora_alpha=d.get("lora_alpha", 8), lora_dropout=d.get("lora_dropout", 0.0),
                  use_rslora=d.get("use_rslora", False), init_lora_weights=init,
                  rank_pattern=d.get("rank_pattern") or {}, alpha_pattern=d.get("alpha_pattern") or {})
        if d.get("kasa_config"):
            from jaxpeft.adapters.kasa import KasaConfig

            if d.get("use_dora"):
                raise UnsupportedError("adapter_config.json sets both kasa_config and use_dora: not a PEFT combination")
            kasa = d["kasa_config"]
            return KasaConfig(**kw, beta=kasa.get("beta", 1e-4), gamma=kasa.get("gamma", 1e-3), preset="kasa_hf")
        if d.get("use_dora"):
            from jaxpeft.adapters.dora import DoraConfig

            return DoraConfig(**kw)
        from jaxpeft.adapters.lora import LoraConfig

        return LoraConfig(**kw)
    if peft_type == "ADALORA":
        from jaxpeft.adapters.adalora import AdaloraConfig

        return AdaloraConfig(**common, init_r=d.get("init_r", 12), target_r=d.get("target_r", 8),
                             tinit=d.get("tinit", 0), tfinal=d.get("tfinal", 0), deltaT=d.get("deltaT", 1),
                             beta1=d.get("beta1", 0.85), beta2=d.get("beta2", 0.85),
                             orth_reg_weight=d.get("orth_reg_weight", 0.5), total_step=d.get("total_step"),
                             lora_alpha=d.get("lora_alpha", 8), lora_dropout=d.get("lora_dropout", 0.0))
    if peft_type == "IA3":
        from jaxpeft.adapters.ia3 import IA3Config

        return IA3Config(**common, feedforward_modules=d.get("feedforward_modules"))
    if peft_type == "PREFIX_TUNING":
        from jaxpeft.adapters.prefix import PrefixTuningConfig

        if d.get("num_transformer_submodules", 1) != 1:
            raise UnsupportedError("num_transformer_submodules != 1 (encoder-decoder prefixes) is not supported")
        # the file holds the materialised prefix even when PEFT trained it with prefix_projection
        return PrefixTuningConfig(num_virtual_tokens=int(d.get("num_virtual_tokens", 20)), prefix_projection=False,
                                  modules_to_save=tuple(d.get("modules_to_save") or ()))
    raise UnsupportedError(f"peft_type {peft_type!r} is not supported yet (supported: {', '.join(SUPPORTED_PEFT_TYPES)}); "
                           "retrain with one of these methods, or merge the adapter in PEFT (merge_and_unload) and "
                           "use the merged model as the base")


def import_peft(model: AdaptedModel, frozen: Mapping[str, Any], path: str | os.PathLike, name: str = "default",
                rng: jax.Array | None = None) -> tuple[AdaptedModel, AdapterState]:
    """Load a PEFT adapter folder as adapter `name`: returns the model with it added and its state.

    Target entries matching nothing are allowed where others match (PEFT lists both 'classifier' and 'score', and
    generic names), but stricter than PEFT's warnings otherwise: targets that select no module of this model, a
    tensor missing for an adapted module, a tensor of the wrong shape and a tensor no module uses all raise
    CheckpointError (each usually means the adapter was made for another base model).
    """
    from jaxpeft.adapters.folder import read_folder

    path = Path(path)
    weights = path / "adapter_model.safetensors"
    raw, tensors = read_folder(path, "adapter_config.json", weights.name, "PEFT adapter")
    config = config_from_peft(raw)
    made_for = _made_for(raw)
    # PEFT ignores modules_to_save entries the model lacks (it adds both 'classifier' and 'score' for SEQ_CLS)
    present = tuple(m for m in config.modules_to_save if m in frozen)
    if present != config.modules_to_save:
        config = dataclasses.replace(config, modules_to_save=present)
    try:
        model = model.add(name, config, strict=False)
    except AdapterError as e:
        arch = model.model_cfg.arch if model.model_cfg is not None else "this"
        raise CheckpointError(f"{path}: this PEFT adapter does not fit this {arch} model, it was made for another "
                              f"architecture{made_for}: load it on the base model it was trained on ({e})") from e
    state = model.init(rng if rng is not None else jax.random.key(0), frozen, names=[name])
    used: set[str] = set()
    spec = model.spec(name)
    dense = state["trainable"][name]["modules"]
    missing = []
    if config.method == "prefix":
        _import_prefix(model, raw, tensors, state, name, weights)
        used.add("prompt_embeddings")
    if config.method == "adalora":
        used |= _import_adalora(model, raw, tensors, state, name, weights, missing)
    keys = _FILE_KEYS.get(config.method, ())
    for t in spec.targets:
        node = get_path(dense, t.flax_module)
        for leaf_key in [k for _, k, _ in keys]:
            value = np.array(node[leaf_key])
            for layer in (t.layers if t.layered else (None,)):
                base = PREFIX + _hf_module_path(model, t.hf_name(layer))
                suffix, _, layout = next(k for k in keys if k[1] == leaf_key)
                key = f"{base}.{suffix}"
                if key not in tensors:
                    missing.append(key)
                    continue
                used.add(key)
                w = _from_file(tensors[key].astype(np.float32), layout)
                target_shape = value.shape[1:] if t.layered else value.shape
                if w.shape != target_shape:
                    raise CheckpointError(f"{weights}: {key} has shape {tensors[key].shape}, expected the "
                                          f"transpose of {target_shape}: the adapter was made for a base model "
                                          f"of other sizes{made_for}, or its weights and adapter_config.json (r="
                                          f"{raw.get('r')}) come from different saves; load it on its own base "
                                          "model, with the config saved with these weights")
                if t.layered:
                    value[layer] = w
                else:
                    value = w
            node[leaf_key] = jnp.asarray(value)
    saved = state["trainable"][name]["saved"]
    key_prefix = PROMPT_PREFIX if config.method == "prefix" else PREFIX
    if saved:
        from jaxpeft.loading.convert import entries_by_path, flatten_params, unflatten_params

        entries = entries_by_path(model.model_cfg, model.task)
        flat = flatten_params(saved)
        for path, old in flat.items():
            e = entries[path]
            parts = []
            for key in e.hf_keys(model.model_cfg.num_layers):
                key = key_prefix + _hf_module_path(model, key)
                if key not in tensors:
                    missing.append(key)
                    continue
                used.add(key)
                parts.append(tensors[key].T if e.transpose else tensors[key])
            if len(parts) == (model.model_cfg.num_layers if e.layered else 1):
                w = np.stack(parts) if e.layered else parts[0]
                if w.shape != old.shape:
                    raise CheckpointError(f"{weights}: modules_to_save tensor for {path} has shape {w.shape} "
                                          f"(after layout rule), the model needs {old.shape}")
                flat[path] = jnp.asarray(w, dtype=old.dtype)
        state["trainable"][name]["saved"] = unflatten_params(flat)
    if missing:
        raise CheckpointError(f"{weights}: missing tensors for adapted modules: {missing[:10]}"
                              + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
                              + f"; the file is incomplete, or the adapter was made for another model{made_for}: "
                              "load it on its own base model, or export the adapter again")
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise CheckpointError(f"{weights}: {len(unexpected)} tensors match no module this adapter's "
                              f"adapter_config.json selects on this model: {unexpected[:5]}"
                              + (" ..." if len(unexpected) > 5 else "")
                              + f"; the adapter was made for another model{made_for}, or its config and weights "
                              "come from different saves: load it on its own base model, with the config saved "
                              "with these weights")
    return model, state


def _made_for(raw: Mapping[str, Any]) -> str:
    """' (base_model_name_or_path=...)' from an adapter_config.json dict, or '' when it names none."""
    base = raw.get("base_model_name_or_path")
    return f" (base_model_name_or_path={base!r})" if base else ""


def _import_prefix(model: AdaptedModel, raw: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
                   state: AdapterState, name: str, weights: Path) -> None:
    """Fill a prefix adapter's stacked keys/values from PEFT's flat `prompt_embeddings` (l, 2 L H_kv d_h)."""
    site = model.spec(name).hooks[0]
    expect = {"num_layers": site.num_layers, "num_attention_heads": site.num_kv_heads,
              "token_dim": site.num_kv_heads * site.head_dim}
    for key, value in expect.items():
        if key in raw and raw[key] != value:
            raise CheckpointError(f"adapter_config.json {key}={raw[key]} but this model has {value}: the adapter was "
                                  f"made for a different base model{_made_for(raw)}; load it on that base model")
    if "prompt_embeddings" not in tensors:
        raise CheckpointError(f"{weights}: no 'prompt_embeddings' tensor (a PREFIX_TUNING adapter file holds it); "
                              "the file is incomplete or not the one saved with this adapter_config.json: export "
                              "the adapter again")
    emb = np.asarray(tensors["prompt_embeddings"], np.float32)
    l, n, h, d = raw.get("num_virtual_tokens", 20), site.num_layers, site.num_kv_heads, site.head_dim
    if emb.shape != (l, 2 * n * h * d):
        raise CheckpointError(f"{weights}: prompt_embeddings has shape {emb.shape}, expected {(l, 2 * n * h * d)} "
                              f"(num_virtual_tokens x 2 * layers * kv heads * head dim): the adapter was made for "
                              f"another base model{_made_for(raw)}, or its config and weights come from different "
                              "saves")
    kv = emb.reshape(l, n, 2, h, d).transpose(1, 2, 0, 3, 4)
    node = get_path(state["trainable"][name]["modules"], site.flax_module)
    node["prefix_k"], node["prefix_v"] = jnp.asarray(kv[:, 0]), jnp.asarray(kv[:, 1])


def _adalora_masks(model: AdaptedModel, state: AdapterState, name: str):
    """[(HF module path, kept-triplet mask (r_init,) bool)] per adapted module and layer: the rank mask the rank
    allocator left in the extras (all kept when it never ran)."""
    spec = model.spec(name)
    out = []
    for t in spec.targets:
        node = get_path(state["extras"][name]["modules"], t.flax_module)
        mask = np.asarray(node["rank_mask"], bool) if "rank_mask" in node else None
        for layer in (t.layers if t.layered else (None,)):
            keep = np.ones((spec.config.init_r,), bool) if mask is None else (mask[layer] if t.layered else mask)
            out.append((_hf_module_path(model, t.hf_name(layer)), keep))
    return out


def _adalora_tensors(model: AdaptedModel, state: AdapterState, name: str) -> dict[str, np.ndarray]:
    """PEFT's pruned AdaLoRA tensors: lora_A (k, n_in), lora_B (n_out, k), lora_E (k, 1), k = kept triplets."""
    spec = model.spec(name)
    out: dict[str, np.ndarray] = {}
    masks = iter(_adalora_masks(model, state, name))
    for t in spec.targets:
        node = {k: np.asarray(jax.device_get(v), np.float32)
                for k, v in get_path(state["trainable"][name]["modules"], t.flax_module).items()}
        for layer in (t.layers if t.layered else (None,)):
            hf, keep = next(masks)
            a, e, b = (node[k][layer] if t.layered else node[k] for k in ("lora_A", "lora_E", "lora_B"))
            out[f"{PREFIX}{hf}.lora_A"] = np.ascontiguousarray(a[:, keep].T)
            out[f"{PREFIX}{hf}.lora_B"] = np.ascontiguousarray(b[keep].T)
            out[f"{PREFIX}{hf}.lora_E"] = np.ascontiguousarray(e[keep][:, None])
    return out


def _import_adalora(model: AdaptedModel, raw: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
                    state: AdapterState, name: str, weights: Path, missing: list[str]) -> set[str]:
    """Fill an AdaLoRA adapter from PEFT's pruned tensors, padded back to r_init at the kept positions of the
    config's rank_pattern (pruned triplets: zeros, E = 0, rank mask False). Returns the keys used."""
    spec = model.spec(name)
    r = spec.config.init_r
    pattern = raw.get("rank_pattern") or {}
    used: set[str] = set()
    for t in spec.targets:
        node = get_path(state["trainable"][name]["modules"], t.flax_module)
        xnode = get_path(state["extras"][name]["modules"], t.flax_module)
        vals = {k: np.array(node[k]) for k in ("lora_A", "lora_E", "lora_B")}
        mask = np.ones((t.num_layers, r) if t.layered else (r,), bool)
        for layer in (t.layers if t.layered else (None,)):
            hf = _hf_module_path(model, t.hf_name(layer))
            keys = {k: f"{PREFIX}{hf}.{k}" for k in ("lora_A", "lora_E", "lora_B")}
            if any(k not in tensors for k in keys.values()):
                missing += [k for k in keys.values() if k not in tensors]
                continue
            used |= set(keys.values())
            keep = np.asarray(pattern.get(f"{hf}.lora_E", [True] * r), bool)
            k = int(keep.sum())
            a, e, b = tensors[keys["lora_A"]], tensors[keys["lora_E"]], tensors[keys["lora_B"]]
            if keep.shape != (r,) or a.shape[0] != k or e.shape != (k, 1) or b.shape[1] != k:
                raise CheckpointError(f"{weights}: AdaLoRA tensors of {hf} ({a.shape}, {e.shape}, {b.shape}) do not "
                                      f"fit its rank_pattern ({k} of init_r={r} kept)")
            full = {"lora_A": np.zeros((a.shape[1], r), np.float32), "lora_E": np.zeros((r,), np.float32),
                    "lora_B": np.zeros((r, b.shape[0]), np.float32)}
            full["lora_A"][:, keep], full["lora_E"][keep], full["lora_B"][keep] = a.T, e[:, 0], b.T
            for key, value in full.items():
                if t.layered:
                    vals[key][layer] = value
                else:
                    vals[key] = value
            if t.layered:
                mask[layer] = keep
            else:
                mask = keep
        for key, value in vals.items():
            node[key] = jnp.asarray(value)
        xnode["rank_mask"] = jnp.asarray(mask)
    return used

