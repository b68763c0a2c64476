"""The jaxpeft adapter format: save_adapter / load_adapter round trips, strict loading errors, atomic replacement,
and save_any / load_any choosing between it and Hugging Face PEFT.

Models are small jaxpeft-only backbones (2-3 layers, hidden 32) with random weights. Every saved adapter holds
random non-zero values (not its init), so a load that kept the fresh init instead of the file would show.
"""
import dataclasses
import functools
import json
import os
import shutil
import stat
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
import adapter_fixtures as af  # noqa: E402
from jaxpeft.adapters import (AdaptedModel, APTConfig, LoraConfig, PrefixTuningConfig,  # noqa: E402
                              PTuningV2Config)
from jaxpeft.adapters.native_io import (CONFIG_FILE, WEIGHTS_FILE, is_native, load_adapter, load_any,  # noqa: E402
                                        save_adapter, save_any)
from jaxpeft.adapters.peft_io import export_peft  # noqa: E402
from jaxpeft.loading.errors import CheckpointError  # noqa: E402
from jaxpeft.models import build_model  # noqa: E402

NAME = af.NAME
LLAMA = af.small_cfg("llama")
BERT = af.small_cfg("bert", num_layers=3)
GPT2 = af.small_cfg("gpt2")

CASES = {
    # id: (model config, task, adapter config)
    "prefix_projection": (LLAMA, "causal_lm", PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True,
                                                                 encoder_hidden_size=16)),
    "ptuning_v2_lengths_head": (BERT, "seq_cls", PTuningV2Config(prefix_lengths=(3, 0, 2),
                                                                 modules_to_save=("classifier",))),
    "apt_gate_bias": (LLAMA, "causal_lm", APTConfig(num_virtual_tokens=3, gate_bias=True, gate_init="normal")),
    "lora": (LLAMA, "causal_lm", LoraConfig(r=4, lora_alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"),
                                            layers_to_transform=(1,), init_lora_weights=False)),
}


@functools.lru_cache(maxsize=None)
def params(cfg, task):
    return af.random_params(cfg, task, seed=0)


def fresh(cfg, task):
    """A backbone without adapters, as a new process would build it."""
    return AdaptedModel.wrap(build_model(cfg, task))


def perturbed(state, seed):
    """`state` with every trainable leaf moved by N(0, 0.5) (extras kept: they are the method's own values)."""
    rs = np.random.RandomState(seed)
    trainable = jax.tree.map(lambda x: x + jnp.asarray(0.5 * rs.randn(*x.shape), x.dtype), state["trainable"])
    return {"trainable": trainable, "extras": state["extras"]}


@functools.lru_cache(maxsize=None)
def case(case_id):
    """(cfg, task, frozen, AdaptedModel, random non-zero state) of a CASES entry (built once; read-only)."""
    cfg, task, config = CASES[case_id]
    frozen = params(cfg, task)
    am = fresh(cfg, task).add(NAME, config)
    return cfg, task, frozen, am, perturbed(am.init(jax.random.key(1), frozen), seed=len(case_id))


def inputs(cfg):
    rs = np.random.RandomState(2)
    ids = rs.randint(3, cfg.vocab_size, (3, 8))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, 6:] = 0
    ids[mask == 0] = 0
    return ids, mask


def outputs(am, frozen, state):
    ids, mask = inputs(am.model_cfg)
    return np.asarray(af.jitted(am)(frozen, state, ids, mask, {}))


def leaves(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("case_id", list(CASES))
def test_round_trip_gives_identical_outputs(tmp_path, case_id):
    cfg, task, frozen, am, state = case(case_id)
    out = save_adapter(am, state, NAME, tmp_path / case_id, base_model_name_or_path="tiny/base")
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, "README.md"])
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["format"] == "jaxpeft-adapter" and meta["version"] == 1 and meta["arch"] == cfg.arch
    assert meta["task"] == task and meta["base_model_name_or_path"] == "tiny/base"
    assert meta["method"] == am.spec(NAME).config.method

    am2, st2 = load_adapter(fresh(cfg, task), frozen, out)
    np.testing.assert_array_equal(outputs(am2, frozen, st2), outputs(am, frozen, state))
    init_only = am2.init(jax.random.key(0), frozen)
    assert np.abs(outputs(am2, frozen, init_only) - outputs(am, frozen, state)).max() > 1e-3, \
        "the loaded values, not the fresh init, must make the outputs"
    loaded = am2.spec(NAME).config
    if case_id == "prefix_projection":  # saved folded: plain prefixes, no MLP
        assert loaded.prefix_projection is False and meta["config"]["prefix_projection"] is False
        assert loaded == dataclasses.replace(am.spec(NAME).config, prefix_projection=False)
        assert st2["trainable"][NAME]["shared"] == {}
        node = af.get(st2["trainable"][NAME]["modules"], am2.spec(NAME).hooks[0].flax_module)
        assert node["prefix_k"].shape == (LLAMA.num_layers, 4, LLAMA.num_kv_heads, LLAMA.head_dim)
    else:
        assert loaded == am.spec(NAME).config
        got, want = leaves(st2), leaves({k: {NAME: v[NAME]} for k, v in state.items()})
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    if case_id == "ptuning_v2_lengths_head":
        assert set(st2["trainable"][NAME]["saved"]) == {"classifier"}
        assert meta["config"]["prefix_lengths"] == [3, 0, 2]


# ---------------------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def saved_apt(tmp_path_factory):
    """A saved APT adapter folder (copy it before corrupting)."""
    _, _, _, am, state = case("apt_gate_bias")
    return save_adapter(am, state, NAME, tmp_path_factory.mktemp("saved") / "apt")


def corrupt_copy(src, dst, edit_meta=None, edit_tensors=None):
    shutil.copytree(src, dst)
    if edit_meta is not None:
        meta = json.loads((dst / CONFIG_FILE).read_text())
        edit_meta(meta)
        (dst / CONFIG_FILE).write_text(json.dumps(meta))
    if edit_tensors is not None:
        tensors = load_file(str(dst / WEIGHTS_FILE))
        edit_tensors(tensors)
        save_file(tensors, str(dst / WEIGHTS_FILE))
    return dst


def load_llama(path):
    return load_adapter(fresh(LLAMA, "causal_lm"), params(LLAMA, "causal_lm"), path)


GATE_W = "trainable/modules/layers/self_attn/prefix/gate_w"


def test_the_saved_folder_loads_before_corruption(saved_apt):
    assert GATE_W in load_file(str(saved_apt / WEIGHTS_FILE))
    am, _ = load_llama(saved_apt)
    assert am.spec(NAME).config == CASES["apt_gate_bias"][2]


def test_missing_files_raise_checkpoint_error(tmp_path, saved_apt):
    for missing in (WEIGHTS_FILE, CONFIG_FILE):
        d = corrupt_copy(saved_apt, tmp_path / missing)
        (d / missing).unlink()
        with pytest.raises(CheckpointError, match=f"not a jaxpeft adapter folder \\(missing {missing}\\)"):
            load_llama(d)
    with pytest.raises(CheckpointError, match="missing"):
        load_llama(tmp_path / "does_not_exist")


def test_corrupt_json_raises_checkpoint_error(tmp_path, saved_apt):
    d = corrupt_copy(saved_apt, tmp_path / "a")
    (d / CONFIG_FILE).write_text('{"format": "jaxpeft-adapter", "method": ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_llama(d)
    (d / CONFIG_FILE).write_text('["a list"]')
    with pytest.raises(CheckpointError, match=r"jaxpeft_adapter\.json: (expected a JSON object|not a jaxpeft adapter)"):
        load_llama(d)
    (d / CONFIG_FILE).write_text('{"format": "something-else", "version": 1}')
    with pytest.raises(CheckpointError, match="not a jaxpeft adapter description"):
        load_llama(d)


def test_non_object_config_raises_checkpoint_error(tmp_path, saved_apt):
    def null(m):
        m["config"] = None

    with pytest.raises(CheckpointError, match="config"):
        load_llama(corrupt_copy(saved_apt, tmp_path / "null", edit_meta=null))


def test_truncated_safetensors_raises_checkpoint_error(tmp_path, saved_apt):
    d = corrupt_copy(saved_apt, tmp_path / "a")
    data = (d / WEIGHTS_FILE).read_bytes()
    (d / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_llama(d)


def test_adapter_for_another_architecture_raises_checkpoint_error(tmp_path):
    am = fresh(GPT2, "causal_lm").add(NAME, CASES["apt_gate_bias"][2])
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(lambda p: am.init(jax.random.key(0), p), af.abstract_params(GPT2, "causal_lm")))
    out = save_adapter(am, state, NAME, tmp_path / "gpt2")
    with pytest.raises(CheckpointError, match="made for a gpt2 model, this one is llama"):
        load_llama(out)
    with pytest.raises(CheckpointError, match="made for task 'causal_lm'"):
        load_adapter(fresh(GPT2, "seq_cls"), af.abstract_params(GPT2, "seq_cls"), out)


def test_mis_shaped_tensor_raises_checkpoint_error(tmp_path, saved_apt):
    def widen(t):
        t[GATE_W] = np.concatenate([t[GATE_W], t[GATE_W][..., :1]], axis=-1)

    d = corrupt_copy(saved_apt, tmp_path / "a", edit_tensors=widen)
    with pytest.raises(CheckpointError, match=r"gate_w has shape \(2, 32, 4\), this model needs \(2, 32, 3\)"):
        load_llama(d)


def test_unexpected_or_missing_tensor_raises_checkpoint_error(tmp_path, saved_apt):
    def add(t):
        t["trainable/modules/layers/self_attn/prefix/stray"] = np.zeros((2, 3), np.float32)

    with pytest.raises(CheckpointError, match=r"unexpected \['trainable/modules/layers/self_attn/prefix/stray'\]"):
        load_llama(corrupt_copy(saved_apt, tmp_path / "extra", edit_tensors=add))
    with pytest.raises(CheckpointError, match=r"missing \['" + GATE_W + r"'\]"):
        load_llama(corrupt_copy(saved_apt, tmp_path / "missing", edit_tensors=lambda t: t.pop(GATE_W)))


def test_unknown_method_or_config_raises_checkpoint_error(tmp_path, saved_apt):
    def method(m):
        m["method"] = "no_such_method"

    with pytest.raises(CheckpointError, match="adapter method 'no_such_method' is not registered"):
        load_llama(corrupt_copy(saved_apt, tmp_path / "method", edit_meta=method))

    def field(m):
        m["config"]["gate_temperature"] = 2.0

    with pytest.raises(CheckpointError, match=r"unknown fields \['gate_temperature'\]"):
        load_llama(corrupt_copy(saved_apt, tmp_path / "field", edit_meta=field))

    def invalid(m):
        m["config"]["pool"] = "max"

    with pytest.raises(CheckpointError, match="apt adapter config is invalid: pool='max'"):
        load_llama(corrupt_copy(saved_apt, tmp_path / "invalid", edit_meta=invalid))

    def newer(m):
        m["version"] = 2

    with pytest.raises(CheckpointError, match="newer"):
        load_llama(corrupt_copy(saved_apt, tmp_path / "newer", edit_meta=newer))


# ---------------------------------------------------------------------------------------------- replacing, dispatch


def test_saving_twice_replaces_the_folder_and_leaves_no_temporaries(tmp_path):
    _, _, frozen, am_apt, st_apt = case("apt_gate_bias")
    _, _, _, am_lora, st_lora = case("lora")
    target = tmp_path / "adapter"
    save_adapter(am_apt, st_apt, NAME, target)
    save_adapter(am_lora, st_lora, NAME, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "no temporary or backup folder beside it"
    assert sorted(p.name for p in target.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, "README.md"])
    assert json.loads((target / CONFIG_FILE).read_text())["method"] == "lora"
    am2, st2 = load_adapter(fresh(LLAMA, "causal_lm"), frozen, target)
    np.testing.assert_array_equal(outputs(am2, frozen, st2), outputs(am_lora, frozen, st_lora))


def test_saving_over_a_folder_with_other_files_refuses_and_deletes_nothing(tmp_path):
    _, _, frozen, am_apt, st_apt = case("apt_gate_bias")
    _, _, _, am_lora, st_lora = case("lora")
    target = tmp_path / "adapter"
    save_adapter(am_apt, st_apt, NAME, target)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save_adapter(am_lora, st_lora, NAME, target)
    assert (target / "notes.txt").read_text() == "mine"
    assert json.loads((target / CONFIG_FILE).read_text())["method"] == "apt", "the older adapter is intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "no temporary folder left beside it"


def test_saved_folders_are_as_readable_as_normally_created_files(tmp_path):
    """Saved adapters get the modes of a folder / file created normally under the process umask: not the
    owner-only modes of mkdtemp (0700) or of safetensors' save_file (0600), which hide them from other users."""
    _, _, _, am, state = case("lora")
    normal_dir = tmp_path / "normal"
    normal_dir.mkdir()
    normal_file = normal_dir / "file"
    normal_file.write_text("x")
    want_dir, want_file = stat.S_IMODE(normal_dir.stat().st_mode), stat.S_IMODE(normal_file.stat().st_mode)
    native = save_adapter(am, state, NAME, tmp_path / "native")
    peft, fmt = save_any(am, state, NAME, tmp_path / "peft")
    assert fmt == "peft"
    wrong = []
    for path, want in ((native, want_dir), (native / WEIGHTS_FILE, want_file), (native / CONFIG_FILE, want_file),
                       (peft, want_dir), (peft / "adapter_model.safetensors", want_file),
                       (peft / "adapter_config.json", want_file)):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != want:
            wrong.append(f"{path.relative_to(tmp_path)}: {oct(mode)}, expected {oct(want)}")
    assert not wrong, wrong


def test_load_any_dispatches_on_the_folder_format(tmp_path):
    _, _, frozen, am, state = case("lora")
    expected = outputs(am, frozen, state)
    peft_dir = export_peft(am, state, NAME, tmp_path / "peft")
    native_dir = save_adapter(am, state, NAME, tmp_path / "native")
    assert (peft_dir / "adapter_config.json").exists() and not is_native(peft_dir) and is_native(native_dir)
    for folder in (peft_dir, native_dir):
        am2, st2 = load_any(fresh(LLAMA, "causal_lm"), frozen, folder)
        assert am2.spec(NAME).config.method == "lora"
        np.testing.assert_array_equal(outputs(am2, frozen, st2), expected)
    # load_adapter alone refuses the PEFT folder: load_any did dispatch
    with pytest.raises(CheckpointError, match="missing jaxpeft_adapter.json"):
        load_adapter(fresh(LLAMA, "causal_lm"), frozen, peft_dir)
    with pytest.raises(CheckpointError, match="not a PEFT adapter folder"):
        load_any(fresh(LLAMA, "causal_lm"), frozen, tmp_path / "empty")
    # save_any picks PEFT for LoRA
    out, fmt = save_any(am, state, NAME, tmp_path / "any")
    assert fmt == "peft" and (out / "adapter_config.json").exists() and not is_native(out)
