"""Tiny random Hugging Face models for parity tests, built once per session.

Every model is created from a tiny config with `initializer_range=0.2`, then its norm weights and biases are
re-drawn (norm weights ~ N(1, 0.3), gemma's (1 + w) norms ~ N(0, 0.3), every bias ~ N(0, 0.2)) so that a wrong
activation, epsilon, scale or offset shows in the logits. It is saved with `save_pretrained` to a temporary
folder and reloaded from there on both sides: PyTorch via `from_pretrained`, jaxpeft via the saved config.json
and `safetensors.numpy.load_file(model.safetensors)` through `hf_to_params`.

    tiny = hf_tiny.load("llama", "causal_lm")
    ids, mask = hf_tiny.batch(tiny)          # rows: full, left-padded, right-padded, left-padded
    ref = hf_tiny.hf_forward(tiny, ids, mask)
    out = hf_tiny.jax_forward(tiny.cfg, tiny.task, tiny.params, ids, mask)
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from jaxpeft.loading.convert import hf_to_params  # noqa: E402
from jaxpeft.models import ModelConfig, build_model  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
try:
    import huggingface_hub.utils

    huggingface_hub.utils.disable_progress_bars()
except Exception:  # pragma: no cover - optional
    pass

VOCAB = 97
B, T = 4, 12

# ---------------------------------------------------------------------------------------------- configs


def llama_config(**kw) -> transformers.PretrainedConfig:
    """GQA (4 heads, 2 kv heads), untied head, eps 1e-5, non-default RoPE base."""
    args = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, tie_word_embeddings=False,
                max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                num_labels=3, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    return transformers.LlamaConfig(**{**args, **kw})


def llama_linear_config(**kw) -> transformers.PretrainedConfig:
    """llama with linear RoPE scaling (factor 2)."""
    return llama_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}, **kw)


def qwen2_config(**kw) -> transformers.PretrainedConfig:
    """q/k/v biases, tied embeddings."""
    args = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, tie_word_embeddings=True,
                max_position_embeddings=64, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                num_labels=3)
    return transformers.Qwen2Config(**{**args, **kw})


GEMMA3_WINDOW = 4


def gemma3_config(**kw) -> transformers.PretrainedConfig:
    """Sliding window (4) shorter than the sequence, mixed layer types, query_pre_attn_scalar (24) != head_dim (16),
    different RoPE bases for local (10k) and global (1M) layers, GeGLU, (1 + w) norms, QK-norm, embed scaling."""
    args = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, initializer_range=0.2, max_position_embeddings=64,
                sliding_window=GEMMA3_WINDOW, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=3,
                layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                query_pre_attn_scalar=24,
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                 "full_attention": {"rope_type": "default", "rope_theta": 1e6}})
    return transformers.Gemma3TextConfig(**{**args, **kw})


def gpt2_config(**kw) -> transformers.PretrainedConfig:
    """Tied head, learned positions, gelu_new."""
    args = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, num_labels=3)
    return transformers.GPT2Config(**{**args, **kw})


def bert_config(**kw) -> transformers.PretrainedConfig:
    args = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=64, initializer_range=0.2, num_labels=3, pad_token_id=0)
    return transformers.BertConfig(**{**args, **kw})


def roberta_config(**kw) -> transformers.PretrainedConfig:
    args = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=64, initializer_range=0.2, num_labels=3, pad_token_id=1, bos_token_id=0,
                eos_token_id=2, type_vocab_size=1)
    return transformers.RobertaConfig(**{**args, **kw})


CONFIGS = {"llama": llama_config, "llama_linear": llama_linear_config, "qwen2": qwen2_config,
           "gemma3": gemma3_config, "gpt2": gpt2_config, "bert": bert_config, "roberta": roberta_config}

_T = transformers
HF_CLASSES = {
    ("llama", "causal_lm"): _T.LlamaForCausalLM, ("llama", "seq_cls"): _T.LlamaForSequenceClassification,
    ("llama", "token_cls"): _T.LlamaForTokenClassification, ("llama", "base"): _T.LlamaModel,
    ("llama_linear", "causal_lm"): _T.LlamaForCausalLM,
    ("qwen2", "causal_lm"): _T.Qwen2ForCausalLM, ("qwen2", "seq_cls"): _T.Qwen2ForSequenceClassification,
    ("gemma3", "causal_lm"): _T.Gemma3ForCausalLM, ("gemma3", "seq_cls"): _T.Gemma3TextForSequenceClassification,
    ("gemma3", "base"): _T.Gemma3TextModel,
    ("gpt2", "causal_lm"): _T.GPT2LMHeadModel, ("gpt2", "seq_cls"): _T.GPT2ForSequenceClassification,
    ("gpt2", "token_cls"): _T.GPT2ForTokenClassification, ("gpt2", "base"): _T.GPT2Model,
    ("bert", "seq_cls"): _T.BertForSequenceClassification, ("bert", "token_cls"): _T.BertForTokenClassification,
    ("bert", "base"): _T.BertModel,
    ("roberta", "seq_cls"): _T.RobertaForSequenceClassification,
    ("roberta", "token_cls"): _T.RobertaForTokenClassification, ("roberta", "base"): _T.RobertaModel,
    # pre-training checkpoints as published on the hub (bert-base-uncased, roberta-base): HF-side only
    ("bert", "pretraining"): _T.BertForPreTraining, ("roberta", "masked_lm"): _T.RobertaForMaskedLM,
}

# ---------------------------------------------------------------------------------------------- models

_ROOT = tempfile.mkdtemp(prefix="jaxpeft_hf_tiny_")
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw norm weights (N(1, 0.3); gemma N(0, 0.3) since HF applies 1 + w) and every bias (N(0, 0.2))."""
    g = torch.Generator().manual_seed(seed)
    gemma = model.config.model_type.startswith("gemma")
    with torch.no_grad():
        norm_weights = set()
        for mname, mod in model.named_modules():
            if "norm" in type(mod).__name__.lower() and getattr(mod, "weight", None) is not None:
                norm_weights.add(f"{mname}.weight")
        for name, p in model.named_parameters():
            if name in norm_weights:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0.0 if gemma else 1.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@dataclass
class Tiny:
    """One saved-and-reloaded tiny HF model and its jaxpeft counterpart (f32, scan_layers=True)."""

    name: str
    task: str
    path: str
    hf: torch.nn.Module
    hf_config: dict[str, Any]
    state: dict[str, np.ndarray]
    cfg: ModelConfig
    params: dict[str, Any]
    fresh: list[str]

    @property
    def pad_id(self) -> int:
        return self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0

    def config(self, **overrides) -> ModelConfig:
        """ModelConfig from the saved config.json with execution overrides."""
        return ModelConfig.from_hf(self.hf_config, **overrides)

    def load(self, cfg: ModelConfig, task: str | None = None):
        """hf_to_params of the saved safetensors under `cfg`."""
        return hf_to_params(cfg, task or self.task, self.state.keys(), self.state.__getitem__)


@functools.lru_cache(maxsize=None)
def saved(name: str, task: str, seed: int = 0):
    """Build the tiny HF model `name` for `task`, randomize, save_pretrained, reload (cached).

    Returns (path, reloaded HF model, config.json dict, {key: numpy array} of model.safetensors).
    """
    torch.manual_seed(seed)
    hf_cfg = CONFIGS[name]()
    model = HF_CLASSES[(name, task)](hf_cfg).eval()
    randomize_(model, seed)
    path = os.path.join(_ROOT, f"{name}-{task}-{seed}")
    model.save_pretrained(path)
    hf = HF_CLASSES[(name, task)].from_pretrained(path, attn_implementation="eager").eval()
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    state = safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))
    return path, hf, hf_config, state


@functools.lru_cache(maxsize=None)
def load(name: str, task: str, seed: int = 0) -> Tiny:
    """`saved(name, task)` plus the jaxpeft side: ModelConfig.from_hf(config.json) and hf_to_params (cached)."""
    path, hf, hf_config, state = saved(name, task, seed)
    cfg = ModelConfig.from_hf(hf_config)
    params, fresh = hf_to_params(cfg, task, state.keys(), state.__getitem__)
    return Tiny(name, task, path, hf, hf_config, state, cfg, params, fresh)


# ---------------------------------------------------------------------------------------------- inputs


def batch(tiny: Tiny, b: int = B, t: int = T, seed: int = 0):
    """(ids, mask) int64 numpy with rows: full, left-padded (3), right-padded (4), left-padded (5), ... .

    Real ids avoid 0..2 (pad/bos/eos of the tiny configs) so HF's pad-id pooling matches the attention mask;
    pad positions hold the pad id.
    """
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, VOCAB, (b, t)).astype(np.int64)
    mask = np.ones((b, t), np.int64)
    pads = [(0, 0), (3, 0), (0, 4), (5, 0), (0, 2), (1, 0)]
    for r in range(b):
        left, right = pads[r % len(pads)]
        mask[r, :left] = 0
        mask[r, t - right:] = 0
    ids[mask == 0] = tiny.pad_id
    return ids, mask


def decoder_positions(mask: np.ndarray) -> np.ndarray:
    """jaxpeft's default decoder positions: count of earlier non-pad tokens (HF needs them passed explicitly)."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def token_types(mask: np.ndarray, seed: int = 1) -> np.ndarray:
    """Random 0/1 segment ids on real tokens (0 on pads)."""
    rs = np.random.RandomState(seed)
    return (rs.randint(0, 2, mask.shape) * mask).astype(np.int64)


def hf_forward(tiny: Tiny, ids, mask, token_type_ids=None):
    """The PyTorch forward (no grad); decoders get explicit position_ids = decoder_positions(mask)."""
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if tiny.cfg.is_decoder:
        kw["position_ids"] = torch.tensor(decoder_positions(mask))
    if token_type_ids is not None:
        kw["token_type_ids"] = torch.tensor(token_type_ids)
    with torch.no_grad():
        return tiny.hf(**kw)


def hf_main(tiny: Tiny, out) -> np.ndarray:
    """The output to compare: logits, or last_hidden_state for a bare backbone."""
    return (out.last_hidden_state if tiny.task == "base" else out.logits).numpy()


@functools.lru_cache(maxsize=None)
def _jitted(cfg: ModelConfig, task: str, deterministic: bool):
    module = build_model(cfg, task)

    def f(params, ids, mask, kw, rngs):
        return module.apply({"params": params}, ids, mask, deterministic=deterministic, rngs=rngs, **kw)

    return jax.jit(f)


def jax_forward(cfg: ModelConfig, task: str, params, ids, mask, *, deterministic: bool = True, rngs=None, **kw):
    """module.apply under jax.jit (compiled once per (cfg, task, deterministic, shapes))."""
    return _jitted(cfg, task, deterministic)(params, ids, mask, kw, rngs)


@functools.lru_cache(maxsize=None)
def reference(name: str, task: str):
    """(ids, mask, token_type_ids or None, HF output) on the standard padded batch (cached)."""
    tiny = load(name, task)
    ids, mask = batch(tiny)
    tt = token_types(mask) if tiny.cfg.arch == "bert" else None
    return ids, mask, tt, hf_forward(tiny, ids, mask, tt)


def run_both(tiny: Tiny, cfg: ModelConfig | None = None, params=None):
    """(jaxpeft ModelOutput, HF output, mask) on the standard batch; cfg/params default to the tiny's own."""
    ids, mask, tt, ref = reference(tiny.name, tiny.task)
    kw = {} if tt is None else {"token_type_ids_bt": tt}
    out = jax_forward(cfg or tiny.cfg, tiny.task, tiny.params if params is None else params, ids, mask, **kw)
    return out, ref, mask


def main_output(tiny: Tiny, out, ref, mask):
    """(actual, expected, mask-or-None) of the main output: logits, or hidden states for task='base'."""
    actual = out.hidden if tiny.task == "base" else out.logits
    expected = hf_main(tiny, ref)
    return actual, expected, (mask if expected.ndim == 3 else None)
