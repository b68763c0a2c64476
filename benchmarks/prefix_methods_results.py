"""APT vs P-tuning v2 vs LoRA vs a head-only linear probe on all-MiniLM-L6-v2: run, collect, tabulate.

Command (from the repository root, inside the project's virtual environment):

    python benchmarks/prefix_methods_results.py                  # train all 24 runs, then collect
    python benchmarks/prefix_methods_results.py --collect-only   # only read the run directories

Each run is one `jaxpeft train` process (see `train_command`), for example

    jaxpeft train configs/apt_minilm_sentiment.yaml --set train.seed=0 \
        --set train.output_dir=runs/results/sentiment/apt/seed0 \
        --set train.eval_before_training=false --set train.steps=30 --set optim.warmup_steps=3 \
        --set train.eval_every=30 --set train.checkpoint_every=30

with JAX's persistent compilation cache switched on (JAX_COMPILATION_CACHE_DIR=runs/jax_cache) so that the
evaluation and gate-probe programs compile once per task and method instead of once per run. Runs are
sequential (never two training processes at once). A run directory whose final evaluation is already logged
is not trained again (pass --force to retrain); an incomplete one is deleted and trained from scratch.

Outputs: benchmarks/results/prefix_methods_minilm.json (every run's final metrics, trainable parameters,
wall time, APT gate statistics, and the per-task summary) and a Markdown table plus the APT gate analysis on
stdout (also written to benchmarks/results/prefix_methods_minilm.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("sentiment", "ner")
METHODS = ("apt", "ptuning_v2", "lora", "head_only")
BASELINE = "head_only"
SEEDS = (0, 1, 2)
MAIN_METRICS: dict[str, tuple[str, ...]] = {"sentiment": ("accuracy", "macro_f1"), "ner": ("span_f1",)}
EXTRA_METRICS = ("eval_loss",)  # reported too (mean +- std): it moves even when the argmax predictions do not
METHOD_NAMES = {"apt": "APT", "ptuning_v2": "P-tuning v2", "lora": "LoRA (r=8, q,v)", "head_only": "head only"}
RUNS_ROOT = Path("runs/results")
CACHE_DIR = Path("runs/jax_cache")
RESULTS_JSON = Path("benchmarks/results/prefix_methods_minilm.json")
RESULTS_MD = Path("benchmarks/results/prefix_methods_minilm.md")
TIMING_FILE = "benchmark_timing.json"  # written by this script into each run directory
LOG_FILE = "train.log"  # stdout + stderr of the run's `jaxpeft train` process
FLAT_SPREAD = 0.05  # per-layer effective gates within 5% of their mean: no layer preference
_PARAMS_LINE = re.compile(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)")


def config_path(task: str, method: str) -> Path:
    """The YAML config of one task and method."""
    return Path("configs") / f"{method}_minilm_{task}.yaml"


BUDGET: dict[str, dict[str, int]] = {"sentiment": {"steps": 250, "warmup": 20}, "ner": {"steps": 250, "warmup": 20}}
"""The measured step budget per task (same for every method); equal to the configs' own (250 steps, 20 warmup)."""

DATA_OVERRIDES: dict[str, dict[str, str]] = {"sentiment": {"data.max_length": "64", "data.buckets": "[64]"}}
"""Per-task data settings that differ from the configs (which a user trains with): sentiment reviews are truncated
at 64 tokens instead of 128, which halves the cost of a step so that the 24 runs fit in about an hour of 2 CPU
cores. Chosen before any 250-step sentiment run was trained."""


def config_steps(task: str, method: str) -> int:
    """The step budget of a task's runs (also used as eval_every and checkpoint_every)."""
    return BUDGET[task]["steps"]


def run_dir(task: str, method: str, seed: int) -> Path:
    """Where one run writes metrics.jsonl, config.yaml, adapter/ (and gates.json for APT)."""
    return RUNS_ROOT / task / method / f"seed{seed}"


def train_command(task: str, method: str, seed: int) -> list[str]:
    """The exact `jaxpeft train` command of one run."""
    sets = {
        "train.seed": seed,
        "train.output_dir": run_dir(task, method, seed).as_posix(),
        "train.eval_before_training": "false",
        "train.steps": config_steps(task, method),
        "optim.warmup_steps": BUDGET[task]["warmup"],
        "train.eval_every": config_steps(task, method),
        "train.checkpoint_every": config_steps(task, method),
        **DATA_OVERRIDES.get(task, {}),
    }
    cmd = ["jaxpeft", "train", config_path(task, method).as_posix()]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


def final_eval(directory: Path, steps: int) -> dict[str, float] | None:
    """The evaluation logged at the last step of a run, or None when the run did not finish."""
    from jaxpeft.train.logging import read_metrics

    evals = [r for r in read_metrics(directory) if r.get("split") == "eval" and r["step"] == steps]
    if not evals:
        return None
    return {k: float(v) for k, v in evals[-1].items() if k not in ("step", "split", "time")}


def train_one(task: str, method: str, seed: int, force: bool) -> float | None:
    """Train one run unless its final evaluation is already there; returns the wall time (s) when it ran."""
    directory, steps = run_dir(task, method, seed), config_steps(task, method)
    if not force and final_eval(directory, steps) is not None:
        print(f"[skip] {directory}: already finished", flush=True)
        return None
    if directory.exists():
        shutil.rmtree(directory)  # never resume a stale or partial run (another step budget, a killed run)
    directory.mkdir(parents=True)
    cmd = train_command(task, method, seed)
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str((ROOT / CACHE_DIR).resolve()))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    print(f"[run ] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(directory / LOG_FILE, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    wall = time.perf_counter() - t0
    (directory / TIMING_FILE).write_text(json.dumps({"wall_s": wall, "returncode": proc.returncode,
                                                     "command": cmd}, indent=2) + "\n")
    failed = f" FAILED (exit {proc.returncode}, see {directory / LOG_FILE})" if proc.returncode else ""
    print(f"[{'FAIL' if proc.returncode else 'done'}] {directory}: {wall:.0f} s{failed}", flush=True)
    return wall


def trainable_params(directory: Path) -> tuple[int, int, str]:
    """(trainable, all, source): from the run's printed line, else computed from the run's config."""
    log = directory / LOG_FILE
    if log.exists():
        m = _PARAMS_LINE.search(log.read_text(encoding="utf-8", errors="replace"))
        if m:
            return int(m.group(1).replace(",", "")), int(m.group(2).replace(",", "")), "printed"
    return (*computed_params(directory / "config.yaml"), "computed")


def computed_params(config_file: Path) -> tuple[int, int]:
    """(trainable, all) parameter counts of a run config, as `jaxpeft train` prints them."""
    import jax

    from jaxpeft.adapters import AdaptedModel
    from jaxpeft.adapters.partition import count_parameters
    from jaxpeft.loading.pretrained import load_pretrained
    from jaxpeft.train.config import load_config
    from jaxpeft.train.tasks import MODEL_TASK

    cfg = load_config(config_file)
    labels = json.loads((Path(cfg.data.path) / "labels.json").read_text())
    pre = load_pretrained(cfg.model.checkpoint, task=MODEL_TASK[cfg.model.task], num_labels=len(labels))
    model = AdaptedModel.wrap(pre.module).add("default", cfg.adapter_config())
    state = model.init(jax.random.key(cfg.train.seed), pre.params)
    return count_parameters(model, state, pre.params)


def read_gates(directory: Path) -> dict[str, Any] | None:
    """An APT run's gates.json (lambda, mean token gate and effective = lambda x mean gate, per layer)."""
    path = directory / "gates.json"
    return json.loads(path.read_text()) if path.exists() else None


def collect() -> list[dict[str, Any]]:
    """One record per run: task, method, seed, final metrics, parameter counts, wall time, gates."""
    records = []
    for task in TASKS:
        for method in METHODS:
            steps = config_steps(task, method)
            for seed in SEEDS:
                directory = run_dir(task, method, seed)
                metrics = final_eval(directory, steps)
                timing = directory / TIMING_FILE
                rec: dict[str, Any] = {
                    "task": task, "method": method, "seed": seed, "run_dir": directory.as_posix(),
                    "steps": steps, "finished": metrics is not None, "metrics": metrics,
                    "wall_s": json.loads(timing.read_text())["wall_s"] if timing.exists() else None,
                    "command": " ".join(train_command(task, method, seed)),
                }
                if metrics is not None:
                    rec["trainable_params"], rec["all_params"], rec["params_source"] = trainable_params(directory)
                    if method == "apt":
                        rec["gates"] = read_gates(directory)
                records.append(rec)
    return records


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per task and method: mean/std of each main metric over seeds, difference to head-only, parameters."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for task in TASKS:
        summary[task] = {}
        for method in METHODS:
            done = [r for r in records if r["task"] == task and r["method"] == method and r["finished"]]
            if not done:
                continue
            entry: dict[str, Any] = {"n_seeds": len(done), "trainable_params": done[0]["trainable_params"],
                                     "all_params": done[0]["all_params"],
                                     "wall_s_mean": statistics.fmean(r["wall_s"] for r in done if r["wall_s"])
                                     if any(r["wall_s"] for r in done) else None}
            for metric in MAIN_METRICS[task] + EXTRA_METRICS:
                values = [r["metrics"][metric] for r in done]
                mean, std = mean_std(values)
                entry[metric] = {"mean": mean, "std": std, "values": values}
            summary[task][method] = entry
        base = summary[task].get(BASELINE)
        for method, entry in summary[task].items():
            for metric in MAIN_METRICS[task]:
                if base is None:
                    continue
                diff = entry[metric]["mean"] - base[metric]["mean"]
                entry[metric]["diff_to_head_only"] = diff
                # "clearly better": the gap exceeds the two seed spreads added together
                entry[metric]["clearly_beats_head_only"] = (method != BASELINE and
                                                            diff > entry[metric]["std"] + base[metric]["std"])
    return summary


def init_effective(config_file: Path) -> float | None:
    """The effective gate at step 0: lambda_init x sigmoid(0) = lambda_init / 2 with gate_init 'zeros'."""
    adapter = yaml.safe_load(config_file.read_text())["adapter"]
    return 0.5 * float(adapter["lambda_init"]) if adapter.get("gate_init") == "zeros" else None


def gate_analysis(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task: APT's effective gate per layer averaged over seeds, the top layers, top vs bottom half."""
    out: dict[str, dict[str, Any]] = {}
    for task in TASKS:
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
            "init_effective": init_effective(run_dir(task, "apt", SEEDS[0]) / "config.yaml"),
        }
    return out


def _fmt_params(n: int) -> str:
    return f"{n:,d}"


def markdown(summary: dict[str, Any], gates: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """The results table and the gate analysis as Markdown."""
    lines = ["| task | method | steps | metric (mean ± std, 3 seeds) | Δ vs head only | eval loss | "
             "trainable params | wall s / run |", "|---|---|---|---|---|---|---|---|"]
    for task, methods in summary.items():
        for method, e in methods.items():
            steps = next(r["steps"] for r in records if r["task"] == task and r["method"] == method)
            cells, diffs = [], []
            for metric in MAIN_METRICS[task]:
                m = e[metric]
                cells.append(f"{metric} {m['mean']:.3f} ± {m['std']:.3f}")
                if method == BASELINE:
                    diffs.append("—")
                else:
                    mark = " (clear)" if m["clearly_beats_head_only"] else ""
                    diffs.append(f"{m['diff_to_head_only']:+.3f}{mark}")
            wall = f"{e['wall_s_mean']:.0f}" if e["wall_s_mean"] else "?"
            seeds = "" if e["n_seeds"] == len(SEEDS) else f" ({e['n_seeds']} seeds)"
            loss = f"{e['eval_loss']['mean']:.4f} ± {e['eval_loss']['std']:.4f}"
            lines.append(f"| {task} | {METHOD_NAMES[method]}{seeds} | {steps} | {'; '.join(cells)} | "
                         f"{'; '.join(diffs)} | {loss} | {_fmt_params(e['trainable_params'])} | {wall} |")
    lines += ["", "(clear) = the gap to head only exceeds the sum of both seed standard deviations "
              "(sample std, ddof=1).", ""]
    for task, g in gates.items():
        eff = ", ".join(f"L{layer}: {v:.3f} ± {s:.3f}" for layer, v, s in
                        zip(g["layers"], g["effective_mean"], g["effective_std"]))
        lam = ", ".join(f"{v:.3f}" for v in g["lambda_mean"])
        lines += [f"APT gates, {task} ({g['n_seeds']} seeds): effective (lambda x mean token gate) per layer: {eff}.",
                  f"  lambda per layer: {lam}. Ranking (high to low): {g['ranking']}; top layers "
                  f"{g['top_layers']}; bottom half mean {g['bottom_half_mean']:.3f} vs top half mean "
                  f"{g['top_half_mean']:.3f} -> {g['verdict']} "
                  f"(value at initialisation: {g['init_effective']}).", ""]
    failed = [r["run_dir"] for r in records if not r["finished"]]
    if failed:
        lines.append(f"Unfinished runs ({len(failed)}): " + ", ".join(failed))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collect-only", action="store_true", help="do not train; only read the run dirs")
    parser.add_argument("--force", action="store_true", help="retrain runs that already finished")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="tasks to train")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    t0 = time.perf_counter()
    if not args.collect_only:
        for task in args.tasks:
            for seed in SEEDS:
                for method in METHODS:
                    train_one(task, method, seed, args.force)
    sweep_s = time.perf_counter() - t0
    records = collect()
    summary, gates = summarize(records), gate_analysis(records)
    walls = [r["wall_s"] for r in records if r["wall_s"]]
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps({
        "model": "all-minilm-l6-v2", "seeds": list(SEEDS), "main_metrics": MAIN_METRICS,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0]},
        "total_train_wall_s": sum(walls), "collect_only": args.collect_only, "this_invocation_s": sweep_s,
        "summary": summary, "gates": gates, "runs": records,
    }, indent=2) + "\n")
    text = markdown(summary, gates, records)
    RESULTS_MD.write_text(text + "\n")
    print(text)
    print(f"\nsum of run wall times: {sum(walls):.0f} s ({len(walls)} runs); wrote {RESULTS_JSON} and {RESULTS_MD}")
    return 0 if all(r["finished"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
