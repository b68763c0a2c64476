"""Helpers shared by the training-run test modules: CLI subprocesses, Orbax commit checks, metrics and tensor
comparisons of run directories (imported as `train_procs`; `tests/` is on the pytest path)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from safetensors.numpy import load_file

from jaxpeft.train.logging import read_metrics

REPO = Path(__file__).resolve().parents[1]


def popen(args, env: dict, log: Path) -> subprocess.Popen:
    """`python -m jaxpeft ARGS` in the repository root, stdout and stderr into `log`."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "jaxpeft", *map(str, args)], stdout=f,
                                stderr=subprocess.STDOUT, text=True, env=env, cwd=str(REPO))


def wait(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    """Wait for the process (killed after `timeout` s); returns its log."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return log.read_text()


def committed(ckpt_dir: Path, step: int) -> bool:
    """Orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` on commit."""
    return (ckpt_dir / str(step)).is_dir() and not any(ckpt_dir.glob(f"{step}.orbax-checkpoint-tmp*"))


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"}


def evals(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k not in ("step", "split", "time")}
            for r in read_metrics(run_dir) if r["split"] == "eval"}


def assert_same_tensors(a: Path, b: Path) -> None:
    """Two safetensors files hold the same keys, dtypes, shapes and bytes."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(ta) == sorted(tb)
    assert ta, f"{a} holds no tensors"
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert ta[k].tobytes() == tb[k].tobytes(), f"{k} differs between {a} and {b}"


def kill_after_commit(proc: subprocess.Popen, run_dir: Path, step: int, log: Path, timeout: float = 300) -> None:
    """SIGKILL a training process as soon as its checkpoint `step` is committed; fails the test when the run dies
    first, never commits it, or finishes before the kill lands."""
    import signal
    import time

    import pytest

    deadline = time.monotonic() + timeout
    while not committed(run_dir / "checkpoints", step):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"run {run_dir.name} never committed checkpoint {step}:\n{log.read_text()[-4000:]}")
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    if (run_dir / "adapter").exists():  # pragma: no cover - the watcher lost the race against the whole run
        pytest.fail(f"run {run_dir.name} finished before it could be killed; the test needs a longer run")


def resumed_pair(root: Path, cfg_a: Path, cfg_b: Path, env: dict, kill_at: int, timeout: float = 300) -> dict:
    """Run B (`jaxpeft train cfg_b`) is SIGKILLed once its checkpoint `kill_at` is committed and restarted with
    the same command; run A (cfg_a, the same config with another output_dir) runs uninterrupted beside B's second
    attempt. Returns {'log_a', 'log_b2', 'b1_train_steps'} (the train steps B logged before the kill)."""
    import yaml

    started: list[subprocess.Popen] = []
    run_b = Path(yaml.safe_load(Path(cfg_b).read_text())["train"]["output_dir"])

    def start(args, log: str) -> subprocess.Popen:
        started.append(popen(args, env, root / log))
        return started[-1]

    try:
        proc_b = start(["train", cfg_b], "b1.log")
        kill_after_commit(proc_b, run_b, kill_at, root / "b1.log", timeout)
        b1_train_steps = sorted(train_losses(run_b))
        proc_b2 = start(["train", cfg_b], "b2.log")
        proc_a = start(["train", cfg_a], "a.log")
        log_a = wait(proc_a, root / "a.log", timeout)
        log_b2 = wait(proc_b2, root / "b2.log", timeout)
        assert proc_a.returncode == 0, log_a[-4000:]
        assert proc_b2.returncode == 0, log_b2[-4000:]
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return dict(log_a=log_a, log_b2=log_b2, b1_train_steps=b1_train_steps)


def assert_bit_exact_resume(run_a: Path, run_b: Path, pair: dict, steps: int, kill_at: int, every: int) -> None:
    """B resumed from a checkpoint at or after `kill_at`, and A and B logged bit-identical train losses (also the
    steps B logged twice) and evaluations."""
    import math
    import re

    m = re.search(r"resumed from step (\d+)", pair["log_b2"])
    assert m, f"the second run of B did not resume:\n{pair['log_b2'][-3000:]}"
    resumed_from = int(m.group(1))
    assert kill_at <= resumed_from < steps and resumed_from % every == 0
    assert "resumed from" not in pair["log_a"]
    assert pair["b1_train_steps"][:kill_at] == list(range(1, kill_at + 1))
    losses_a, losses_b = train_losses(run_a), train_losses(run_b)
    assert sorted(losses_a) == sorted(losses_b) == list(range(1, steps + 1))
    assert all(math.isfinite(v) for v in losses_a.values()) and len(set(losses_a.values())) > 1
    for step in losses_a:
        assert losses_b[step] == losses_a[step], f"step {step}: A {losses_a[step]!r} != B {losses_b[step]!r}"
    for rec in read_metrics(run_b, raw=True):  # steps logged before the kill and again after it agree
        if rec["split"] == "train":
            assert rec["loss"] == losses_a[rec["step"]], rec
    assert evals(run_b) == evals(run_a)


def cli(args) -> tuple[int, str, str]:
    """`jaxpeft ARGS` in-process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from jaxpeft.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def free_port() -> int:
    """A TCP port free on the loopback interface now (for a jax.distributed coordinator)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
