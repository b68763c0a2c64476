"""KaSA vs LoRA (same rank, same budget) with PiSSA and SORSA on all-MiniLM-L6-v2 sentiment, and KaSA vs LoRA on
SmolLM2-135M-Instruct arithmetic (generation, exact match on 200 held-out rows): run, collect, tabulate.

Command (from the repository root, inside the project's virtual environment):

    python benchmarks/svd_methods_results.py                  # train what is missing, then collect
    python benchmarks/svd_methods_results.py --collect-only   # only read the run directories

Each run is one `jaxpeft train` process (`SWEEP.command`, via benchmarks/sweeps.py), for example

    jaxpeft train configs/kasa_minilm_sentiment.yaml --set train.seed=0 \\
        --set train.output_dir=runs/results/sentiment/kasa/seed0 --set train.eval_before_training=false \\
        --set train.steps=250 --set optim.warmup_steps=20 --set data.max_length=64 --set data.buckets=[64] \\
        --set train.eval_every=250 --set train.checkpoint_every=250

The sentiment task uses exactly the budget and overrides of benchmarks/prefix_methods_results.py, and the same run
root, so its LoRA runs are shared with that sweep (same command, not trained twice). Outputs:
benchmarks/results/svd_methods.json and benchmarks/results/svd_methods.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefix_methods_results import SWEEP as PREFIX_SWEEP  # noqa: E402
from sweeps import Sweep, main  # noqa: E402

CONFIGS = {"sentiment": "{method}_minilm_sentiment.yaml", "arith": "{method}_smollm2_arith.yaml"}

SWEEP = Sweep(
    name="KaSA vs LoRA (and PiSSA, SORSA)",
    tasks=("sentiment", "arith"),
    methods=("kasa", "lora", "pissa", "sorsa"),
    methods_per_task={"arith": ("kasa", "lora")},
    method_names={"kasa": "KaSA (r=8)", "lora": "LoRA (r=8)", "pissa": "PiSSA (r=8)", "sorsa": "SORSA (r=8)"},
    config=lambda task, method: Path("configs") / CONFIGS[task].format(method=method),
    overrides={"sentiment": PREFIX_SWEEP.overrides["sentiment"],
               "arith": {"train.steps": "150", "optim.warmup_steps": "10"}},
    main_metrics={"sentiment": ("accuracy", "macro_f1"), "arith": ("exact_match",)},
    baseline="lora",
    runs_root=PREFIX_SWEEP.runs_root,
    results_json=Path("benchmarks/results/svd_methods.json"),
    results_md=Path("benchmarks/results/svd_methods.md"),
)

if __name__ == "__main__":
    sys.exit(main(SWEEP))
