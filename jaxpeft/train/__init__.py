"""Training and evaluation: typed run configs, tasks and data, the jitted loop, Orbax checkpoints, logging.

Top of the library: may import jaxpeft.models, jaxpeft.loading, jaxpeft.adapters and jaxpeft.generation.
`run(config)` is the whole `jaxpeft train` job as a function, for notebooks and users' scripts.
"""
from jaxpeft.train.config import ConfigError, RunConfig, load_config

__all__ = ["ConfigError", "RunConfig", "load_config", "run", "evaluate"]


def __getattr__(name):  # keep `import jaxpeft.train` light: the loop pulls in jax, optax, orbax
    if name in ("run", "evaluate"):
        import importlib

        return getattr(importlib.import_module("jaxpeft.train.runner"), name)
    raise AttributeError(f"module 'jaxpeft.train' has no attribute {name!r}")
