"""HF folder loading: sharded safetensors, bf16, hub ids resolved from a local hub cache, clear errors."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxpeft import load_pretrained
from jaxpeft.loading.errors import CheckpointError

pytestmark = pytest.mark.real_weights


@pytest.fixture()
def minilm_copy(minilm_dir, tmp_path):
    dst = tmp_path / "minilm"
    shutil.copytree(minilm_dir, dst)
    return dst


def test_sharded_index_loads_same_params_as_single_file(minilm_dir, minilm_copy):
    sd = load_file(minilm_copy / "model.safetensors")
    keys = sorted(sd)
    half = len(keys) // 2
    save_file({k: sd[k] for k in keys[:half]}, minilm_copy / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in keys[half:]}, minilm_copy / "model-00002-of-00002.safetensors")
    (minilm_copy / "model.safetensors").unlink()
    index = {"weight_map": {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(keys)}}
    (minilm_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    a = load_pretrained(minilm_dir, task="base").params
    b = load_pretrained(minilm_copy, task="base").params
    import jax

    assert jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b))


def test_bf16_safetensors_load_without_torch_and_keep_bf16_storage(minilm_copy):
    import jax.numpy as jnp
    from safetensors.flax import save_file as save_flax

    sd = load_file(minilm_copy / "model.safetensors")
    save_flax({k: jnp.asarray(v).astype(jnp.bfloat16) if v.dtype == np.float32 else jnp.asarray(v)
               for k, v in sd.items()}, str(minilm_copy / "model.safetensors"))
    pre = load_pretrained(minilm_copy, task="base", param_dtype="bfloat16")
    leaf = pre.params["embeddings"]["word_embeddings"]["embedding"]
    assert leaf.dtype == jnp.bfloat16
    f32 = load_pretrained(minilm_copy, task="base")
    assert np.array_equal(np.asarray(leaf, np.float32),
                          np.asarray(f32.params["embeddings"]["word_embeddings"]["embedding"]))


def test_truncated_safetensors_raises_clear_checkpoint_error(minilm_copy):
    f = minilm_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_pretrained(minilm_copy, task="base")


def test_missing_config_json_is_named_in_the_error(minilm_copy):
    (minilm_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_pretrained(minilm_copy, task="base")


def test_missing_and_extra_keys_in_a_real_checkpoint_are_listed(minilm_copy):
    sd = load_file(minilm_copy / "model.safetensors")
    sd.pop("encoder.layer.3.attention.self.query.weight")
    sd["encoder.layer.3.attention.self.extra.weight"] = np.zeros((2, 2), np.float32)
    save_file(sd, minilm_copy / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(minilm_copy, task="base")
    assert "bert.encoder.layer.3.attention.self.query.weight" in str(e.value)
    assert "encoder.layer.3.attention.self.extra.weight" in str(e.value)


def test_unknown_path_is_neither_folder_asset_nor_hub_id():
    with pytest.raises(CheckpointError, match="not a jaxpeft asset"):
        load_pretrained("no-such-model-anywhere")


def test_hub_id_resolves_through_huggingface_hub_from_a_local_hub_cache(minilm_dir, tmp_path, monkeypatch):
    """The online code path (huggingface_hub.snapshot_download) run against a local hub cache, offline."""
    repo = tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2"
    snap = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(minilm_dir, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snap.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    pre = load_pretrained("sentence-transformers/all-MiniLM-L6-v2", task="base")
    assert Path(pre.source) == snap
    assert pre.config.num_layers == 6


def test_hub_id_that_cannot_be_downloaded_says_so(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="Hugging Face Hub"):
        load_pretrained("nobody/nothing")
