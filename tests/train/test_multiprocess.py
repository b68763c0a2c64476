"""A real multi-process job (jaxpeft.parallel.distributed + the runner): two CPU processes on loopback join
through `jax.distributed`, train on one global mesh, checkpoint; a single process then resumes the checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from train_procs import REPO, evals, free_port, train_losses


@pytest.mark.slow
def test_two_processes_train_together_and_one_process_resumes_their_checkpoint(tmp_path, build_config, cli_env):
    from jaxpeft.train import run

    patch = lambda out, steps: {"train": {"output_dir": str(out), "steps": steps, "batch_size": 8,  # noqa: E731
                                          "eval_batch_size": 8, "checkpoint_every": 4},
                                "optim": {"schedule": "constant"}}
    # the reference: 6 steps on 1 device in this process
    run(build_config(patch(tmp_path / "single", 6)), verbose=False)
    want = train_losses(tmp_path / "single")

    multi = patch(tmp_path / "multi", 4)
    multi["generation"] = {"eval_generate": True}  # generation runs on the global mesh too
    config = build_config(multi, path=tmp_path / "multi.yaml")
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "multiprocess_driver.py"), str(config),
                               coordinator, "2", str(i), str(tmp_path / f"p{i}.json")], env=cli_env, cwd=str(REPO),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(log[-4000:] for log in logs)
    res = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    assert [r["process"] for r in res] == [0, 1] and all(r["processes"] == 2 and r["devices"] == 2 for r in res)
    # both processes computed the same losses (one global step), and they are the 1-device losses
    assert res[0]["losses"] == res[1]["losses"]
    for step, loss in res[0]["losses"].items():
        assert loss == pytest.approx(want[int(step)], rel=1e-5)
    # only process 0 wrote the run files; the checkpoint of step 4 is complete
    assert (tmp_path / "multi" / "checkpoints" / "4").is_dir() and (tmp_path / "multi" / "metrics.jsonl").exists()
    assert "exact_match" in evals(tmp_path / "multi")[4]
    # one process continues the two-process checkpoint to step 6 (reduction order differs: 1e-5 relative)
    run(build_config(patch(tmp_path / "multi", 6)), verbose=False)
    got = train_losses(tmp_path / "multi")
    for step in (5, 6):
        assert got[step] == pytest.approx(want[step], rel=1e-5)
