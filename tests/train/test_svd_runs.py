"""Training runs of the SVD family through `jaxpeft train` (subprocesses) on the tiny llama: a KaSA run with its
regulariser on (task loss and R logged apart, both in evaluation), SIGKILLed and resumed bit-exactly, exported in
PEFT's KaSA form; a CorDA run whose frozen factors come from calibration on the training rows and are restored
from the checkpoint (evaluating the checkpoint, which rebuilds the adapter without calibration data, reproduces the
run's final metrics).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import train_procs as tp

STEPS, KILL_AT, EVERY = 8, 4, 2


def _config(build_config, root: Path, name: str, adapter: dict, steps: int = STEPS) -> Path:
    cfg = build_config({
        "data": {"max_eval_rows": 8},
        "optim": {"lr": 1e-2, "warmup_steps": 2, "schedule": "linear"},
        "train": {"steps": steps, "batch_size": 4, "grad_accum": 2, "checkpoint_every": EVERY, "keep_last": 2,
                  "eval_every": 1000, "log_every": 1, "eval_batch_size": 8, "eval_before_training": False,
                  "output_dir": str(root / name), "seed": 5},
    })
    cfg["adapter"] = adapter
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


KASA = {"method": "kasa", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "beta": 0.01, "gamma": 0.05,
        "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def kasa_resumed(tmp_path_factory, build_config, cli_env) -> dict:
    root = tmp_path_factory.mktemp("kasa-resume")
    pair = tp.resumed_pair(root, _config(build_config, root, "a", KASA), _config(build_config, root, "b", KASA),
                           cli_env, KILL_AT)
    return dict(run_a=root / "a", run_b=root / "b", **pair)


def test_kasa_resume_after_sigkill_is_bit_exact(kasa_resumed):
    r = kasa_resumed
    tp.assert_bit_exact_resume(r["run_a"], r["run_b"], r, STEPS, KILL_AT, EVERY)
    tp.assert_same_tensors(r["run_a"] / "adapter" / "adapter_model.safetensors",
                           r["run_b"] / "adapter" / "adapter_model.safetensors")


def test_kasa_run_logs_task_loss_and_regularizer_apart(kasa_resumed):
    from jaxpeft.train.logging import read_metrics

    train = [m for m in read_metrics(kasa_resumed["run_a"]) if m["split"] == "train"]
    assert len(train) == STEPS
    for m in train:
        assert m["regularizer"] > 0.05  # gamma * R3 alone is about 0.05 * 2 * 4 modules at init
        assert abs(m["loss"] - (m["task_loss"] + m["regularizer"])) < 1e-5 * max(1.0, m["loss"])
    last = tp.evals(kasa_resumed["run_a"])[STEPS]
    assert {"eval_loss", "eval_regularizer"} <= set(last) and last["eval_regularizer"] > 0


def test_kasa_run_exports_peft_kasa_adapter(kasa_resumed):
    cfg = json.loads((kasa_resumed["run_a"] / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["kasa_config"] == {"beta": 0.01, "gamma": 0.05}


def test_kasa_checkpoints_hold_the_frozen_svd_factors(kasa_resumed, tiny_llama_dir):
    import jax

    import jaxpeft
    from jaxpeft.adapters import AdaptedModel
    from jaxpeft.train.checkpoint import RunCheckpointer, fingerprint
    from jaxpeft.train.config import load_config

    cfg = load_config(str(Path(kasa_resumed["run_a"]) / "config.yaml"))
    pre = jaxpeft.load_pretrained(tiny_llama_dir)
    model = AdaptedModel.wrap(pre.module).add("default", cfg.adapter_config())
    state = model.init(jax.random.key(0), pre.params)
    with RunCheckpointer(kasa_resumed["run_a"] / "checkpoints", base_fingerprint=fingerprint(pre.params)) as ckpt:
        extras = ckpt.restore_extras(STEPS, extras_like=state["extras"])
    assert extras is not None
    left = [v for k, v in jax.tree_util.tree_flatten_with_path(extras)[0]
            if "kasa_drop_left" in jax.tree_util.keystr(k)]
    assert left and all(x.shape[-1] == 4 for x in left)


def test_corda_run_restores_calibrated_factors_from_its_checkpoint(tmp_path, build_config, cli_env):
    from jaxpeft.train.runner import evaluate

    adapter = {"method": "corda", "r": 4, "lora_alpha": 8, "calibration_samples": 4,
               "target_modules": ["q_proj", "v_proj"]}
    cfg = _config(build_config, tmp_path, "corda", adapter, steps=2)
    log = tmp_path / "corda.log"
    out = tp.wait(tp.popen(["train", cfg], cli_env, log), log)
    assert "adapter (Hugging Face PEFT format)" in out, out[-3000:]
    final = tp.evals(tmp_path / "corda")[2]
    peft_cfg = json.loads((tmp_path / "corda" / "adapter" / "adapter_config.json").read_text())
    assert peft_cfg["r"] == 8  # the rank-2r LoRA form on the original base
    again = evaluate(str(cfg))  # placeholder calibration, then the checkpoint's saved extras
    assert again["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-6, abs=1e-6)


ADALORA = {"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "lora_alpha": 8,
           "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def adalora_resumed(tmp_path_factory, build_config, cli_env) -> dict:
    """AdaLoRA with the rank schedule spanning the run (total_step = train.steps): the kill at step 4 lands in the
    cubic-budget phase, so the importance EMAs and the rank mask must come back from the checkpoint."""
    root = tmp_path_factory.mktemp("adalora-resume")
    pair = tp.resumed_pair(root, _config(build_config, root, "a", ADALORA), _config(build_config, root, "b", ADALORA),
                           cli_env, KILL_AT)
    return dict(run_a=root / "a", run_b=root / "b", **pair)


def test_adalora_resume_after_sigkill_is_bit_exact(adalora_resumed):
    r = adalora_resumed
    tp.assert_bit_exact_resume(r["run_a"], r["run_b"], r, STEPS, KILL_AT, EVERY)
    tp.assert_same_tensors(r["run_a"] / "adapter" / "adapter_model.safetensors",
                           r["run_b"] / "adapter" / "adapter_model.safetensors")
    cfg_a = json.loads((r["run_a"] / "adapter" / "adapter_config.json").read_text())
    assert cfg_a == json.loads((r["run_b"] / "adapter" / "adapter_config.json").read_text())


def test_adalora_run_exports_the_final_rank_pattern(adalora_resumed):
    cfg = json.loads((adalora_resumed["run_a"] / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["total_step"] == STEPS
    pattern = cfg["rank_pattern"]
    assert len(pattern) == 2 * 2  # q and v in the tiny llama's 2 layers
    assert sum(sum(v) for v in pattern.values()) == 2 * len(pattern)  # target_r per module on average
