"""Multi-seed method comparisons as sequential `jaxpeft train` processes: train, collect, summarise, tabulate.

The results scripts (`prefix_methods_results.py`, `svd_methods_results.py`) describe a `Sweep` (tasks, methods,
seeds, configs, the per-task `--set` overrides, the baseline) and call `main(sweep)`. Each run is one process with
JAX's persistent compilation cache on (it only saves compile time; the numbers do not change). A run directory
whose final evaluation is logged is not trained again (--force retrains); an incomplete one is deleted and
trained from scratch. Runs are sequential: never two training processes at once.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path("runs/jax_cache")
TIMING_FILE = "benchmark_timing.json"  # written by the sweep into each run directory
LOG_FILE = "train.log"  # stdout + stderr of the run's `jaxpeft train` process
_PARAMS_LINE = re.compile(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)")


@dataclass(frozen=True)
class Sweep:
    """What a results script measures.

    config: (task, method) -> the YAML config path. overrides: per task, `--set` key -> value (the step budget,
    warm-up, data settings) applied to every method of the task. main_metrics: per task, the metrics compared
    (higher is better). baseline: the method every other one is compared with.
    """

    name: str
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    method_names: dict[str, str]
    config: Callable[[str, str], Path]
    overrides: dict[str, dict[str, str]]
    main_metrics: dict[str, tuple[str, ...]]
    baseline: str
    runs_root: Path
    results_json: Path
    results_md: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    extra_metrics: tuple[str, ...] = ("eval_loss",)
    methods_per_task: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Tasks that run only some of the methods (default: all)."""

    def task_methods(self, task: str) -> tuple[str, ...]:
        return self.methods_per_task.get(task, self.methods)

    def steps(self, task: str) -> int:
        return int(self.overrides[task]["train.steps"])

    def run_dir(self, task: str, method: str, seed: int) -> Path:
        return self.runs_root / task / method / f"seed{seed}"

    def command(self, task: str, method: str, seed: int) -> list[str]:
        """The exact `jaxpeft train` command of one run (one evaluation and one checkpoint, at the end)."""
        sets = {"train.seed": seed, "train.output_dir": self.run_dir(task, method, seed).as_posix(),
                "train.eval_before_training": "false", **self.overrides[task],
                "train.eval_every": self.steps(task), "train.checkpoint_every": self.steps(task)}
        cmd = ["jaxpeft", "train", self.config(task, method).as_posix()]
        for key, value in sets.items():
            cmd += ["--set", f"{key}={value}"]
        return cmd


def final_eval(directory: Path, steps: int) -> dict[str, float] | None:
    """The evaluation logged at the last step of a run, or None when the run did not finish."""
    from jaxpeft.train.logging import read_metrics

    if not directory.exists():
        return None
    evals = [r for r in read_metrics(directory) if r.get("split") == "eval" and r["step"] == steps]
    if not evals:
        return None
    return {k: float(v) for k, v in evals[-1].items() if k not in ("step", "split", "time")}


def train_one(sweep: Sweep, task: str, method: str, seed: int, force: bool) -> float | None:
    """Train one run unless its final evaluation is already there; returns the wall time (s) when it ran."""
    directory, steps = sweep.run_dir(task, method, seed), sweep.steps(task)
    if not force and final_eval(directory, steps) is not None:
        print(f"[skip] {directory}: already finished", flush=True)
        return None
    if directory.exists():
        shutil.rmtree(directory)  # never resume a stale or partial run (another step budget, a killed run)
    directory.mkdir(parents=True)
    cmd = sweep.command(task, method, seed)
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


def trainable_params(directory: Path) -> tuple[int, int] | tuple[None, None]:
    """(trainable, all) from the run's printed `trainable params:` line."""
    log = directory / LOG_FILE
    m = _PARAMS_LINE.search(log.read_text(encoding="utf-8", errors="replace")) if log.exists() else None
    return (int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))) if m else (None, None)


def collect(sweep: Sweep, extra: Callable[[str, str, Path], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One record per run: task, method, seed, final metrics, parameter counts, wall time (+ `extra` fields)."""
    records = []
    for task in sweep.tasks:
        for method in sweep.task_methods(task):
            for seed in sweep.seeds:
                directory = sweep.run_dir(task, method, seed)
                metrics = final_eval(directory, sweep.steps(task))
                timing = directory / TIMING_FILE
                rec: dict[str, Any] = {
                    "task": task, "method": method, "seed": seed, "run_dir": directory.as_posix(),
                    "steps": sweep.steps(task), "finished": metrics is not None, "metrics": metrics,
                    "wall_s": json.loads(timing.read_text())["wall_s"] if timing.exists() else None,
                    "command": " ".join(sweep.command(task, method, seed)),
                }
                if metrics is not None:
                    rec["trainable_params"], rec["all_params"] = trainable_params(directory)
                    if extra is not None:
                        rec.update(extra(task, method, directory))
                records.append(rec)
    return records


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(sweep: Sweep, records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per task and method: mean/std of each metric over seeds, the difference to the baseline and whether it is
    clear (the gap exceeds the two seed standard deviations added together)."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for task in sweep.tasks:
        summary[task] = {}
        for method in sweep.task_methods(task):
            done = [r for r in records if r["task"] == task and r["method"] == method and r["finished"]]
            if not done:
                continue
            walls = [r["wall_s"] for r in done if r["wall_s"]]
            entry: dict[str, Any] = {"n_seeds": len(done), "trainable_params": done[0]["trainable_params"],
                                     "all_params": done[0]["all_params"],
                                     "wall_s_mean": statistics.fmean(walls) if walls else None}
            for metric in sweep.main_metrics[task] + sweep.extra_metrics:
                values = [r["metrics"][metric] for r in done if metric in r["metrics"]]
                if values:
                    mean, std = mean_std(values)
                    entry[metric] = {"mean": mean, "std": std, "values": values}
            summary[task][method] = entry
        base = summary[task].get(sweep.baseline)
        for method, entry in summary[task].items():
            for metric in sweep.main_metrics[task]:
                if base is None or metric not in entry or metric not in base:
                    continue
                diff = entry[metric]["mean"] - base[metric]["mean"]
                entry[metric]["diff_to_baseline"] = diff
                entry[metric]["clearly_better"] = (method != sweep.baseline and
                                                   diff > entry[metric]["std"] + base[metric]["std"])
                entry[metric]["clearly_worse"] = (method != sweep.baseline and
                                                  -diff > entry[metric]["std"] + base[metric]["std"])
    return summary


def table(sweep: Sweep, summary: dict[str, Any]) -> str:
    """The results table as Markdown."""
    base_name = sweep.method_names[sweep.baseline]
    lines = [f"| task | method | steps | metric (mean ± std, {len(sweep.seeds)} seeds) | Δ vs {base_name} | "
             "eval loss | trainable params | wall s / run |", "|---|---|---|---|---|---|---|---|"]
    for task, methods in summary.items():
        for method, e in methods.items():
            cells, diffs = [], []
            for metric in sweep.main_metrics[task]:
                if metric not in e:
                    continue
                m = e[metric]
                cells.append(f"{metric} {m['mean']:.3f} ± {m['std']:.3f}")
                if method == sweep.baseline or "diff_to_baseline" not in m:
                    diffs.append("—")
                else:
                    mark = " (clear)" if m["clearly_better"] else " (clearly worse)" if m["clearly_worse"] else ""
                    diffs.append(f"{m['diff_to_baseline']:+.3f}{mark}")
            wall = f"{e['wall_s_mean']:.0f}" if e["wall_s_mean"] else "?"
            n = e["n_seeds"]
            seeds = "" if n == len(sweep.seeds) else f" ({n} seed{'s' if n > 1 else ''})"
            loss = f"{e['eval_loss']['mean']:.4f} ± {e['eval_loss']['std']:.4f}" if "eval_loss" in e else "?"
            params = f"{e['trainable_params']:,d}" if e["trainable_params"] else "?"
            lines.append(f"| {task} | {sweep.method_names[method]}{seeds} | {sweep.steps(task)} | {'; '.join(cells)} | "
                         f"{'; '.join(diffs)} | {loss} | {params} | {wall} |")
    lines += ["", f"(clear) = the gap to {base_name} exceeds the sum of both seed standard deviations "
              "(sample std, ddof=1).", ""]
    return "\n".join(lines)


def main(sweep: Sweep, argv: list[str] | None = None, *,
         extra: Callable[[str, str, Path], dict[str, Any]] | None = None,
         analyses: Callable[[list[dict[str, Any]]], tuple[dict[str, Any], str]] | None = None) -> int:
    """The results-script CLI: train what is missing (or --force), collect, write JSON and Markdown.

    extra(task, method, run_dir) adds fields to a run's record; analyses(records) returns (JSON-able dict,
    Markdown) appended to the outputs (e.g. APT's gate analysis)."""
    parser = argparse.ArgumentParser(description=f"{sweep.name}: train, collect, tabulate")
    parser.add_argument("--collect-only", action="store_true", help="do not train; only read the run dirs")
    parser.add_argument("--force", action="store_true", help="retrain runs that already finished")
    parser.add_argument("--tasks", nargs="+", choices=sweep.tasks, default=list(sweep.tasks), help="tasks to train")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    t0 = time.perf_counter()
    if not args.collect_only:
        for task in args.tasks:
            for seed in sweep.seeds:
                for method in sweep.task_methods(task):
                    train_one(sweep, task, method, seed, args.force)
    invocation_s = time.perf_counter() - t0
    records = collect(sweep, extra)
    summary = summarize(sweep, records)
    more, more_md = analyses(records) if analyses else ({}, "")
    walls = [r["wall_s"] for r in records if r["wall_s"]]
    sweep.results_json.parent.mkdir(parents=True, exist_ok=True)
    sweep.results_json.write_text(json.dumps({
        "sweep": sweep.name, "seeds": list(sweep.seeds), "main_metrics": sweep.main_metrics,
        "baseline": sweep.baseline, "overrides": sweep.overrides,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0]},
        "total_train_wall_s": sum(walls), "collect_only": args.collect_only, "this_invocation_s": invocation_s,
        "summary": summary, **more, "runs": records,
    }, indent=2) + "\n")
    text = table(sweep, summary) + more_md
    failed = [r["run_dir"] for r in records if not r["finished"]]
    if failed:
        text += f"\nUnfinished runs ({len(failed)}): " + ", ".join(failed) + "\n"
    sweep.results_md.write_text(text + "\n")
    print(text)
    print(f"\nsum of run wall times: {sum(walls):.0f} s ({len(walls)} runs); wrote {sweep.results_json} and "
          f"{sweep.results_md}")
    return 0 if not failed else 1
