"""Flax (linen) backbones: decoder family (llama, qwen2, gemma3), gpt2, bert/roberta, with task heads.

Bottom layer of the library: imports jax/flax/numpy only, never loading, adapters or training.
"""
from jaxpeft.models.cache import KVCache
from jaxpeft.models.config import ModelConfig
from jaxpeft.models.outputs import ModelOutput
from jaxpeft.models.registry import TASKS, build_model

__all__ = ["KVCache", "ModelConfig", "ModelOutput", "TASKS", "build_model"]
