"""Shared helpers for the adapter tests (LoRA core, targeting, merge, partition, PEFT I/O).

Import with `import adapter_fixtures as af` after putting this folder on sys.path (each test module does).
Tiny HF models come from `tests/hf_tiny.py` (random weights with initializer_range 0.2, non-unit norms and
non-zero biases, saved and reloaded); this module adds the adapter-side plumbing: inputs per architecture,
cached jitted forwards, random non-zero adapters, abstract (shape-only) frozen trees for parameter counts,
and log/warning capture for PEFT loading.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import hf_tiny
from jaxpeft.adapters import ALL, AdaptedModel, LoraConfig
from jaxpeft.loading.convert import unflatten_params
from jaxpeft.models import ModelConfig, build_model
from jaxpeft.models.namemap import name_map

NAME = "default"


def get(tree: Any, path: str) -> Any:
    """tree['a']['b'] for path 'a/b'."""
    for p in path.split("/"):
        tree = tree[p]
    return tree


# ---------------------------------------------------------------------------------------------- inputs


def inputs(tiny: hf_tiny.Tiny):
    """(ids, mask, jaxpeft kwargs, HF kwargs) on hf_tiny's standard left/right padded batch.

    Decoders: explicit positions on both sides (jaxpeft defaults to cumsum(mask) - 1, HF to arange).
    BERT: random token types on both sides.
    """
    ids, mask = hf_tiny.batch(tiny)
    jkw: dict[str, Any] = {}
    hkw: dict[str, Any] = {}
    if tiny.cfg.is_decoder:
        pos = hf_tiny.decoder_positions(mask)
        jkw["positions_bt"] = pos
        hkw["position_ids"] = pos
    if tiny.cfg.arch == "bert":
        tt = hf_tiny.token_types(mask)
        jkw["token_type_ids_bt"] = tt
        hkw["token_type_ids"] = tt
    return ids, mask, jkw, hkw


def main(out, task: str):
    """The compared output of a jaxpeft ModelOutput: logits, or hidden states for task='base'."""
    return out.hidden if task == "base" else out.logits


def cmp_mask(task: str, mask):
    """The parity mask for outputs of `task`: per position, or None for (B, C) sequence logits."""
    return None if task == "seq_cls" else mask


@functools.lru_cache(maxsize=None)
def jitted(am: AdaptedModel, active: Any = ALL):
    """jax.jit of am.apply returning the main output (AdaptedModel is hashable, so this caches per adapter set)."""

    def f(frozen, state, ids, mask, kw):
        return main(am.apply(frozen, state, ids, mask, active=active, **kw), am.task)

    return jax.jit(f)


@functools.lru_cache(maxsize=None)
def jitted_base(cfg: ModelConfig, task: str):
    """jax.jit of the plain backbone (no adapter machinery at all)."""
    module = build_model(cfg, task)

    def f(params, ids, mask, kw):
        return main(module.apply({"params": params}, ids, mask, **kw), task)

    return jax.jit(f)


def torch_main(out, task: str) -> np.ndarray:
    return (out.last_hidden_state if task == "base" else out.logits).detach().numpy()


def torch_forward(model, ids, mask, hkw, task: str) -> np.ndarray:
    import torch

    kw = {k: torch.tensor(v) for k, v in hkw.items()}
    with torch.no_grad():
        return torch_main(model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw), task)


# ---------------------------------------------------------------------------------------------- adapters


def lora_model(tiny: hf_tiny.Tiny, seed: int = 0, name: str = NAME, **kw):
    """(AdaptedModel, state) with a random NON-ZERO LoRA (init_lora_weights=False) on the tiny's params.

    A modules_to_save copy is perturbed (N(0, 0.3) added), so a head that is not carried over shows."""
    am = AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)).add(name, LoraConfig(init_lora_weights=False, **kw))
    state = am.init(jax.random.key(seed), tiny.params)
    saved = state["trainable"][name]["saved"]
    if saved:
        rng = np.random.RandomState(seed + 100)
        state["trainable"][name]["saved"] = jax.tree.map(
            lambda x: x + jnp.asarray(0.3 * rng.randn(*x.shape), x.dtype), saved)
    return am, state


# random non-zero LoRA cases shared by test_peft_io and test_merge (id -> tiny model, task, LoRA kwargs);
# use them through lora_case(name, task, seed=CASE_SEED, **kw) so the init and forwards are shared
EXPORT_CASES = {
    "llama": ("llama", "causal_lm", dict(r=4, lora_alpha=8.0, use_rslora=True,
                                         target_modules=("q_proj", "v_proj", "down_proj"),
                                         rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3.0})),
    "gpt2": ("gpt2", "causal_lm", dict(r=8, lora_alpha=16.0)),  # default target: c_attn (Conv1D)
    "bert_seq_cls": ("bert", "seq_cls", dict(r=4, lora_alpha=8.0, modules_to_save=("classifier",),
                                             layers_to_transform=(1,),
                                             target_modules=("query", "value", "output.dense"))),
    "bert_base": ("bert", "base", dict(r=4, lora_alpha=4.0, target_modules=("key", "intermediate.dense"))),
}
CASE_SEED = 1

_LORA_CACHE: dict = {}


def lora_case(name: str, task: str, seed: int = 0, **kw):
    """(tiny, AdaptedModel, state) for `lora_model(hf_tiny.load(name, task), seed, **kw)`, cached per session so
    test modules sharing a case share its init and jitted forwards. Treat the returned state as read-only."""
    key = (name, task, seed, repr(sorted(kw.items())))
    if key not in _LORA_CACHE:
        tiny = hf_tiny.load(name, task)
        _LORA_CACHE[key] = (tiny, *lora_model(tiny, seed, **kw))
    return _LORA_CACHE[key]


def abstract_params(cfg: ModelConfig, task: str, dtype=jnp.float32) -> dict[str, Any]:
    """The frozen tree as ShapeDtypeStructs from the name map (no weights allocated)."""
    return unflatten_params({e.flax_path: jax.ShapeDtypeStruct(e.shape, dtype) for e in name_map(cfg, task)})


def small_cfg(arch: str = "llama", **kw) -> ModelConfig:
    """A small jaxpeft-only ModelConfig (no HF model needed): 2 layers, hidden 32, GQA for llama."""
    base = dict(arch=arch, vocab_size=61, hidden_size=32, num_layers=2, num_heads=4,
                num_kv_heads=2 if arch == "llama" else 4, head_dim=8, intermediate_size=48,
                max_position_embeddings=64, norm_eps=1e-5,
                hidden_act={"llama": "silu", "gpt2": "gelu_tanh"}.get(arch, "gelu"),
                tie_word_embeddings=arch == "gpt2", hidden_dropout=0.0, attention_dropout=0.0, pad_token_id=0)
    return ModelConfig(**{**base, **kw})


def random_params(cfg: ModelConfig, task: str, seed: int = 0, std: float = 0.2) -> dict[str, Any]:
    """Random params of build_model(cfg, task) with a large std (0.2) and random biases / norm scales."""
    rng = np.random.RandomState(seed)
    flat = {}
    for e in name_map(cfg, task):
        leaf = e.flax_path.rsplit("/", 1)[1]
        if leaf == "scale":
            v = 1.0 + 0.3 * rng.randn(*e.shape)
        else:
            v = std * rng.randn(*e.shape)
        flat[e.flax_path] = jnp.asarray(v, jnp.dtype(cfg.param_dtype))
    return unflatten_params(flat)


# ---------------------------------------------------------------------------------------------- logs


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def capture_messages(loggers=("transformers", "peft", "")):
    """Collect every `warnings.warn` and every log record at WARNING or above from transformers/peft/root.

    Temporarily lowers the named loggers to WARNING (hf_tiny sets transformers to ERROR) so nothing is hidden.
    Yields a list of message strings, filled when the block exits."""
    msgs: list[str] = []
    handler = _ListHandler()
    saved = []
    for name in loggers:
        lg = logging.getLogger(name)
        saved.append((lg, lg.level))
        lg.addHandler(handler)
        if lg.level == logging.NOTSET or lg.level > logging.WARNING:
            lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield msgs
    finally:
        for lg, level in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
    msgs += [f"{w.category.__name__}: {w.message}" for w in caught]
    msgs += [f"log {r.name} {r.levelname}: {r.getMessage()}" for r in handler.records if r.levelno >= logging.WARNING]


def key_messages(msgs: list[str]) -> list[str]:
    """Messages about missing / unexpected / mismatched keys (deprecations and the like don't count)."""
    words = ("missing", "unexpected", "mismatch", "not used", "were not", "newly initialized", "not initialized")
    return [m for m in msgs if any(w in m.lower() for w in words)]


# ---------------------------------------------------------------------------------------------- PEFT parity


def fresh_hf(tiny: hf_tiny.Tiny):
    """A fresh copy of the transformers base, loaded from the folder the tiny model was saved to."""
    cls = hf_tiny.HF_CLASSES[(tiny.name, tiny.task)]
    return cls.from_pretrained(tiny.path, attn_implementation="eager").eval()


def load_peft_quietly(tiny: hf_tiny.Tiny, folder):
    """`PeftModel.from_pretrained` of `folder` on a fresh base; fails on any missing/unexpected-key report."""
    import peft

    with capture_messages() as msgs:
        pm = peft.PeftModel.from_pretrained(fresh_hf(tiny), str(folder)).eval()
    assert key_messages(msgs) == [], msgs
    return pm


def assert_peft_parity(tiny: hf_tiny.Tiny, am: AdaptedModel, state, pm, what: str, tol: float = 1e-4) -> None:
    """jaxpeft's output equals the PEFT model's within `tol` on the standard batch, and the adapter visibly changes
    the output (> 1e-2 from the plain HF base), so the comparison is not vacuous."""
    from parity import assert_close

    ids, mask, jkw, hkw = inputs(tiny)
    ours = np.asarray(jitted(am)(tiny.params, state, ids, mask, jkw))
    ref = torch_forward(pm, ids, mask, hkw, tiny.task)
    cmp = cmp_mask(tiny.task, mask)
    assert_close(ours, ref, cmp, max_abs=tol, what=what)
    base = torch_forward(tiny.hf, ids, mask, hkw, tiny.task)
    diff = np.abs(ref - base)[cmp.astype(bool)] if cmp is not None else np.abs(ref - base)
    assert diff.max() > 1e-2, f"{what}: the adapter does not change the output"


def smollm2_hf_config():
    """SmolLM2-135M's shapes with a 64-token vocabulary (for shape-only parameter counts)."""
    import transformers

    return transformers.LlamaConfig(vocab_size=64, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                    num_key_value_heads=3, intermediate_size=1536, tie_word_embeddings=True)


def bert_base_hf_config():
    """BERT-base's shapes with a 64-token vocabulary (for shape-only parameter counts)."""
    import transformers

    return transformers.BertConfig(vocab_size=64, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                   intermediate_size=3072, num_labels=2)
