"""APT vs P-tuning v2 vs LoRA vs a head-only linear probe on all-MiniLM-L6-v2: run, collect, tabulate.

Command (from the repository root, inside the project's virtual environment):

    python benchmarks/prefix_methods_results.py                  # train all 24 runs, then collect
    python benchmarks/prefix_methods_results.py --collect-only   # only read the run directories

Each run is one `jaxpeft train` process (`SWEEP.command`, via benchmarks/sweeps.py), for example

    jaxpeft train configs/apt_minilm_sentiment.yaml --set train.seed=0 \
        --set train.output_dir=runs/results/sentiment/apt/seed0 \
        --set train.eval_before_training=false --set train.steps=250 --set optim.warmup_steps=20 \
        --set data.max_length=64 --set data.buckets=[64] --set train.eval_every=250 --set train.checkpoint_every=250

with JAX's persistent compilation cache switched on (JAX_COMPILATION_CACHE_DIR=runs/jax_cache) so that the
evaluation and gate-probe programs compile once per task and method instead of once per run. Runs are
sequential (never two training processes at once). A run directory whose final evaluation is already logged
is not trained again (pass --force to retrain); an incomplete one is deleted and trained from scratch.

Outputs: benchmarks/results/prefix_methods_minilm.json (every run's final metrics, trainable parameters,
wall time, APT gate statistics, and the per-task summary) and a Markdown table plus the APT gate analysis on
stdout (also written to benchmarks/results/prefix_methods_minilm.md).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweeps import Sweep, main, mean_std  # noqa: E402

FLAT_SPREAD = 0.05  # per-layer effective gates within 5% of their mean: no layer preference
BUDGET = {"train.steps": "250", "optim.warmup_steps": "20"}
"""The measured step budget (same for every method and task); equal to the configs' own (250 steps, 20 warmup)."""

SWEEP = Sweep(
    name="APT vs P-tuning v2 vs LoRA vs head-only on all-MiniLM-L6-v2",
    tasks=("sentiment", "ner"),
    methods=("apt", "ptuning_v2", "lora", "head_only"),
    method_names={"apt": "APT", "ptuning_v2": "P-tuning v2", "lora": "LoRA (r=8, q,v)", "head_only": "head only"},
    config=lambda task, method: Path("configs") / f"{method}_minilm_{task}.yaml",
    # sentiment reviews are truncated at 64 tokens instead of the configs' 128, which halves the cost of a step so
    # that the 24 runs fit in about an hour of 2 CPU cores (chosen before any 250-step sentiment run was trained)
    overrides={"sentiment": {**BUDGET, "data.max_length": "64", "data.buckets": "[64]"}, "ner": dict(BUDGET)},
    main_metrics={"sentiment": ("accuracy", "macro_f1"), "ner": ("span_f1",)},
    baseline="head_only",
    runs_root=Path("runs/results"),
    results_json=Path("benchmarks/results/prefix_methods_minilm.json"),
    results_md=Path("benchmarks/results/prefix_methods_minilm.md"),
)


def read_gates(task: str, method: str, directory: Path) -> dict[str, Any]:
    """An APT run's gates.json (lambda, mean token gate and effective = lambda x mean gate, per layer)."""
    path = directory / "gates.json"
    return {"gates": json.loads(path.read_text())} if method == "apt" and path.exists() else {}


def init_effective(config_file: Path) -> float | None:
    """The effective gate at step 0: lambda_init x sigmoid(0) = lambda_init / 2 with gate_init 'zeros'."""
    adapter = yaml.safe_load(config_file.read_text())["adapter"]
    return 0.5 * float(adapter["lambda_init"]) if adapter.get("gate_init") == "zeros" else None


def gate_analysis(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task: APT's effective gate per layer averaged over seeds, the top layers, top vs bottom half."""
    out: dict[str, dict[str, Any]] = {}
    for task in SWEEP.tasks:
        gates = [r["gates"] for r in records if r["task"] == task and r["method"] == "apt" and r.get("gates")]
        if not gates:
            continue
        layers = gates[0]["layers_used"]
        n = len(layers)
        eff = [statistics.fmean(g["effective"][i] for g in gates) for i in range(n)]
        eff_std = [mean_std([g["effective"][i] for g in gates])[1] for i in range(n)]
        lam = [statistics.fmean(g["lambda"][i] for g in gates) for i in range(n)]
        order = sorted(range(n), key=lambda i: -eff[i])
        bottom, top = statistics.fmean(eff[: n // 2]), statistics.fmean(eff[n - n // 2:])
        rel_spread = (max(eff) - min(eff)) / statistics.fmean(eff)
        if rel_spread < FLAT_SPREAD:
            verdict = f"flat: no layer preference (max-min = {rel_spread:.1%} of the mean)"
        else:
            verdict = f"{'top' if top > bottom else 'bottom'} layers dominate (max-min = {rel_spread:.1%} of the mean)"
        out[task] = {
            "n_seeds": len(gates), "layers": layers, "effective_mean": eff, "effective_std": eff_std,
            "lambda_mean": lam, "mean_token_gate_per_layer": [1.0 * e / l if l else 0.0 for e, l in zip(eff, lam)],
            "ranking": [layers[i] for i in order], "top_layers": [layers[i] for i in order[:2]],
            "bottom_half_mean": bottom, "top_half_mean": top,
            "dominant_half": "top" if top > bottom else "bottom", "relative_spread": rel_spread,
            "verdict": verdict,
            "init_effective": init_effective(SWEEP.run_dir(task, "apt", SWEEP.seeds[0]) / "config.yaml"),
        }
    return out


def gates_markdown(records: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The gate analysis as JSON and Markdown lines."""
    gates = gate_analysis(records)
    lines = []
    for task, g in gates.items():
        eff = ", ".join(f"L{layer}: {v:.3f} ± {s:.3f}" for layer, v, s in
                        zip(g["layers"], g["effective_mean"], g["effective_std"]))
        lam = ", ".join(f"{v:.3f}" for v in g["lambda_mean"])
        lines += [f"APT gates, {task} ({g['n_seeds']} seeds): effective (lambda x mean token gate) per layer: {eff}.",
                  f"  lambda per layer: {lam}. Ranking (high to low): {g['ranking']}; top layers "
                  f"{g['top_layers']}; bottom half mean {g['bottom_half_mean']:.3f} vs top half mean "
                  f"{g['top_half_mean']:.3f} -> {g['verdict']} "
                  f"(value at initialisation: {g['init_effective']}).", ""]
    return {"gates": gates}, "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(SWEEP, extra=read_gates, analyses=gates_markdown))
