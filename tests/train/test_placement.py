"""Sharded training (jaxpeft.train.placement + the runner on a mesh): on 8 simulated CPU devices, in a
subprocess so the rest of the suite keeps 1 device, every mesh shape trains to the 1-device losses, params and
optimizer state carry the shardings their logical axes ask for, and a checkpoint moves between meshes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from train_procs import REPO, train_losses

RTOL = 1e-5
MESHES = {"8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "2x2x2": (2, 2, 2)}
OTHER_METHODS = {  # one of each mechanism: vectors, frozen SVD factors, a post-clip loss, calibration, training
    # hooks, prefix hooks (with a shared reparameterisation MLP, with gates) and a wrapper
    "dora": {"method": "dora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "ia3": {"method": "ia3"},
    "kasa": {"method": "kasa", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "sorsa": {"method": "sorsa", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "corda": {"method": "corda", "r": 4, "lora_alpha": 8, "calibration_samples": 4,
              "target_modules": ["q_proj", "v_proj"]},
    "prefix": {"method": "prefix", "num_virtual_tokens": 4, "prefix_projection": True, "encoder_hidden_size": 16},
    "apt": {"method": "apt", "num_virtual_tokens": 4},
    "imsm": {"method": "imsm", "inner": {"method": "lora", "r": 4, "lora_alpha": 8,
                                        "target_modules": ["q_proj", "v_proj"]}},
    "adalora": {"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1,
                "total_step": 6,
                "target_modules": ["q_proj", "v_proj"]},
}


def _config(build_config, out, mesh=None, adapter=None, steps=6):
    """Batch 8 (divisible by every mesh's data-parallel size), a constant schedule after warmup (so a 4-step run
    is the first 4 steps of the 6-step one), a checkpoint at step 4."""
    patch = {"train": {"output_dir": str(out), "steps": steps, "batch_size": 8, "eval_batch_size": 8,
                       "checkpoint_every": 4},
             "optim": {"schedule": "constant"}}
    if mesh is not None:
        patch["mesh"] = dict(zip(("data", "fsdp", "tensor"), mesh))
    cfg = build_config(patch)
    if adapter:  # the whole section (build_config merges keys)
        cfg["adapter"] = adapter
    return cfg


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, build_config, cli_env):
    """One 8-device subprocess: LoRA on three meshes (with shardings inspected), a checkpoint written on
    (2, 4, 1) resumed on (2, 2, 2), and the other methods on (2, 2, 2); plus their 1-device runs in-process."""
    from jaxpeft.train import run

    tmp = tmp_path_factory.mktemp("sharded")
    jobs, single = [], {}
    for name, mesh in MESHES.items():
        jobs.append({"config": _config(build_config, tmp / f"lora-{name}", mesh), "inspect": True})
    jobs.append({"config": _config(build_config, tmp / "moved", (2, 4, 1), steps=4)})
    jobs.append({"config": _config(build_config, tmp / "moved", (2, 2, 2))})
    for method, adapter in OTHER_METHODS.items():
        jobs.append({"config": _config(build_config, tmp / f"{method}-2x2x2", (2, 2, 2), adapter)})
    for method, adapter in {"lora": None, **OTHER_METHODS}.items():
        cfg = _config(build_config, tmp / f"{method}-1", None, adapter)
        run(cfg, verbose=False)
        single[method] = train_losses(tmp / f"{method}-1")
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    env = dict(cli_env, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "sharded_driver.py"), str(tmp / "jobs.json"),
                           str(tmp / "out.json")], env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads((tmp / "out.json").read_text())
    for res in out:
        res["losses"] = {int(k): v for k, v in res["losses"].items()}
    return {"single": single, "lora": dict(zip(MESHES, out[:3])), "moved": out[4],
            "methods": dict(zip(OTHER_METHODS, out[5:]))}


def _close(got: dict[int, float], want: dict[int, float], rtol_after_4: float = RTOL) -> None:
    assert sorted(got) == sorted(want) and want
    for step in want:
        rel = RTOL if step <= 4 else rtol_after_4
        assert got[step] == pytest.approx(want[step], rel=rel), (step, got[step], want[step])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", list(MESHES))
def test_lora_losses_on_every_mesh_equal_one_device(sharded, mesh):
    res = sharded["lora"][mesh]
    assert res["devices"] == 8 and tuple(res["mesh"].values()) == MESHES[mesh]
    _close(res["losses"], sharded["single"]["lora"])


@pytest.mark.slow
def test_params_and_optimizer_state_carry_the_rule_shardings(sharded):
    q = "['layers']['self_attn']['q_proj']"
    # (8, 1, 1): pure data parallelism, every weight replicated
    dp = sharded["lora"]["8x1x1"]
    assert all(spec == [] for spec in dp["frozen"].values())
    # (2, 4, 1): FSDP splits the model dimension ('embed') of the base and of the adapters that follow it
    fsdp = sharded["lora"]["2x4x1"]
    assert fsdp["frozen"][f"{q}['kernel']"] == [None, "fsdp"]
    assert fsdp["frozen"]["['embed_tokens']['embedding']"] == [None, "fsdp"]
    lora_a = f"['default']['modules']{q}['lora_A']"
    assert fsdp["trainable"][lora_a] == [None, "fsdp"]  # A: (L, embed, r) like the kernel's input axis
    assert fsdp["trainable"][f"['default']['modules']{q}['lora_B']"] == []  # B: (L, r, heads), heads unsplit
    # (2, 2, 2): tensor parallelism splits heads, MLP and vocabulary, FSDP the model dimension
    tp = sharded["lora"]["2x2x2"]
    assert tp["frozen"][f"{q}['kernel']"] == [None, "fsdp", "tensor"]
    assert tp["frozen"]["['layers']['mlp']['down_proj']['kernel']"] == [None, "tensor", "fsdp"]
    assert tp["trainable"][f"['default']['modules']{q}['lora_B']"] == [None, None, "tensor"]
    # Adam's moments shard exactly like the params they track; the step counter is replicated
    for res in (fsdp, tp):
        moments = {k: v for k, v in res["opt_state"].items() if "lora_" in k}
        assert moments and all(v == res["trainable"][k[k.index("['default']"):]] for k, v in moments.items())
        assert any(v == [] and "count" in k for k, v in res["opt_state"].items())


@pytest.mark.slow
def test_base_fingerprint_is_the_same_on_every_mesh_and_on_one_device(sharded, tiny_llama_dir):
    from jaxpeft.loading.pretrained import load_pretrained
    from jaxpeft.train.checkpoint import fingerprint

    one = fingerprint(load_pretrained(tiny_llama_dir).params)
    assert {res["fingerprint"] for res in sharded["lora"].values()} == {one}


@pytest.mark.slow
def test_checkpoint_saved_on_one_mesh_resumes_on_another(sharded):
    _close(sharded["moved"]["losses"], sharded["single"]["lora"])


@pytest.mark.slow
@pytest.mark.parametrize("method", list(OTHER_METHODS))
def test_other_methods_on_a_2x2x2_mesh_equal_one_device(sharded, method):
    """Four steps within 1e-5 relative, the next two within 1e-4: a sharded run sums in another order, and Adam
    turns that noise in near-zero gradient entries into lr-sized steps (SORSA, whose orthogonality gradient is ~0
    at its orthonormal init, measured 1.5e-5 at step 5)."""
    _close(sharded["methods"][method]["losses"], sharded["single"][method], rtol_after_4=1e-4)


def test_a_mesh_the_devices_cannot_hold_is_a_config_error_before_loading(build_config, tmp_path):
    from jaxpeft.train import run
    from jaxpeft.train.config import ConfigError

    cfg = build_config({"train": {"output_dir": str(tmp_path / "run")}, "mesh": {"data": 2}})
    with pytest.raises(ConfigError, match=r"mesh: mesh .* needs 2 devices but there are 1: make data \* fsdp \* "
                                          r"tensor equal 1"):
        run(cfg, verbose=False)


def test_global_batch_must_split_over_the_data_parallel_devices():
    import jax
    import numpy as np
    from jax.sharding import AbstractMesh

    from jaxpeft.parallel import make_mesh
    from jaxpeft.train.placement import Placement

    wide = Placement(AbstractMesh((2, 4, 2), ("data", "fsdp", "tensor")))
    assert wide.batch_divisor == 8  # rows split over data and fsdp, not tensor
    with pytest.raises(ValueError, match="6 rows cannot be split over 8 data-parallel devices"):
        wide.global_batch({"input_ids": np.zeros((6, 4), np.int32)})
    place = Placement(make_mesh())
    batch = {"input_ids": np.arange(6, dtype=np.int32).reshape(3, 2)}
    out = place.global_batch(batch)
    assert isinstance(out["input_ids"], jax.Array) and np.array_equal(np.asarray(out["input_ids"]), batch["input_ids"])
