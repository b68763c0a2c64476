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
