"""Checkpoint loading: Hugging Face folders (safetensors), GGUF files, hub ids.

May import jaxpeft.models; never adapters or training.
"""
