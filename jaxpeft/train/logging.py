"""Run logging: a metrics.jsonl log, TensorBoard scalars, a tqdm progress bar and PNG plots of a run.

Imports tqdm, tensorboardX (a pure-protobuf event writer; never TensorFlow or flax.metrics.tensorboard) and,
only when plotting, matplotlib on its Agg canvas (no display, pyplot's global state untouched). No jax.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["METRICS_FILE", "RunLogger", "plot_run", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
"""One JSON object per `RunLogger.log` call: {"step", "split", "time", **metrics}, appended across resumes."""

_RESERVED = ("step", "split", "time")


def _scalar(name: str, value: Any) -> int | float:
    """A JSON-able Python number from an int, float, numpy or (host) jax scalar."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}: {value!r}") from None


class RunLogger:
    """Logs one training run into `run_dir`: metrics.jsonl, TensorBoard events under tb/, a progress bar, plots.

    Use as a context manager or call `close()` at the end. Re-opening the same `run_dir` (a resumed run) appends
    to metrics.jsonl and adds a new TensorBoard event file; readers keep the last value logged for a step.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        total_steps: int,
        start_step: int = 0,
        enable_progress: bool = True,
        tensorboard: bool = True,
        log_every: int = 10,
        write: bool = True,
    ) -> None:
        """Open (or create) `run_dir`.

        Args:
          total_steps: the step the run ends at (the progress bar's total).
          start_step: the step the run starts from (non-zero after resuming from a checkpoint).
          enable_progress: show a tqdm bar on stderr; it is also off whenever stderr is not a terminal.
          tensorboard: also write TensorBoard scalars to run_dir/tb (needs the `tensorboardX` package;
            without it a warning is issued and only metrics.jsonl is written).
          log_every: when stderr is not a terminal (a pod's or batch job's log file) the bar is replaced by a
            plain line every `log_every` steps: step, loss, tokens/s, ETA.
          write: False for every process but the first of a multi-process run: nothing is written or shown.
        """
        self.write = bool(write)
        self.log_every = max(1, int(log_every))
        if not self.write:
            enable_progress, tensorboard = False, False
        self.run_dir = Path(run_dir)
        if write:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self._closed = False

        path = self.run_dir / METRICS_FILE
        # A run killed mid-write may leave a partial last line: start ours on a fresh line.
        needs_newline = self.write and path.exists() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
        self._file = open(path, "a", encoding="utf-8") if self.write else open(os.devnull, "w", encoding="utf-8")
        if needs_newline:
            self._file.write("\n")
            self._file.flush()

        self._writer = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                warnings.warn(
                    "tensorboardX is not installed, so no TensorBoard events are written (metrics.jsonl still is); "
                    "`pip install tensorboardX` or pass tensorboard=False",
                    stacklevel=2,
                )
            else:
                self._writer = SummaryWriter(str(self.run_dir / "tb"))

        from tqdm.asyncio import tqdm as asyncio_tqdm
        from tqdm.auto import tqdm
        from tqdm.std import tqdm as std_tqdm

        # disable=None lets tqdm switch itself off when stderr is not a TTY (CI logs, redirected output). In a
        # Jupyter kernel (stderr is no TTY there either) tqdm.auto picks the widget bar, which we keep on.
        if not enable_progress:
            disable: bool | None = True
        else:
            disable = None if tqdm in (asyncio_tqdm, std_tqdm) else False
        self._bar = tqdm(
            total=self.total_steps,
            initial=self.start_step,
            disable=disable,
            dynamic_ncols=True,
            unit="step",
            file=sys.stderr,
        )
        # Throughput counts from the first progress() call, so jit compilation of step one is not averaged in.
        self._t0: float | None = None
        self._t0_step = self.start_step
        self._tokens = 0
        # plain lines instead of the bar where no terminal shows it (and no notebook widget replaces it)
        self._plain = bool(enable_progress) and disable is None and not _stderr_is_tty()

    # -------------------------------------------------------------------------------------------- logging

    def log(self, step: int, metrics: Mapping[str, float], *, split: str = "train") -> None:
        """Append {"step", "split", "time", **metrics} to metrics.jsonl (flushed at once) and to TensorBoard.

        Values may be Python, numpy or host jax scalars; NaN/inf are kept (Python's json reads them back).
        TensorBoard tags are "split/name", e.g. "train/loss", "eval/accuracy".
        """
        if self._closed:
            raise RuntimeError("RunLogger.log() called after close()")
        clash = [k for k in metrics if k in _RESERVED]
        if clash:
            raise ValueError(f"metric names {clash} are reserved for the record's own fields {list(_RESERVED)}")
        values = {str(k): _scalar(str(k), v) for k, v in metrics.items()}
        record = {"step": int(step), "split": str(split), "time": time.time(), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(f"{split}/{name}", value, int(step))
            self._writer.flush()

    def progress(self, step: int, loss: float | None = None, tokens: int = 0) -> None:
        """Move the bar to `step` (the number of completed steps) and show loss and tokens/s.

        `tokens` is the number of tokens processed since the previous call. The bar's ETA comes from tqdm's
        smoothed step rate. Does nothing visible when the bar is disabled.
        """
        if self._closed or (self._bar.disable and not self._plain):
            return
        now = time.perf_counter()
        postfix: dict[str, str] = {}
        if self._t0 is None:
            self._t0 = now
        else:
            self._tokens += int(tokens)
            if self._tokens and now > self._t0:
                postfix["tok/s"] = f"{self._tokens / (now - self._t0):,.0f}"
        if loss is not None:
            postfix = {"loss": f"{float(loss):.4f}", **postfix}
        if self._plain:
            if int(step) % self.log_every == 0 or int(step) == self.total_steps:
                self._plain_line(int(step), postfix, now)
            return
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        delta = int(step) - self._bar.n
        if delta > 0:
            self._bar.update(delta)
        else:
            self._bar.refresh()

    def _plain_line(self, step: int, postfix: dict[str, str], now: float) -> None:
        done = step - self._t0_step - 1  # steps timed since the first call
        eta = ""
        if done > 0 and self._t0 is not None and now > self._t0:
            left = (self.total_steps - step) * (now - self._t0) / done
            eta = f" eta {int(left) // 3600}:{int(left) % 3600 // 60:02d}:{int(left) % 60:02d}"
        fields = "".join(f" {k} {v}" for k, v in postfix.items())
        print(f"step {step}/{self.total_steps}{fields}{eta}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Close the bar, the TensorBoard writer and the log, then write the run's plots (see `plot_run`).

        Safe to call twice. A plotting failure (e.g. matplotlib missing) is a warning, not an error.
        """
        if self._closed:
            return
        self._closed = True
        self._bar.close()
        if self._writer is not None:
            self._writer.close()
        self._file.close()
        if not self.write:
            return
        try:
            plot_run(self.run_dir)
        except Exception as e:  # plots are a convenience; never fail a finished run over them
            warnings.warn(f"could not plot {self.run_dir}: {type(e).__name__}: {e}", stacklevel=2)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


# ------------------------------------------------------------------------------------------------- reading


def read_metrics(run_dir: str | os.PathLike, *, raw: bool = False) -> list[dict]:
    """The records of run_dir/metrics.jsonl; [] when there is none.

    By default duplicates are resolved: a resumed run re-logs the steps after its checkpoint, so records are
    merged per (split, step) with the later value winning for each key, and returned sorted by step.
    `raw=True` returns every line as written. Unreadable lines (a run killed mid-write) are skipped with a warning.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{lineno}: skipping unreadable line {line[:80]!r}", stacklevel=2)
                continue
            if isinstance(rec, dict) and "step" in rec:
                records.append(rec)
    if raw:
        return records
    merged: dict[tuple[str, int], dict] = {}
    for rec in records:
        merged.setdefault((rec.get("split", "train"), rec["step"]), {}).update(rec)
    return sorted(merged.values(), key=lambda r: r["step"])  # stable: splits keep first-seen order within a step


def _series(records: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in records:
        if r.get("split") == split and isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool):
            steps.append(r["step"])
            values.append(float(r[key]))
    return steps, values


def _loss_key(records: list[dict], split: str) -> str | None:
    for key in ("loss", f"{split}_loss"):
        if _series(records, split, key)[0]:
            return key
    return None


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Write PNG plots of run_dir/metrics.jsonl and return the paths written.

    - loss.png: train loss vs step, with eval loss (and any other split's loss) overlaid when present;
    - eval_metrics.png: one subplot per other numeric eval metric vs step.
    A plot with nothing to show is not written. Duplicated steps (resumed runs) keep their last value.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    written: list[Path] = []
    splits = list(dict.fromkeys(r.get("split", "train") for r in records))
    splits.sort(key=lambda s: (s != "train", s != "eval"))  # train first, then eval, then the rest

    # ---- loss.png
    curves = []
    for split in splits:
        key = _loss_key(records, split)
        if key is not None:
            curves.append((split, *_series(records, split, key)))
    if curves:
        fig = Figure(figsize=(7, 4.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for split, steps, values in curves:
            style = {"marker": "o", "markersize": 4} if split != "train" or len(steps) < 20 else {}
            ax.plot(steps, values, label=f"{split} loss", linewidth=1.4, **style)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"loss: {run_dir.name}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = run_dir / "loss.png"
        fig.savefig(out)
        written.append(out)

    # ---- eval_metrics.png
    eval_loss = _loss_key(records, "eval")
    names = list(
        dict.fromkeys(
            k
            for r in records
            if r.get("split") == "eval"
            for k, v in r.items()
            if k not in _RESERVED and k != eval_loss and isinstance(v, int | float) and not isinstance(v, bool)
        )
    )
    if names:
        cols = min(3, len(names))
        rows = math.ceil(len(names) / cols)
        fig = Figure(figsize=(4.2 * cols, 3.2 * rows), dpi=100)
        FigureCanvasAgg(fig)
        for i, name in enumerate(names):
            ax = fig.add_subplot(rows, cols, i + 1)
            steps, values = _series(records, "eval", name)
            ax.plot(steps, values, marker="o", markersize=4, linewidth=1.4, color=f"C{i % 10}")
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
        fig.suptitle(f"eval metrics: {run_dir.name}")
        fig.tight_layout()
        out = run_dir / "eval_metrics.png"
        fig.savefig(out)
        written.append(out)
    return written
