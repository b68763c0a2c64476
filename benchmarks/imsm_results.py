"""IMSM over LoRA vs the same LoRA on SmolLM2-135M-Instruct: the task metric (arithmetic, exact match on 200 held-out
rows) and a forgetting probe (the response NLL on the 43 E2E NLG test rows, a task neither run trains on, next to
the base model's), 3 seeds each: run, probe, collect, tabulate.

Command (from the repository root, inside the project's virtual environment):

    python benchmarks/imsm_results.py                  # train what is missing, probe, collect
    python benchmarks/imsm_results.py --collect-only   # only read the run directories (and probe what is missing)

Each run is one `jaxpeft train` process (`SWEEP.command`), for example

    jaxpeft train configs/imsm_smollm2_arith.yaml --set train.seed=0 \\
        --set train.output_dir=runs/results/arith/imsm/seed0 --set train.eval_before_training=false \\
        --set train.steps=150 --set optim.warmup_steps=10 --set train.eval_every=150 --set train.checkpoint_every=150

The LoRA runs are those of benchmarks/svd_methods_results.py (same command, same run root: trained once). The probe
of a finished run is one `jaxpeft eval` process, written to `<run>/probe.json`:

    jaxpeft eval <run>/config.yaml --adapter <run>/adapter --compare-base --set data.path=bundled:e2e_nlg \\
        --set data.eval_split=test --set data.max_length=128 --set data.buckets=[128] \\
        --set generation.eval_generate=false

Outputs: benchmarks/results/imsm.json and benchmarks/results/imsm.md.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from svd_methods_results import SWEEP as SVD_SWEEP  # noqa: E402
from sweeps import Sweep, final_eval, main  # noqa: E402

PROBE_SETS = ["data.path=bundled:e2e_nlg", "data.eval_split=test", "data.max_length=128", "data.buckets=[128]",
              "generation.eval_generate=false"]

SWEEP = Sweep(
    name="IMSM vs LoRA on SmolLM2-135M-Instruct (arithmetic; E2E NLG forgetting probe)",
    tasks=("arith",),
    methods=("imsm", "lora"),
    method_names={"imsm": "IMSM over LoRA (r=8, q,k,v,o)", "lora": "LoRA (r=8, q,k,v,o)"},
    config=lambda task, method: Path("configs") / f"{method}_smollm2_arith.yaml",
    overrides={"arith": SVD_SWEEP.overrides["arith"]},
    main_metrics={"arith": ("exact_match",)},
    extra_metrics=("eval_loss", "probe_eval_loss", "probe_base_eval_loss"),
    baseline="lora",
    runs_root=SVD_SWEEP.runs_root,
    results_json=Path("benchmarks/results/imsm.json"),
    results_md=Path("benchmarks/results/imsm.md"),
)


def probe(task: str, method: str, directory: Path) -> dict[str, Any]:
    """The forgetting probe of a finished run (cached in probe.json), merged into its metrics."""
    cache = directory / "probe.json"
    if not cache.exists():
        cmd = ["jaxpeft", "eval", str(directory / "config.yaml"), "--adapter", str(directory / "adapter"),
               "--compare-base"]
        for s in PROBE_SETS:
            cmd += ["--set", s]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        cache.write_text(json.dumps({"command": cmd, "metrics": dict(
            (k, float(v)) for k, v in (line.split("=") for line in out.split()))}, indent=2) + "\n")
    got = json.loads(cache.read_text())["metrics"]
    metrics = final_eval(directory, SWEEP.steps(task)) or {}
    return {"metrics": {**metrics, "probe_eval_loss": got["eval_loss"],
                        "probe_base_eval_loss": got["base_eval_loss"]}, "probe_command": " ".join(
                            json.loads(cache.read_text())["command"])}


if __name__ == "__main__":
    sys.exit(main(SWEEP, extra=probe))
