"""jaxpeft: parameter-efficient fine-tuning of pretrained transformers in JAX/Flax.

Top-level re-exports only; the library is layered models <- loading <- adapters <- training.
"""
__version__ = "0.1.0"

__all__ = ["__version__", "load_pretrained"]


def __getattr__(name):  # lazy, so `import jaxpeft` stays cheap (no jax import for `--help`)
    if name == "load_pretrained":
        from jaxpeft.loading.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'jaxpeft' has no attribute {name!r}")
