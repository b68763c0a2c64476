"""jaxpeft.train.preemption and the runner's stop path: SIGTERM/SIGINT make a run finish its step, write a
checkpoint and exit with EXIT_PREEMPTED (75); the same command resumes; a second SIGINT stops at once (130); with
two processes a signal to one stops both at the same step."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from jaxpeft.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED
from jaxpeft.train.preemption import StopSignals
from train_procs import REPO, cli, committed, free_port, train_losses


def test_the_first_signal_is_recorded_and_the_second_sigint_interrupts_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(say=lambda msg: None) as stop:
        assert not stop.requested and stop.agreed(1)  is False
        os.kill(os.getpid(), signal.SIGTERM)  # would end pytest without the handler
        assert stop.requested and stop.signal_name == "SIGTERM" and stop.agreed(5)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_sigterm_checkpoints_the_step_reached_exits_75_and_the_same_command_resumes(make_config, tmp_path,
                                                                                      monkeypatch):
    config = make_config({"train": {"steps": 6, "checkpoint_every": 4, "log_every": 1}}, tmp_path / "c.yaml")
    monkeypatch.setenv("JAXPEFT_FAULT", "train.step@3:SIGTERM")
    rc, out, err = cli(["train", config])
    assert rc == EXIT_PREEMPTED, err
    assert "preempted: stopped at step 3 of 6 on SIGTERM" in err and "run the same command again" in err
    assert committed(tmp_path / "run" / "checkpoints", 3)  # not a checkpoint step: written because of the signal
    assert not (tmp_path / "run" / "adapter").exists()
    monkeypatch.delenv("JAXPEFT_FAULT")
    rc, out, err = cli(["train", config])
    assert rc == 0, err
    assert "resumed from step 3" in out
    assert sorted(train_losses(tmp_path / "run")) == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_a_second_sigint_stops_at_once_with_exit_130(make_config, tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in an xdist worker
    config = make_config({"train": {"steps": 6, "checkpoint_every": 2}}, tmp_path / "c.yaml")
    # the first SIGINT as checkpoint 2 starts, the second once it is committed: no checkpoint-and-exit, at once
    monkeypatch.setenv("JAXPEFT_FAULT", "checkpoint.begin@2:SIGINT,checkpoint.written@2:SIGINT")
    rc, out, err = cli(["train", config])
    assert rc == EXIT_INTERRUPTED and "interrupted" in err, err
    assert "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is before  # the run's handler is gone


@pytest.mark.slow
def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, build_config, cli_env):
    config = build_config({"train": {"output_dir": str(tmp_path / "run"), "steps": 8, "batch_size": 8,
                                     "checkpoint_every": 4, "eval_batch_size": 8, "log_every": 1,
                                     "preemption_check_every": 2}}, path=tmp_path / "c.yaml")
    coordinator = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(2):  # only process 1 is signalled, after step 3: both agree at step 4 (checked every 2 steps)
        env = dict(cli_env, JAXPEFT_FAULT="train.step@3:SIGTERM") if i == 1 else cli_env
        procs.append(subprocess.Popen([sys.executable, "-m", "jaxpeft", "train", str(config), "--coordinator",
                                       coordinator, "--num-processes", "2", "--process-id", str(i),
                                       "--cpu-devices", "1"], env=env, cwd=str(REPO), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [EXIT_PREEMPTED, EXIT_PREEMPTED], "\n----\n".join(logs)
    for log in logs:
        assert "stopped at step 4 of 8" in log, log[-3000:]
    assert committed(tmp_path / "run" / "checkpoints", 4)
    assert json.loads(json.dumps(sorted(train_losses(tmp_path / "run")))) == [1, 2, 3, 4]
