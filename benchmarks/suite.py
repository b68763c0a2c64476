"""The whole benchmark suite in one command: every comparison of issue 11 in its own processes, in order, then
a Markdown table with the machine's info (benchmarks/results/suite.md; raw numbers in benchmarks/results/*.json).

Usage: python benchmarks/suite.py [--quick]     (about 30 minutes on 2 CPU cores; --quick: a smoke run)
Run it on a quiet machine: every ratio is measured against its peer in the same run, but a busy machine still
blurs them. docs/performance.md shows the latest table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, machine

HERE = Path(__file__).resolve().parent
METHODS = ["lora", "dora", "ia3", "prefix", "kasa"]


def _run(script: str, *args: str) -> None:
    print(f"\n$ python benchmarks/{script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True, cwd=HERE.parent,
                   env=dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu")))


def _load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _x(v, fmt="%.2fx"):
    return fmt % v if isinstance(v, (int, float)) else "-"


def _mark(v, ok) -> str:
    return "" if not isinstance(v, (int, float)) else (" (met)" if ok(v) else " (**missed**)")


def markdown(wall_s: float) -> str:
    m = machine()
    lines = [f"# Benchmark suite ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {m.get('cpu', '?')}, {m['cpus']} CPU cores, {m['platform']}; python {m['python']}, "
             f"jax {m['jax']}, torch {m['torch']} (CPU, float32), peft {m['peft']}, transformers {m['transformers']}. "
             f"Suite wall time {wall_s / 60:.1f} min (`python benchmarks/suite.py`).", ""]
    peak_run = _load("matmul_peak")
    peak = peak_run.get("gflops_per_s", {})
    lines += [f"## Matmul peak (GFLOP/s, {peak_run.get('n')}^2 float matrices, best of the repeats)", "", "| JAX f32 | JAX bf16 | PyTorch f32 |", "|---|---|---|",
              f"| {peak.get('jax_f32', 0):.0f} | {peak.get('jax_bf16', 0):.0f} | {peak.get('torch_f32', 0):.0f} |", ""]
    first = (_load("train_vs_peft").get("rows") or [{}])[0]
    lines += [f"## Training against Hugging Face PEFT (batch {first.get('batch')} x {first.get('seq')}, AdamW, "
              "float32, random weights with the real vocabularies)", "",
              "Targets: every position in the loss >= 1.0x PEFT tokens/s, peak RSS <= 0.7x, >= 75% of JAX's f32 "
              "matmul peak; SFT >= 1.3x.", "",
              "| shapes | method | loss on | jaxpeft tok/s | PEFT tok/s | speed | jaxpeft MiB | PEFT MiB | memory | "
              "jaxpeft GFLOP/s | share of JAX f32 peak |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("train_vs_peft", "train_vs_peft_sft"):
        for r in _load(name).get("rows", []):
            j, t = r["jaxpeft"], r["peft"]
            target = 1.3 if r["sft"] else 1.0
            lines.append(
                f"| {r['model']} | {r['method']} | {'SFT (last 32 tokens)' if r['sft'] else 'every position'} | "
                f"{_x(j['tokens_per_s'], '%.0f')} | {_x(t['tokens_per_s'], '%.0f') if not t.get('error') else 'n/a: ' + t['error']} | "
                f"{_x(r['speed_ratio'])}{_mark(r['speed_ratio'], lambda v: v >= target)} | "
                f"{_x(j['peak_rss_mib'], '%.0f')} | {_x(t['peak_rss_mib'], '%.0f')} | "
                f"{_x(r['rss_ratio'])}{_mark(r['rss_ratio'], lambda v: v <= 0.7) if not r['sft'] else ''} | "
                f"{_x(r.get('jaxpeft_gflops_per_s'), '%.0f')} | {_x(100 * r['jaxpeft_peak_fraction'] if r.get('jaxpeft_peak_fraction') else None, '%.0f%%')} |")
    ov = _load("overheads").get("ratios", {})
    lines += ["", "## Method overheads (one process, SmolLM2 shapes, batch 8 x 128, SFT loss)", "",
              "| comparison | ratio | target |", "|---|---|---|",
              f"| KaSA / LoRA train step | {_x(ov.get('kasa_vs_lora'))}{_mark(ov.get('kasa_vs_lora'), lambda v: v <= 1.05)} | <= 1.05x |",
              f"| APT / prefix tuning train step | {_x(ov.get('apt_vs_prefix'))}{_mark(ov.get('apt_vs_prefix'), lambda v: v <= 1.15)} | <= 1.15x |",
              f"| IMSM (over LoRA) / LoRA train step | {_x(ov.get('imsm_vs_lora'))}{_mark(ov.get('imsm_vs_lora'), lambda v: v <= 1.6)} | <= 1.6x (issue 9) |",
              f"| merged LoRA / base forward | {_x(ov.get('merged_vs_base'))}{_mark(ov.get('merged_vs_base'), lambda v: abs(v - 1) <= 0.02)} | within 2% |"]
    lines += ["", "## Greedy decoding with KV cache (SmolLM2 shapes, 32-token prompt, 64 new tokens)", "",
              "| batch | jaxpeft LoRA tok/s | transformers + PEFT tok/s | speed | jaxpeft IMSM tok/s | IMSM / LoRA |",
              "|---|---|---|---|---|---|"]
    for r in _load("decode").get("rows", []):
        t = r["tokens_per_s"]
        lines.append(f"| {r['batch']} | {t['jaxpeft_lora']:.0f} | {t['peft_lora']:.0f} | "
                     f"{_x(r['speed_ratio'])}{_mark(r['speed_ratio'], lambda v: v >= 1.5)} | {t['jaxpeft_imsm']:.0f} | "
                     f"{_x(r['imsm_vs_lora'])} |")
    q = _load("quickstart_vs_peft")
    if q:
        jm, pm, rt = q["median"]["jaxpeft"], q["median"]["peft"], q["ratios"]
        lines += ["", f"## The quickstart recipe, {q['steps']} steps, against an HF PEFT loop (same weights, rows, order)",
                  "", "| | jaxpeft | HF PEFT | ratio | target |", "|---|---|---|---|---|",
                  f"| whole run (load, compile, train, final eval) | {jm['wall_s']:.1f} s | {pm['wall_s']:.1f} s | "
                  f"{_x(rt['wall_s'])}{_mark(rt['wall_s'], lambda v: v <= 0.75)} | <= 0.75x |",
                  f"| training steps after the first | {jm['steps_after_first_s']:.1f} s | {pm['steps_after_first_s']:.1f} s | "
                  f"{_x(rt['steps_after_first_s'])}{_mark(rt['steps_after_first_s'], lambda v: v <= 0.75)} | <= 0.75x |"]
    c = _load("compile")
    if c:
        s, u = c["scan"], c["unrolled"]
        lines += ["", f"## Train-step compile time, SmolLM2-135M (LoRA, batch {c['batch']} x {c['seq']}, cache off)", "",
                  "| layers | trace + lower s | compile s | first step s |", "|---|---|---|---|",
                  f"| scanned | {s['trace_lower_s']:.1f} | {s['compile_s']:.1f} | {s['first_step_s']:.1f} |",
                  f"| unrolled | {u['trace_lower_s']:.1f} | {u['compile_s']:.1f} | {u['first_step_s']:.1f} |",
                  f"| scan / unrolled | | {_x(c['compile_ratio_scan_vs_unrolled'])} | |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny shapes and one round (numbers meaningless)")
    ap.add_argument("--markdown-only", type=float, metavar="WALL_MIN", default=None,
                    help="only rewrite results/suite.md from the JSON files (after rerunning one script by hand)")
    args = ap.parse_args()
    if args.markdown_only is not None:
        (RESULTS / "suite.md").write_text(markdown(60 * args.markdown_only))
        return
    t0 = time.perf_counter()
    q = args.quick
    _run("bench_peak.py", *(["--n", "512", "--repeats", "1"] if q else []))
    peak = _load("matmul_peak")["gflops_per_s"]["jax_f32"]
    small = ["--rounds", "1", "--steps", "1", "--batch", "2", "--seq", "16"] if q else []
    _run("bench_train_vs_peft.py", "--methods", *METHODS, "--peak-gflops", str(peak), *small)
    _run("bench_train_vs_peft.py", "--models", "smollm2", "--sft", "--peak-gflops", str(peak),
         *(small + ["--response", "4"] if q else []))
    _run("bench_overheads.py", *(["--layers", "2", "--rounds", "1", "--steps", "1"] if q else []))
    _run("bench_decode.py", *(["--batches", "1", "--new", "4", "--rounds", "1"] if q else []))
    _run("bench_quickstart.py", *(["--steps", "3", "--rounds", "1"] if q else []))
    _run("bench_compile.py", *(["--batch", "1", "--seq", "8"] if q else []))
    md = markdown(time.perf_counter() - t0)
    (RESULTS / "suite.md").write_text(md)
    print("\n" + md)


if __name__ == "__main__":
    main()
