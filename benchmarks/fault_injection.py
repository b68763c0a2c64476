"""Kill training at random steps and at named points inside the checkpoint write and the final adapter export
(jaxpeft.faults), resume it with the same command, and check the result against an uninterrupted run.

    python benchmarks/fault_injection.py                 # 20 kills; writes the table into docs/reliability.md
    python benchmarks/fault_injection.py --kills 5 --no-docs

Each kill: `jaxpeft train CONFIG` with JAXPEFT_FAULT set (SIGKILL, SIGTERM or SIGINT at a step or a named point,
drawn from a seeded generator), then an inspection of the run folder (every checkpoint under its final name
restores with matching digests, an adapter folder under its final name is complete and loads), then the same
command again without a fault; the final adapter must equal the uninterrupted run's bit for bit.
tests/train/test_faults.py runs 5 kills of this harness. Imports the standard library; jaxpeft for inspection.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 8, 2
POINTS = ("train.step", "checkpoint.begin", "checkpoint.written", "checkpoint.synced", "export.written",
          "export.renamed")
DOC = REPO / "docs" / "reliability.md"
START, END = "<!-- kill-table:start -->", "<!-- kill-table:end -->"


@dataclasses.dataclass
class Kill:
    """One injected fault and what came of it."""

    index: int
    point: str
    action: str
    step: int | None
    delay: float
    killed_rc: int | None = None
    committed: list[int] = dataclasses.field(default_factory=list)
    leftover_tmp: int = 0
    unreadable: int = 0
    resumed_from: int | None = None
    final_rc: int | None = None
    identical: bool = False
    note: str = ""

    @property
    def spec(self) -> str:
        at = f"@{self.step}" if self.step is not None else ""
        return f"{self.point}{at}:{self.action}" + (f"+{self.delay:g}" if self.delay else "")

    @property
    def ok(self) -> bool:
        return self.identical and self.unreadable == 0 and self.final_rc == 0


def draw_kills(n: int, seed: int) -> list[Kill]:
    """n faults from a seeded generator: the first six cover every point once with actions in turn (SIGKILL,
    SIGTERM, SIGKILL, SIGINT, ...), the rest draw point and action (SIGKILL twice as likely). Steps are random;
    checkpoint points fall on checkpoint steps; a `checkpoint.begin` SIGKILL comes after a random 0-50 ms delay,
    so it lands while Orbax writes."""
    rng = random.Random(seed)
    order = list(POINTS)
    rng.shuffle(order)
    kills = []
    for i in range(n):
        point = order[i] if i < len(order) else rng.choice(POINTS)
        action = (("SIGKILL", "SIGTERM", "SIGKILL", "SIGINT")[i % 4] if i < len(order)
                  else rng.choice(("SIGKILL", "SIGKILL", "SIGTERM", "SIGINT")))
        step = None if point.startswith("export") else (rng.randrange(1, STEPS) if point == "train.step"
                                                         else rng.randrange(EVERY, STEPS, EVERY))
        delay = round(rng.uniform(0.0, 0.05), 3) if point == "checkpoint.begin" else 0.0
        kills.append(Kill(i + 1, point, action, step, delay))
    return kills


def write_config(path: Path, checkpoint: Path, data: str, output_dir: Path) -> Path:
    """The harness's run: LoRA with dropout on the tiny model, grad accumulation, a checkpoint every 2 steps."""
    import yaml

    cfg = {"model": {"checkpoint": str(checkpoint)},
           "adapter": {"method": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                       "target_modules": ["q_proj", "v_proj"]},
           "data": {"path": data, "max_length": 64, "max_train_rows": 256, "max_eval_rows": 8, "buckets": [64]},
           "optim": {"lr": 1e-2, "schedule": "cosine", "warmup_steps": 2},
           "train": {"steps": STEPS, "batch_size": 4, "grad_accum": 2, "checkpoint_every": EVERY, "eval_every": 4,
                     "log_every": 1, "keep_last": 2, "eval_batch_size": 8, "eval_before_training": False,
                     "output_dir": str(output_dir), "seed": 5},
           "generation": {"eval_generate": False, "show_examples": 0}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config: Path, env: dict, log: Path, fault: str | None = None, timeout: float = 600) -> tuple[int, str]:
    """`python -m jaxpeft train CONFIG` (with JAXPEFT_FAULT=fault): (exit code, log text)."""
    env = dict(env)
    env.pop("JAXPEFT_FAULT", None)
    if fault:
        env["JAXPEFT_FAULT"] = fault
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "jaxpeft", "train", str(config)], stdout=f,
                              stderr=subprocess.STDOUT, env=env, cwd=str(REPO), timeout=timeout)
    return proc.returncode, log.read_text()


_INSPECT = threading.Lock()  # `datasets` (its tqdm lock) is not safe to load from two threads at once


def inspect(config: Path) -> tuple[list[int], int, int, str]:
    """(committed steps, leftover temporary folders, unreadable folders under a final name, notes) of a run
    folder: each checkpoint restores with matching digests, an adapter folder loads and holds its three files."""
    with _INSPECT:
        return _inspect(config)


def _inspect(config: Path) -> tuple[list[int], int, int, str]:
    from jaxpeft.adapters import AdaptedModel
    from jaxpeft.adapters.native_io import load_any
    from jaxpeft.train.config import load_config
    from jaxpeft.train.runner import _context, _restore_checkpoint

    cfg = load_config(str(config))
    out = Path(cfg.train.output_dir)
    ckpts = out / "checkpoints"
    committed = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []
    tmp = [p for p in (ckpts.iterdir() if ckpts.is_dir() else []) if "tmp" in p.name]
    tmp += [p for p in out.iterdir() if p.name.startswith(".adapter.")]
    unreadable, notes = 0, []
    ctx = _context(cfg)
    for step in committed:
        try:
            _restore_checkpoint(ctx, step)
        except Exception as e:  # noqa: BLE001 - any failure counts
            unreadable += 1
            notes.append(f"checkpoint {step}: {type(e).__name__}: {str(e)[:200]}")
    adapter = out / "adapter"
    if adapter.exists():
        files = sorted(p.name for p in adapter.iterdir())
        try:
            if files != ["README.md", "adapter_config.json", "adapter_model.safetensors"]:
                raise ValueError(f"files {files}")
            load_any(AdaptedModel.wrap(ctx.pretrained.module), ctx.pretrained.params, adapter)
        except Exception as e:  # noqa: BLE001
            unreadable += 1
            notes.append(f"adapter: {type(e).__name__}: {str(e)[:200]}")
    return committed, len(tmp), unreadable, "; ".join(notes)


def same_adapter(a: Path, b: Path) -> bool:
    """The two adapter folders hold byte-identical weights and configs."""
    return all((a / f).read_bytes() == (b / f).read_bytes()
               for f in ("adapter_model.safetensors", "adapter_config.json"))


def run_kill(kill: Kill, root: Path, checkpoint: Path, data: str, env: dict, reference: Path) -> Kill:
    """Inject one fault, inspect, resume, compare; fills in the Kill."""
    folder = root / f"kill{kill.index:02d}"
    folder.mkdir()
    config = write_config(folder / "config.yaml", checkpoint, data, folder / "run")
    kill.killed_rc, _ = train(config, env, folder / "killed.log", kill.spec)
    kill.committed, kill.leftover_tmp, kill.unreadable, kill.note = inspect(config)
    kill.final_rc, log = train(config, env, folder / "resumed.log")
    m = re.search(r"resumed from step (\d+)", log)
    kill.resumed_from = int(m.group(1)) if m else None
    if kill.final_rc == 0:
        kill.identical = same_adapter(folder / "run" / "adapter", reference)
    else:
        kill.note += f" resume failed: {log[-500:]}"
    return kill


def prepare(root: Path) -> tuple[Path, str, dict]:
    """A tiny random llama checkpoint (the test suite's) and the bundled arithmetic data; the subprocess env."""
    sys.path.insert(0, str(REPO / "tests" / "train"))
    import conftest as fixtures  # noqa: E402 - the tests' tiny checkpoint writer

    checkpoint = fixtures.write_checkpoint(root / "tiny-llama", fixtures.llama_hf_config(), "causal_lm",
                                           fixtures.char_tokenizer(),
                                           {"eos_token": "<eos>", "pad_token": "<pad>"})
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXPEFT_COMPILATION_CACHE=str(root / "xla-cache"),
               HF_DATASETS_CACHE=str(root / "hf-cache"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return checkpoint, "bundled:arithmetic", env


def run_harness(n: int, seed: int, root: Path, workers: int = 2) -> tuple[list[Kill], float]:
    """The uninterrupted reference run, then n kills (`workers` at a time); (kills, seconds)."""
    t0 = time.perf_counter()
    checkpoint, data, env = prepare(root)
    ref_cfg = write_config(root / "reference.yaml", checkpoint, data, root / "reference")
    rc, log = train(ref_cfg, env, root / "reference.log")
    if rc != 0:
        raise RuntimeError(f"the uninterrupted reference run failed:\n{log[-3000:]}")
    kills = draw_kills(n, seed)
    with ThreadPoolExecutor(workers) as pool:
        done = list(pool.map(lambda k: run_kill(k, root, checkpoint, data, env, root / "reference" / "adapter"),
                             kills))
    return done, time.perf_counter() - t0


def table(kills: list[Kill]) -> str:
    """The markdown kill table."""
    lines = ["| # | fault (JAXPEFT_FAULT) | exit code | checkpoints left | temp folders left | unreadable | "
             "resumed from | final adapter bit-identical |", "|---|---|---|---|---|---|---|---|"]
    for k in kills:
        lines.append(f"| {k.index} | `{k.spec}` | {k.killed_rc} | {k.committed or '-'} | {k.leftover_tmp} | "
                     f"{k.unreadable} | {k.resumed_from if k.resumed_from is not None else 'start'} | "
                     f"{'yes' if k.identical else 'NO'} |")
    ok = sum(k.ok for k in kills)
    lines.append("")
    lines.append(f"{ok}/{len(kills)} bit-identical resumes; {sum(k.unreadable for k in kills)} unreadable or "
                 "half-written folders under a final name.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-docs", action="store_true", help="print the table only")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="jaxpeft-faults-"))
    try:
        kills, seconds = run_harness(args.kills, args.seed, root, args.workers)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = table(kills)
    command = f"python benchmarks/fault_injection.py --kills {args.kills} --seed {args.seed}"
    print(text)
    for k in kills:
        if k.note:
            print(f"kill {k.index}: {k.note}")
    json.dump([dataclasses.asdict(k) for k in kills], sys.stdout if args.no_docs else open(
        REPO / "benchmarks" / "results" / "fault_injection.json", "w"), indent=1)
    if not args.no_docs:
        doc = DOC.read_text()
        block = f"{START}\n`{command}` ({seconds / 60:.1f} min):\n\n{text}\n{END}"
        DOC.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S))
    sys.exit(0 if all(k.ok for k in kills) else 1)


if __name__ == "__main__":
    main()
