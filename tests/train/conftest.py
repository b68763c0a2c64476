"""Fixtures for the training-system tests: tiny real-format checkpoints, synthetic data, run configs, CLI runs.

Everything is built in temporary folders (nothing is read from ../shared or the network):

* `tiny_llama_dir`: a Hugging Face folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json)
  of a random 2-layer llama (hidden 32, 4 heads / 2 kv heads, tied embeddings, attention_dropout 0.1) with a
  character-level tokenizer (digits, letters, punctuation, space, newline; `<pad>`, `<eos>` special). Like
  SmolLM2, its pad id equals its EOS id, and it carries a small chat template.
* `tiny_bert_dir`: a random 2-layer BERT (pooler, no task head) with a WordPiece tokenizer and a
  `[CLS] $A [SEP]` / `[CLS] $A [SEP] $B [SEP]` post-processor.
* `write_jsonl`, `arith_dir`, `build_config` / `make_config`: synthetic data and run configs (dicts or YAML).
* `cli_env`: the environment for `python -m jaxpeft ...` subprocesses (session-wide XLA compilation cache).
"""
from __future__ import annotations

import copy
import json
import os
import random
import string
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------- tokenizers

CHAR_SPECIALS = ["<pad>", "<eos>", "<unk>"]
CHARS = list(string.digits + string.ascii_letters + string.punctuation + " \n")
CHAR_VOCAB = {t: i for i, t in enumerate(CHAR_SPECIALS + CHARS)}
PAD_TOKEN_ID = CHAR_VOCAB["<pad>"]  # 0: in the vocab, but config.json's pad_token_id is the EOS (as SmolLM2)
EOS_TOKEN_ID = CHAR_VOCAB["<eos>"]  # 1
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")

BERT_WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "good", "bad", "great", "awful", "movie", "film",
              "john", "smith", "mary", "lives", "in", "paris", "london", "new", "york", "is", "was", "not",
              "very", "and", "it"]
BERT_VOCAB_LIST = (["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + list(string.ascii_lowercase)
                   + ["##" + c for c in string.ascii_lowercase] + BERT_WORDS + list(".,!?"))
BERT_VOCAB = {t: i for i, t in enumerate(BERT_VOCAB_LIST)}


def char_tokenizer():
    """Character-level BPE without merges: every character is one token; `<pad>`/`<eos>` are special."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models

    tok = tokenizers.Tokenizer(models.BPE(vocab=dict(CHAR_VOCAB), merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "<eos>")])
    return tok


def bert_tokenizer():
    """Lower-casing WordPiece over a few words plus single letters (so unknown words split into sub-tokens)."""
    import tokenizers
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    tok = tokenizers.Tokenizer(models.WordPiece(vocab=dict(BERT_VOCAB), unk_token="[UNK]",
                                                max_input_chars_per_word=100))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", BERT_VOCAB["[CLS]"]), ("[SEP]", BERT_VOCAB["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    return tok


# ---------------------------------------------------------------------------------------- checkpoints

def llama_hf_config(**kw) -> dict:
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=len(CHAR_VOCAB), hidden_size=32,
               intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0,
               hidden_act="silu", attention_dropout=0.1, attention_bias=False, initializer_range=0.02,
               bos_token_id=None, eos_token_id=EOS_TOKEN_ID, pad_token_id=EOS_TOKEN_ID, torch_dtype="float32")
    cfg.update(kw)
    return cfg


def bert_hf_config(**kw) -> dict:
    cfg = dict(model_type="bert", architectures=["BertModel"], vocab_size=len(BERT_VOCAB), hidden_size=32,
               num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
               type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.1,
               attention_probs_dropout_prob=0.1, pad_token_id=BERT_VOCAB["[PAD]"], initializer_range=0.02,
               position_embedding_type="absolute", torch_dtype="float32")
    cfg.update(kw)
    return cfg


def write_checkpoint(folder: Path, hf: dict, task: str, tokenizer, tokenizer_config: dict, seed: int = 0) -> Path:
    """Random weights for `hf` saved the way Hugging Face does (config.json + model.safetensors + tokenizer)."""
    import flax
    import jax
    import numpy as np
    from safetensors.numpy import save_file

    from jaxpeft.loading.convert import params_to_hf
    from jaxpeft.models import ModelConfig, build_model

    folder.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_hf(hf)
    variables = build_model(cfg, task).init(jax.random.key(seed), np.zeros((1, 4), np.int32))
    params = flax.core.meta.unbox(variables["params"])
    tensors = {k: np.asarray(v, np.float32) for k, v in params_to_hf(cfg, task, params).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    write_checkpoint(folder, llama_hf_config(), "causal_lm", char_tokenizer(),
                     {"eos_token": "<eos>", "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE})
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-bert"
    write_checkpoint(folder, bert_hf_config(), "base", bert_tokenizer(),
                     {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]"})
    return folder


# ---------------------------------------------------------------------------------------- data

def _write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def write_jsonl():
    """write_jsonl(path, rows) -> path: one JSON object per line."""
    return _write_jsonl


def _arith_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        op, value = rng.choice([("plus", a + b), ("minus", a - b)])
        rows.append({"prompt": f"What is {a} {op} {b}?\nA:", "response": str(value)})
    return rows


@pytest.fixture(scope="session")
def arith_dir(tmp_path_factory) -> Path:
    """train (64 rows) / validation (8 rows) jsonl of synthetic arithmetic."""
    folder = tmp_path_factory.mktemp("data") / "arith"
    _write_jsonl(folder / "train.jsonl", _arith_rows(64, seed=1))
    _write_jsonl(folder / "validation.jsonl", _arith_rows(8, seed=2))
    return folder


# ---------------------------------------------------------------------------------------- configs

def _deep_update(base: dict, patch: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@pytest.fixture(scope="session")
def build_config(tiny_llama_dir, arith_dir):
    """build_config(patch=None, path=None) -> config dict, or the YAML file written at `path`.

    Defaults: the tiny llama, LoRA r=4 on q/v with dropout 0.1, the synthetic arithmetic data (max_length 32,
    one bucket), AdamW, 6 steps of batch 4, no evaluation before training and no generation during
    evaluation. `patch` is merged section by section (set train.output_dir!).
    """
    def build(patch: dict | None = None, path: str | os.PathLike | None = None):
        import yaml

        cfg = {
            "model": {"checkpoint": str(tiny_llama_dir), "task": "causal_lm"},
            "adapter": {"method": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                        "target_modules": ["q_proj", "v_proj"]},
            "data": {"path": str(arith_dir), "max_length": 32, "buckets": [32]},
            "optim": {"lr": 1e-2, "warmup_steps": 2},
            "train": {"steps": 6, "batch_size": 4, "eval_every": 100, "checkpoint_every": 100, "log_every": 1,
                      "eval_batch_size": 8, "eval_before_training": False},
            "generation": {"max_new_tokens": 3, "show_examples": 0, "eval_generate": False},
        }
        cfg = _deep_update(cfg, patch or {})
        if path is None:
            return cfg
        Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
        return Path(path)

    return build


@pytest.fixture
def make_config(build_config, tmp_path):
    """Like build_config, with train.output_dir defaulting to tmp_path/run."""
    def make(patch: dict | None = None, path: str | os.PathLike | None = None):
        return build_config(_deep_update({"train": {"output_dir": str(tmp_path / "run")}}, patch or {}), path)

    return make


# ---------------------------------------------------------------------------------------- subprocess CLI

@pytest.fixture(scope="session")
def cli_env(tmp_path_factory) -> dict:
    """Environment for `python -m jaxpeft` subprocesses: CPU, a session-wide compilation cache, a private
    `datasets` cache, and the repo on PYTHONPATH (works from a clean clone without an editable install)."""
    cache = tmp_path_factory.mktemp("xla-cache")
    hf_cache = tmp_path_factory.mktemp("hf-datasets-cache")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXPEFT_COMPILATION_CACHE=str(cache),
               HF_DATASETS_CACHE=str(hf_cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


@pytest.fixture(autouse=True, scope="session")
def _private_datasets_cache(tmp_path_factory):
    """In-process `datasets.load_dataset` calls cache into a temporary folder, not ~/.cache/huggingface."""
    try:
        import datasets.config
    except ImportError:  # pragma: no cover
        yield
        return
    old = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = Path(tmp_path_factory.mktemp("hf-datasets-cache-inproc"))
    try:
        yield
    finally:
        datasets.config.HF_DATASETS_CACHE = old
