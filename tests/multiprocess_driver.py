"""One process of a multi-process training job on loopback: `python tests/multiprocess_driver.py CONFIG.yaml
COORDINATOR NUM_PROCESSES PROCESS_ID OUT.json`. Joins the job exactly as `jaxpeft train --coordinator ...` does,
runs `jaxpeft.train.run` and writes this process's train losses and device view to OUT.json (run files are
written by process 0 only). Imported by nothing; tests/train/test_multiprocess.py starts two of these.
"""
from __future__ import annotations

import json
import sys


def main() -> None:
    config, coordinator, n, pid, out = sys.argv[1:6]
    from jaxpeft.cli import _join_job, build_parser

    args = build_parser().parse_args(["train", config, "--coordinator", coordinator, "--num-processes", n,
                                      "--process-id", pid])
    _join_job(args)
    import jax

    from jaxpeft.train import run

    result = run(config, verbose=False)
    with open(out, "w") as f:
        json.dump({"process": jax.process_index(), "processes": jax.process_count(),
                   "devices": jax.device_count(), "local_devices": jax.local_device_count(),
                   "losses": dict(result.train_losses)}, f)


if __name__ == "__main__":
    main()
