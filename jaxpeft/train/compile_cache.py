"""JAX's persistent compilation cache, switched on from a run's config (`train.compilation_cache_dir`) or the
environment (JAX_COMPILATION_CACHE_DIR, or JAXPEFT_COMPILATION_CACHE for the CLI).

Imports jax only.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax

ENV_VAR = "JAXPEFT_COMPILATION_CACHE"


def enable_compilation_cache(path: str | os.PathLike | None = None, min_compile_secs: float = 0.5) -> str | None:
    """Cache compiled executables in `path` (default: $JAXPEFT_COMPILATION_CACHE), so a restarted or resumed run
    with the same shapes loads its steps instead of compiling them. Compilations faster than `min_compile_secs`
    are not stored. Switching to another folder in the same process resets JAX's cache. Returns the folder in
    use (None: no path given, nothing changed)."""
    path = path or os.environ.get(ENV_VAR)
    if not path:
        return None
    path = str(Path(path).expanduser())
    Path(path).mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != path:
        from jax.experimental.compilation_cache import compilation_cache

        if jax.config.jax_compilation_cache_dir:
            compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
    return path
