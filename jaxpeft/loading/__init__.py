"""Checkpoint loading: Hugging Face folders (safetensors), GGUF files, hub ids.

May import jaxpeft.models; never adapters or training. `load_pretrained` reads a checkpoint, `save_hf_folder`
writes one back as a Hugging Face folder.
"""


def __getattr__(name):  # lazy: `import jaxpeft.loading` stays light
    if name in ("load_pretrained", "save_hf_folder", "Pretrained"):
        from jaxpeft.loading import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'jaxpeft.loading' has no attribute {name!r}")


__all__ = ["load_pretrained", "save_hf_folder", "Pretrained"]
