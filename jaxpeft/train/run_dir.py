"""Guards on a run folder (train.output_dir): one run writes it at a time (a lock taken by process 0), and a resumed
run must train under the settings its checkpoints were trained with.

Imports jaxpeft.train.config only.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxpeft.train.config import ConfigError, RunConfig, load_config

LOCK_FILE = ".lock"

# keys that may change between a run and its resumption: where and how often it reports, evaluates and saves,
# how it pads and shards, how it decodes examples; none of them changes the trained weights
RESUMABLE_CHANGES = (
    "train.eval_every", "train.eval_batch_size", "train.log_every", "train.output_dir", "train.keep_last",
    "train.checkpoint_every", "train.best_metric", "train.best_mode", "train.eval_before_training", "train.resume",
    "train.prefetch", "train.compilation_cache_dir", "train.preemption_check_every", "train.update_norm_warning",
    "train.loss_chunk", "train.allow_config_change", "data.eval_split", "data.max_eval_rows", "data.buckets",
    "data.bucket_multiple", "data.max_buckets", "model.remat", "generation.", "mesh.", "metrics",
)
EXTENDABLE = ("train.steps",)
"""Keys a resumed run may change (training longer or shorter) that do change training from here on (the learning-rate
schedule ends at the new train.steps): allowed, and said when the run resumes."""


@contextlib.contextmanager
def lock_run_dir(out: Path, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `out/.lock` (created with the folder) for the block; ConfigError when another live
    process holds it. The lock is the OS's (flock): it dies with its process, so a killed run never leaves a
    stale lock. enabled=False (processes other than 0 of a multi-process run) takes nothing."""
    if not enabled:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock on this platform: run unguarded
        yield
        return
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise ConfigError(f"train.output_dir={str(out)!r} is in use by another run ({holder}): wait for it to "
                              "finish, or choose another train.output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a nested dict."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: RunConfig, new: RunConfig) -> list[tuple[str, Any, Any]]:
    """[(dotted key, old value, new value)] of the settings that differ between two run configs and change the
    trained weights (keys of RESUMABLE_CHANGES and EXTENDABLE excluded)."""
    a, b = _flat(old.model_dump(mode="json")), _flat(new.model_dump(mode="json"))
    changed = []
    for key in sorted(set(a) | set(b)):
        if key in EXTENDABLE or any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE_CHANGES):
            continue
        if a.get(key) != b.get(key):
            changed.append((key, a.get(key), b.get(key)))
    return changed


def check_resume_config(out: Path, cfg: RunConfig) -> list[str]:
    """ConfigError when `out` holds checkpoints trained under a config.yaml whose training settings differ from
    `cfg` (resuming would silently train a mix); the message names every differing key. Nothing to check without
    checkpoints, or with train.allow_config_change. Returns notes on the allowed changes that still matter (a new
    train.steps moves the end of the learning-rate schedule) for the run to print."""
    saved = out / "config.yaml"
    ckpts = out / "checkpoints"
    if not saved.exists() or not ckpts.is_dir() or not any(p.name.isdigit() for p in ckpts.iterdir()):
        return []
    try:
        old = load_config(str(saved))
    except ConfigError as e:
        if cfg.train.allow_config_change:
            return []
        raise ConfigError(f"{saved}: the config the checkpoints in {ckpts} were trained with no longer loads ({e}); "
                          "start a new train.output_dir") from e
    changes = [] if cfg.train.allow_config_change else config_changes(old, cfg)
    if changes:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes[:10])
        more = f" (and {len(changes) - 10} more)" if len(changes) > 10 else ""
        raise ConfigError(f"resuming {out} would change how its checkpoints were trained: {listed}{more}. Restore "
                          f"those values (they are in {saved}), choose a new train.output_dir, or set "
                          "train.allow_config_change: true to resume under the new settings anyway")
    notes = []
    if old.train.steps != cfg.train.steps:
        notes.append(f"note: train.steps changed from {old.train.steps} to {cfg.train.steps} since the checkpoints were "
                     f"written: the learning-rate schedule now ends at step {cfg.train.steps}")
    return notes
