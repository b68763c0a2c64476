"""Runs training jobs on a simulated multi-device CPU in its own process (the device count is fixed when jax
starts, so the rest of the suite keeps 1 device): `python tests/sharded_driver.py JOBS.json OUT.json`.

Each job {"config": run config dict, "inspect": bool} runs `jaxpeft.train.run`; its train losses are
returned, and with "inspect" the PartitionSpecs of the frozen base, the adapter state and the optimizer
state of a freshly built context (what the run trained with). Imported by nothing; tests read OUT.json.
"""
from __future__ import annotations

import json
import sys


def _specs(tree):
    import jax

    return {jax.tree_util.keystr(p): [list(s) if isinstance(s, tuple) else s for s in leaf.sharding.spec]
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(leaf, "sharding")}


def main() -> None:
    import jax

    from jaxpeft.train import runner
    from jaxpeft.train.checkpoint import fingerprint
    from jaxpeft.train.config import load_config
    from jaxpeft.train.logging import read_metrics

    jobs = json.loads(open(sys.argv[1]).read())
    results = []
    for job in jobs:
        cfg = load_config(job["config"])
        runner.run(cfg, verbose=False)
        losses = {r["step"]: r["loss"] for r in read_metrics(cfg.train.output_dir) if r["split"] == "train"}
        res = {"devices": jax.device_count(), "losses": losses}
        if job.get("inspect"):
            ctx = runner._context(cfg)
            opt_state, _ = runner._init_opt_state(ctx, runner._optimizer(ctx))
            res.update(frozen=_specs(ctx.pretrained.params), trainable=_specs(ctx.state["trainable"]),
                       opt_state=_specs(opt_state), mesh=dict(ctx.placement.mesh.shape),
                       fingerprint=fingerprint(ctx.pretrained.params))
        results.append(res)
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
