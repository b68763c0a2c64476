"""End-to-end `jaxpeft train` / `eval` / `export`: exact resume after SIGKILL, and divergence handling.

The resume test trains the tiny llama (LoRA dropout and attention dropout on, gradient accumulation) twice:
run A uninterrupted, run B SIGKILLed as soon as its step-6 checkpoint is committed and then restarted with
the same command. Every logged training loss, every evaluation and the exported adapter must be identical
bit for bit: data order comes from (seed, epoch, index), dropout keys from (seed, step, micro-step), and the
optimizer state is restored exactly.
"""
from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxpeft.train.logging import read_metrics
import train_procs as tp  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
KILL_AT = 6
STEPS = 12














def _printed_metrics(stdout: str) -> dict[str, str]:
    """`name=1.2345` lines printed by `jaxpeft eval`."""
    return dict(re.findall(r"^(\w+)=(\S+)$", stdout, flags=re.M))


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory, build_config, cli_env):
    """Run A (uninterrupted) and run B (SIGKILL after checkpoint 6 is committed, then the same command again)."""
    root = tmp_path_factory.mktemp("resume")

    def config(name: str) -> Path:
        return build_config({
            "adapter": {"lora_dropout": 0.1},
            "optim": {"lr": 1e-2, "warmup_steps": 2, "schedule": "cosine"},
            "data": {"max_eval_rows": 8},
            "train": {"steps": STEPS, "batch_size": 4, "grad_accum": 2, "checkpoint_every": 3, "log_every": 1,
                      "keep_last": 2, "eval_every": 6, "eval_batch_size": 8, "eval_before_training": True,
                      "output_dir": str(root / name), "seed": 3},
            "generation": {"eval_generate": True, "max_new_tokens": 3, "show_examples": 1},
        }, root / f"{name}.yaml")

    cfg_a, cfg_b = config("a"), config("b")
    run_a, run_b = root / "a", root / "b"
    started: list[subprocess.Popen] = []

    def start(args, log: str) -> subprocess.Popen:
        started.append(tp.popen(args, cli_env, root / log))
        return started[-1]

    try:
        # A and B's first attempt run side by side (2 cores); B is watched and killed.
        proc_a = start(["train", cfg_a], "a.log")
        proc_b = start(["train", cfg_b], "b1.log")
        tp.kill_after_commit(proc_b, run_b, KILL_AT, root / "b1.log")
        ckpts_b = run_b / "checkpoints"
        steps_at_kill = sorted(int(p.name) for p in ckpts_b.iterdir() if p.name.isdigit())

        # B's second attempt (the same command) runs while A finishes; A's eval/export verbs start when A is done.
        proc_b2 = start(["train", cfg_b], "b2.log")
        log_a = tp.wait(proc_a, root / "a.log")
        assert proc_a.returncode == 0, log_a[-4000:]
        verbs = {
            "eval_adapter": ["eval", cfg_a, "--adapter", run_a / "adapter"],
            "eval_ckpt": ["eval", cfg_a],
            "export": ["export", cfg_a, "--out", root / "exported"],
        }
        procs = {k: start(args, f"{k}.log") for k, args in verbs.items()}
        log_b2 = tp.wait(proc_b2, root / "b2.log")
        assert proc_b2.returncode == 0, log_b2[-4000:]
        verb_logs = {k: tp.wait(p, root / f"{k}.log") for k, p in procs.items()}
        for k, p in procs.items():
            assert p.returncode == 0, f"jaxpeft {' '.join(map(str, verbs[k]))}:\n{verb_logs[k][-3000:]}"
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return dict(cfg_a=cfg_a, run_a=run_a, run_b=run_b, log_a=log_a, log_b2=log_b2, steps_at_kill=steps_at_kill,
                verb_logs=verb_logs, exported=root / "exported")


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(resumed_runs):
    r = resumed_runs
    run_a, run_b = r["run_a"], r["run_b"]
    m = re.search(r"resumed from step (\d+)", r["log_b2"])
    assert m, f"the second run of B did not resume:\n{r['log_b2'][-3000:]}"
    resumed_from = int(m.group(1))
    assert KILL_AT <= resumed_from < STEPS and resumed_from % 3 == 0
    assert "resumed from" not in r["log_a"]

    losses_a, losses_b = tp.train_losses(run_a), tp.train_losses(run_b)
    assert sorted(losses_a) == list(range(1, STEPS + 1))
    assert sorted(losses_b) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in losses_a.values())
    assert len(set(losses_a.values())) > 1  # a real, changing loss curve
    for step in range(1, STEPS + 1):
        assert losses_b[step] == losses_a[step], f"step {step}: A {losses_a[step]!r} != B {losses_b[step]!r}"
    # steps logged before the kill and again after the resume were logged with the same value
    for rec in read_metrics(run_b, raw=True):
        if rec["split"] == "train":
            assert rec["loss"] == losses_a[rec["step"]], rec

    evals_a, evals_b = tp.evals(run_a), tp.evals(run_b)
    assert sorted(evals_a) == [0, 6, STEPS] and sorted(evals_b) == [0, 6, STEPS]
    assert {"eval_loss", "exact_match"} <= set(evals_a[STEPS])
    assert evals_b == evals_a

    adapter_a, adapter_b = run_a / "adapter", run_b / "adapter"
    tp.assert_same_tensors(adapter_a / "adapter_model.safetensors", adapter_b / "adapter_model.safetensors")
    assert (adapter_a / "adapter_config.json").read_text() == (adapter_b / "adapter_config.json").read_text()


@pytest.mark.slow
def test_checkpoints_after_resume(resumed_runs):
    """keep_last=2 (+ the best by eval_loss) after the kill and the resume; no uncommitted leftovers."""
    from jaxpeft.train.checkpoint import RunCheckpointer

    run_b = resumed_runs["run_b"]
    assert KILL_AT in resumed_runs["steps_at_kill"]
    ckpt_dir = run_b / "checkpoints"
    assert not list(ckpt_dir.glob("*.orbax-checkpoint-tmp*"))
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    assert steps[-2:] == [9, STEPS]
    assert set(steps) <= {6, 9, STEPS}  # 6 may be kept as the best eval_loss (only 6 and 12 have evals)
    # The frozen base is not written into checkpoints: they stay tiny.
    size = sum(p.stat().st_size for p in ckpt_dir.rglob("*") if p.is_file())
    assert size < 2_000_000
    ckpt = RunCheckpointer(ckpt_dir, keep_last=2, base_fingerprint="listing-only")
    assert ckpt.latest_step() == STEPS
    ckpt.close()


@pytest.mark.slow
def test_eval_and_export_agree_with_training(resumed_runs):
    """`jaxpeft eval --adapter`, `jaxpeft eval` (latest checkpoint) and `jaxpeft export` reproduce run A."""
    run_a, logs = resumed_runs["run_a"], resumed_runs["verb_logs"]
    last_eval = tp.evals(run_a)[STEPS]
    expected = {k: f"{v:.4f}" for k, v in last_eval.items()}
    assert set(expected) == {"eval_loss", "exact_match"}
    for k in ("eval_adapter", "eval_ckpt"):
        printed = _printed_metrics(logs[k])
        assert printed == expected, f"jaxpeft {k} printed {printed}, training logged {expected}"
    tp.assert_same_tensors(resumed_runs["exported"] / "adapter_model.safetensors",
                         run_a / "adapter" / "adapter_model.safetensors")


# ------------------------------------------------------------------------------------------------ divergence

@pytest.fixture(scope="module")
def diverged_run(tmp_path_factory, build_config):
    """`jaxpeft train` (in-process CLI) with an absurd learning rate and no clipping: float32 overflows."""
    import contextlib
    import io

    from jaxpeft.cli import main

    root = tmp_path_factory.mktemp("diverge")
    cfg = build_config({"optim": {"lr": 3e38, "clip_norm": None, "warmup_steps": 0, "schedule": "constant"},
                        "train": {"steps": 8, "checkpoint_every": 1, "keep_last": 8, "grad_accum": 1,
                                  "output_dir": str(root / "run")}}, root / "cfg.yaml")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", str(cfg)])
    return dict(cfg=cfg, out=root / "run", rc=rc, err=err.getvalue())


def _eval_cli(args) -> tuple[int, dict[str, str], str]:
    import contextlib
    import io

    from jaxpeft.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["eval", *map(str, args)])
    return rc, _printed_metrics(out.getvalue()), err.getvalue()


def test_divergence_stops_with_the_step_and_keeps_checkpoints_restorable(diverged_run):
    """Non-zero exit, a message naming the step, no adapter exported, the checkpoints before it restorable."""
    from jaxpeft.train.checkpoint import RunCheckpointer

    r = diverged_run
    assert r["rc"] != 0
    m = re.search(r"loss or gradient is not finite at step (\d+)", r["err"])
    assert m, r["err"]
    bad_step = int(m.group(1))
    assert 1 < bad_step <= 8, "the lr must leave at least one finite step before diverging (test premise)"
    assert not (r["out"] / "adapter").exists()
    logged = tp.train_losses(r["out"])
    assert sorted(logged) == list(range(1, bad_step))  # the NaN step itself is not logged as a loss
    assert all(math.isfinite(v) for v in logged.values())

    ckpt = RunCheckpointer(r["out"] / "checkpoints", keep_last=8, base_fingerprint="listing-only")
    steps = ckpt.all_steps()
    ckpt.close()
    assert steps and steps[-1] < bad_step
    for step in steps:  # every checkpoint still loads (fingerprint and digests verified) through `jaxpeft eval`
        rc, printed, err = _eval_cli([r["cfg"], "--step", step])
        assert rc == 0, err
        assert "eval_loss" in printed


def test_divergence_message_names_a_checkpoint_that_still_works(diverged_run):
    r = diverged_run
    m = re.search(r"last good checkpoint is step (\d+)", r["err"])
    if m is None:  # acceptable: no checkpoint is good, and the message says so
        assert "no checkpoint" in r["err"].lower(), r["err"]
        return
    rc, printed, err = _eval_cli([r["cfg"], "--step", m.group(1)])
    assert rc == 0, err
    assert math.isfinite(float(printed["eval_loss"])), f"checkpoint {m.group(1)} evaluates to {printed}"


def _patch_loss_at(monkeypatch, nan_from_step: int | None = None, nan_grads: bool = False):
    """Make the causal-LM loss NaN from a given (0-based) optimizer step on, or its gradients NaN (finite loss)."""
    import jax.numpy as jnp

    from jaxpeft.train import loop, tasks

    def patched(orig):  # training uses the gathered-head loss, evaluation the full one: patch both
        def loss(self, out, batch, *rest):
            s, n = orig(self, out, batch, *rest)
            if nan_grads:  # 0 * sqrt(0 * x): value 0, gradient 0 * inf = NaN
                s = s + 0.0 * jnp.sqrt(0.0 * jnp.sum(out.logits))
            return s, n
        return loss

    monkeypatch.setattr(tasks.CausalLMTask, "loss", patched(tasks.CausalLMTask.loss))
    monkeypatch.setattr(tasks.CausalLMTask, "gathered_loss", patched(tasks.CausalLMTask.gathered_loss))
    if nan_from_step is not None:
        orig_make = loop.make_train_step

        def make_train_step(*a, **k):
            step_fn = orig_make(*a, **k)

            def wrapped(trainable, opt_state, frozen, extras, batch, step):
                trainable, opt_state, terms = step_fn(trainable, opt_state, frozen, extras, batch, step)
                if int(step) >= nan_from_step:
                    terms = dict(terms, loss=terms["loss"] * float("nan"))
                return trainable, opt_state, terms
            return wrapped

        import jaxpeft.train.runner as run_mod
        monkeypatch.setattr(run_mod, "make_train_step", make_train_step)


def test_divergence_before_the_first_checkpoint_says_so(make_config, tmp_path, monkeypatch):
    from jaxpeft.train import run
    from jaxpeft.train.runner import TrainingDiverged

    _patch_loss_at(monkeypatch, nan_from_step=1)
    cfg = make_config({"train": {"steps": 6, "checkpoint_every": 3}})
    with pytest.raises(TrainingDiverged) as info:
        run(cfg, verbose=False)
    msg = str(info.value)
    assert "step 2" in msg
    assert not list((tmp_path / "run" / "checkpoints").glob("[0-9]*"))
    assert "step None" not in msg, f"message should say that no checkpoint was written yet: {msg}"
    assert "no checkpoint" in msg.lower()


def test_nan_gradients_never_reach_a_checkpoint(make_config, tmp_path, monkeypatch):
    """Finite loss, NaN gradients at step 1: the NaN weights must not be saved as a 'good' checkpoint."""
    from jaxpeft.train import run
    from jaxpeft.train.runner import TrainingDiverged, export_checkpoint

    _patch_loss_at(monkeypatch, nan_grads=True)
    cfg = make_config({"train": {"steps": 4, "checkpoint_every": 1, "keep_last": 4}})
    with pytest.raises(TrainingDiverged) as info:
        run(cfg, verbose=False)
    m = re.search(r"last good checkpoint is step (\d+)", str(info.value))
    if m:  # the checkpoint the message calls good must hold finite adapter weights
        exported = export_checkpoint(cfg, str(tmp_path / "exported"), step=int(m.group(1)))
        tensors = load_file(str(Path(exported) / "adapter_model.safetensors"))
        bad = [k for k, v in tensors.items() if not np.isfinite(v).all()]
        assert not bad, f"checkpoint {m.group(1)}, called the last good one, holds non-finite {bad}"


def test_resume_false_refuses_a_folder_with_checkpoints(diverged_run):
    from jaxpeft.train import run
    from jaxpeft.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"train\.resume=false.*latest step"):
        run(str(diverged_run["cfg"]), ["train.resume=false", "optim.lr=1e-3"], verbose=False)


def test_the_update_norm_watch_warns_once_when_a_step_explodes_and_never_when_off():
    from jaxpeft.train.runner import UpdateNormWatch

    watch = UpdateNormWatch(10.0)
    steady = [watch.observe(s, 1.0 + 0.1 * (s % 3)) for s in range(1, 20)]
    assert steady == [None] * 19
    msg = watch.observe(20, 50.0)
    assert msg and "step 20" in msg and "update norm 50" in msg and "lower optim.lr" in msg
    assert watch.observe(21, 60.0) is None  # at most one warning per 100 steps
    early = UpdateNormWatch(10.0)
    assert [early.observe(s, n) for s, n in enumerate([1.0, 100.0], 1)] == [None, None]  # no history yet
    off = UpdateNormWatch(0.0)
    assert [off.observe(s, 1.0 if s < 10 else 1e6) for s in range(1, 12)] == [None] * 11


def _cls_run_config(tiny_bert_dir, write_jsonl, tmp_path, **model):
    import json

    rows = [{"text": t, "label": lab} for t, lab in [("good movie", "positive"), ("bad film", "negative"),
                                                      ("great film", "positive"), ("awful movie", "negative")] * 4]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "validation.jsonl", rows[:8])
    (tmp_path / "data" / "labels.json").write_text(json.dumps(["negative", "positive"]))
    return {"model": {"checkpoint": str(tiny_bert_dir), "task": "seq_cls", **model},
            "adapter": {"method": "lora", "r": 2, "target_modules": ["query", "value"]},
            "data": {"path": str(tmp_path / "data"), "max_length": 16, "buckets": [16]},
            "optim": {"lr": 1e-2},
            "train": {"steps": 2, "batch_size": 4, "eval_every": 100, "checkpoint_every": 100, "log_every": 1,
                      "eval_batch_size": 8, "eval_before_training": False, "output_dir": str(tmp_path / "run")}}


@pytest.mark.parametrize("train_new_head", [True, False])
def test_a_fresh_classification_head_is_trained_by_default_and_said_so(tiny_bert_dir, write_jsonl, tmp_path, capsys,
                                                                        train_new_head):
    import json

    from jaxpeft.train import run

    cfg = _cls_run_config(tiny_bert_dir, write_jsonl, tmp_path, train_new_head=train_new_head)
    result = run(cfg)
    out = capsys.readouterr().out
    head = 32 * 2 + 2  # the classifier: hidden 32 x 2 labels + bias
    lora = 2 * 2 * (32 * 2 + 2 * 32)  # q and v in 2 layers, r=2
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    if train_new_head:
        assert "the seq_cls head (classifier) is not in the checkpoint: it is trained with the adapter" in out
        assert f"trainable params: {lora + head:,d}" in out
        assert saved["modules_to_save"] == ["classifier"]
        tensors = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
        assert any("classifier" in k for k in tensors)
    else:
        assert "it stays at its random initialisation because model.train_new_head is false" in out
        assert f"trainable params: {lora:,d}" in out
        assert not saved.get("modules_to_save")


def test_targets_matching_a_module_in_only_some_layers_are_reported(make_config):
    from jaxpeft.train.config import load_config
    from jaxpeft.train.runner import _context

    cfg = load_config(make_config({"adapter": {"target_modules": r"model\.layers\.0\.self_attn\.(q|v)_proj"}}))
    notes = "\n".join(_context(cfg).notes)
    assert "match some modules in only some layers" in notes
    assert "model.layers.*.self_attn.q_proj: layers [0] of 2" in notes
    assert "model.layers.*.self_attn.v_proj: layers [0] of 2" in notes
    chosen = load_config(make_config({"adapter": {"layers_to_transform": [0]}}))  # asked for: no note
    assert _context(chosen).notes == ()
    everywhere = load_config(make_config())
    assert _context(everywhere).notes == ()


def test_imsm_wrapping_corda_calibrates_the_inner_method_on_the_training_rows(make_config):
    import numpy as np

    from jaxpeft.train.config import load_config
    from jaxpeft.train.runner import _context

    inner = {"method": "corda", "r": 2, "calibration_samples": 3, "target_modules": ["q_proj", "v_proj"]}
    raw = make_config()
    raw["adapter"] = {"method": "imsm", "inner": inner}
    cfg = load_config(raw)
    placeholder = _context(cfg).state["extras"]
    calibrated = _context(cfg, calibrate=True).state["extras"]
    # the frozen CorDA factors come from the 3 calibration rows, not from the placeholder statistics
    diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(placeholder), jax.tree.leaves(calibrated))]
    assert diffs and max(diffs) > 1e-3
