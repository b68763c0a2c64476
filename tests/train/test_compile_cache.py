"""jaxpeft.train.compile_cache: the persistent compilation cache is written where the config says."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.train.compile_cache import enable_compilation_cache


@pytest.fixture
def restore_cache_config():
    from jax.experimental.compilation_cache import compilation_cache

    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    yield
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def test_no_path_and_no_environment_changes_nothing(monkeypatch, restore_cache_config):
    monkeypatch.delenv("JAXPEFT_COMPILATION_CACHE", raising=False)
    before = jax.config.jax_compilation_cache_dir
    assert enable_compilation_cache(None) is None
    assert jax.config.jax_compilation_cache_dir == before


def test_compiled_functions_are_stored_in_the_folder_and_a_second_folder_takes_over(tmp_path, restore_cache_config):
    first = enable_compilation_cache(tmp_path / "a", min_compile_secs=0)
    assert first == str(tmp_path / "a")
    jax.jit(lambda x: jnp.sin(x) * 3 + 1)(np.arange(7.0)).block_until_ready()
    assert any((tmp_path / "a").iterdir()), "nothing was written to the cache folder"
    enable_compilation_cache(tmp_path / "b", min_compile_secs=0)
    jax.jit(lambda x: jnp.cos(x) * 5 - 2)(np.arange(9.0)).block_until_ready()
    assert any((tmp_path / "b").iterdir()), "switching folders in one process must reset JAX's cache"
