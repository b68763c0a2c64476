"""Run checkpoints on Orbax ``CheckpointManager``: the trainable pytree, its optax state and resume metadata.

Keeps the last N steps plus the best one, writes only a fingerprint of the frozen base, verifies digests on
restore. May import orbax, jax, numpy, jaxpeft.loading.errors and jaxpeft.faults only.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pathlib
import sys
import threading
from collections.abc import Iterator
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

from jaxpeft.faults import fault_point
from jaxpeft.loading.errors import CheckpointError


class _NoMetricsNotice(logging.Filter):
    """Orbax warns on every save without metrics when keep-best is on; steps between evaluations are
    saved without metrics on purpose (kept as latest, never as best), so that warning is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoMetricsNotice())

__all__ = ["fingerprint", "RunCheckpointer"]

_FORMAT_VERSION = 1
_RESERVED_META_KEY = "base_fingerprint"


# --------------------------------------------------------------------------------------------------
# Hashing helpers
# --------------------------------------------------------------------------------------------------


def _sorted_leaves(tree: Any) -> list[tuple[str, Any]]:
    """(path string, leaf) pairs of ``tree`` sorted by path string (stable across dict insertion order)."""
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
    return sorted(((jax.tree_util.keystr(p), leaf) for p, leaf in with_path), key=lambda e: e[0])


_LANES = 4


def _mix(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser (uint32 in, uint32 out, wrapping arithmetic)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The leaf's bits as uint32 words, one per element (two per 8-byte element, on a trailing axis)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size in (4, 8):
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 1: jnp.uint8}[size]).astype(jnp.uint32)


@jax.jit
def _checksum(x: jax.Array) -> jax.Array:
    """(_LANES,) uint32: sums over elements of a keyed mix of (global flat index, value bits), wrapping mod 2**32.

    Integer sums are exact and order-free, so the result does not depend on how `x` is sharded or how XLA
    splits the reduction: every device reduces its own shard and only _LANES words leave the devices."""
    w = _words(x)
    idx = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(w.ndim)):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2**32)
        stride *= w.shape[d]
    lanes = []
    for k in range(_LANES):
        key = jnp.uint32((0x9E3779B9 * (k + 1)) % 2**32)
        lanes.append(jnp.sum(_mix(w ^ _mix(idx * jnp.uint32(0x27D4EB2F) + key)) * jnp.uint32(2 * k + 1),
                             dtype=jnp.uint32))
    return jnp.stack(lanes)


def _leaf_digest(leaf: Any) -> bytes:
    arr = leaf if isinstance(leaf, jax.Array) else jnp.asarray(np.asarray(leaf))
    if arr.size == 0:
        return b""
    return np.asarray(_checksum(arr)).astype("<u4").tobytes()


def _update_len_prefixed(h: "hashlib._Hash", data: bytes) -> None:
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def fingerprint(frozen: Any) -> str:
    """Stable hex digest (blake2b, 32 bytes) of a param pytree: tree paths, shapes, dtypes and every value.

    Leaves are visited in sorted ``jax.tree_util.keystr`` path order, so two trees with equal paths, shapes,
    dtypes and values give the same digest regardless of dict insertion order, device placement or mesh: each
    leaf's values enter through a 128-bit order-free checksum computed where the leaf lives (`_checksum`), so a
    sharded base is never gathered to one device or host and the digest is the same on any mesh. Any changed
    value, dtype (f32 vs bf16), shape or path changes it.
    """
    h = hashlib.blake2b(digest_size=32)
    leaves = _sorted_leaves(frozen)
    h.update(len(leaves).to_bytes(8, "little"))
    for path, leaf in leaves:
        shape = tuple(int(d) for d in np.shape(leaf))
        _update_len_prefixed(h, path.encode())
        _update_len_prefixed(h, repr(shape).encode())
        dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        _update_len_prefixed(h, str(np.dtype(dtype)).encode())
        _update_len_prefixed(h, _leaf_digest(leaf))
    return h.hexdigest()


def _tree_spec(tree: Any) -> list[list[Any]]:
    """``[[path, shape, dtype], ...]`` in sorted path order, JSON-able; describes a tree without its values."""
    spec = []
    for path, leaf in _sorted_leaves(tree):
        shape = getattr(leaf, "shape", None)
        dtype = getattr(leaf, "dtype", None)
        if shape is None or dtype is None:
            arr = np.asarray(leaf)
            shape, dtype = arr.shape, arr.dtype
        spec.append([path, [int(d) for d in shape], str(np.dtype(dtype))])
    return spec


def _spec_diff(name: str, stored: list[list[Any]], like: list[list[Any]], limit: int = 5) -> list[str]:
    """Human-readable differences between a stored tree spec and the spec of a ``*_like`` tree."""
    stored_map = {p: (tuple(s), d) for p, s, d in stored}
    like_map = {p: (tuple(s), d) for p, s, d in like}
    out = []
    for p in sorted(set(stored_map) - set(like_map)):
        out.append(f"{name}{p} is in the checkpoint but not in {name}_like")
    for p in sorted(set(like_map) - set(stored_map)):
        out.append(f"{name}{p} is in {name}_like but not in the checkpoint")
    for p in sorted(set(stored_map) & set(like_map)):
        if stored_map[p] != like_map[p]:
            (ss, sd), (ls, ld) = stored_map[p], like_map[p]
            out.append(f"{name}{p}: checkpoint has shape {ss} {sd}, {name}_like has shape {ls} {ld}")
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more"]
    return out


def _abstract(tree: Any) -> Any:
    """Restore target for ``StandardRestore``: same pytree (namedtuples included), leaves -> ShapeDtypeStruct.

    jax.Array leaves keep their sharding; host (numpy / Python scalar) leaves are placed on the default device.
    """
    default_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def one(leaf: Any) -> jax.ShapeDtypeStruct:
        if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)) and getattr(leaf, "sharding", None) is not None:
            return ocp.utils.to_shape_dtype_struct(leaf)
        arr = np.asarray(leaf)
        return jax.ShapeDtypeStruct(arr.shape, arr.dtype, sharding=default_sharding)

    return jax.tree.map(one, tree)


def _fsync_tree(root: pathlib.Path) -> None:
    """Best-effort fsync of every file and directory under ``root`` and of its parent (local filesystems)."""
    dirs = []
    for dirpath, _, filenames in os.walk(root):
        dirs.append(dirpath)
        for fn in filenames:
            _fsync_path(os.path.join(dirpath, fn))
    dirs.append(str(root.parent))
    for d in dirs:
        _fsync_path(d)


def _fsync_path(path: str) -> None:
    """fsync one file or directory; best effort (some filesystems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_number(name: str, v: Any) -> float | int | bool:
    if isinstance(v, (bool, int)):
        return v
    try:
        return float(np.asarray(jax.device_get(v)).item())
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise TypeError(f"metrics[{name!r}] must be a number, got {type(v).__name__}") from e


@contextlib.contextmanager
def _quiet_background_errors() -> Iterator[None]:
    """While restoring a damaged step, Orbax/TensorStore's background tasks may die after the error that is raised
    (and reported) here; keep their tracebacks ("Exception ignored in <coroutine>", "Event loop is closed") off
    stderr."""
    old_unraisable, old_thread = sys.unraisablehook, threading.excepthook
    sys.unraisablehook = lambda unraisable: None
    threading.excepthook = lambda hook_args: None
    try:
        yield
    finally:
        sys.unraisablehook, threading.excepthook = old_unraisable, old_thread


# --------------------------------------------------------------------------------------------------
# RunCheckpointer
# --------------------------------------------------------------------------------------------------


class RunCheckpointer:
    """Checkpoints of one training run in ``directory/<step>/{trainable,opt_state,meta}`` via Orbax.

    Each step stores the trainable pytree (e.g. adapter weights ``{"layer": {"lora_a": f32[d, r], ...}}``)
    and the optax state (namedtuples of arrays, int32 ``count``) as Orbax ``StandardSave`` items and a
    JSON record (``meta`` item) with the loop's resume metadata, the base-model fingerprint, tree specs
    and blake2b digests of both trees. The frozen base model is never written.

    Retention: ``AnyPreservationPolicy([LatestN(keep_last), BestN(n=1)])`` - the last ``keep_last``
    committed steps are always kept (the latest is never deleted), plus the single best step by
    ``metrics[best_metric]`` (``best_mode`` "min" or "max"). Steps saved without a finite value for
    ``best_metric`` are never candidates for best and are retained only as recent steps.

    Atomicity: Orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it on commit; only finalized
    step directories are reported or restored, leftover temporary directories are removed on start, and
    old steps are deleted only after the new one is committed. With ``async_save=False`` ``save`` returns
    after the step is committed and fsynced; with ``async_save=True`` it returns after the device->host
    copy and the commit happens in a background thread (``wait()`` blocks until it is committed).
    Single-process only (no ``jax.distributed`` setup needed).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep_last: int = 2,
        best_metric: str | None = None,
        best_mode: str = "min",
        base_fingerprint: str,
        async_save: bool = False,
    ) -> None:
        if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1 (the latest checkpoint is always kept), got {keep_last!r}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        if not isinstance(base_fingerprint, str) or not base_fingerprint:
            raise ValueError("base_fingerprint must be a non-empty string (use jaxpeft.train.checkpoint.fingerprint)")
        self.directory = pathlib.Path(os.fspath(directory)).expanduser().absolute()
        self.keep_last = keep_last
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.base_fingerprint = base_fingerprint
        self.async_save = async_save
        self._unsynced: list[int] = []
        self._closed = False

        policies: list[Any] = [ocp_managers.LatestN(n=keep_last)]
        best_fn: Callable[[Any], float] | None = None
        if best_metric is not None:
            worst = math.inf if best_mode == "min" else -math.inf

            def best_fn(m: Any, _key: str = best_metric, _worst: float = worst) -> float:
                try:
                    return float(m[_key])
                except (KeyError, TypeError, ValueError):
                    return _worst

            # BestN sorts ascending (reverse=False) or descending (reverse=True) and keeps the LAST n,
            # so "min" needs reverse=True (smallest last). Checkpoints without metrics are not kept by it.
            policies.append(
                ocp_managers.BestN(
                    get_metric_fn=best_fn,
                    reverse=(best_mode == "min"),
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
            # best_fn is also needed (not only BestN): without it Orbax neither writes the metrics to disk nor
            # reads them back, so after a restart BestN would see no metrics and delete the old best step.
            best_fn=best_fn,
            best_mode=best_mode,
            keep_checkpoints_without_metrics=False,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    # ---------------------------------------------------------------- steps

    def _step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def _is_committed(self, step: int) -> bool:
        d = self._step_dir(step)
        return d.is_dir() and bool(ocp.path.step.is_path_finalized(d))

    def all_steps(self) -> list[int]:
        """Committed (finalized) steps, ascending. An in-flight async save is not listed until committed."""
        return sorted(s for s in self._mngr.all_steps() if self._is_committed(s))

    def latest_step(self) -> int | None:
        """Newest committed step, or None when the directory holds no checkpoint."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """Committed step with the best ``best_metric`` (ties -> newest); None without best_metric or candidates."""
        if self.best_metric is None:
            return None
        best: tuple[float, int] | None = None
        for s in self.all_steps():
            m = self._mngr.metrics(s)
            if not isinstance(m, dict) or self.best_metric not in m:
                continue
            try:
                v = float(m[self.best_metric])
            except (TypeError, ValueError):
                continue
            if not math.isfinite(v):
                continue
            key = (v if self.best_mode == "max" else -v, s)
            if best is None or key > best:
                best = key
        return None if best is None else best[1]

    # ---------------------------------------------------------------- save

    def save(self, step: int, trainable: Any, opt_state: Any, meta: dict, metrics: dict | None = None,
             extras: Any = None) -> None:
        """Write checkpoint ``step`` (trainable pytree, optax state, JSON-able ``meta``, optional ``metrics``,
        optional frozen ``extras``: the adapters' derived tensors such as SVD factors, saved so that a resume
        never depends on recomputing them, which can differ across BLAS builds and thread counts).

        ``step`` must be greater than every step already saved in this directory. ``meta`` is stored as JSON
        together with the base fingerprint (``meta["base_fingerprint"]`` on restore; a caller-supplied value
        must equal this checkpointer's). ``metrics`` (e.g. ``{"eval_loss": 1.2}``) drive keep-best; a step
        without a finite ``metrics[best_metric]`` is never the best. Blocks until committed and fsynced
        unless ``async_save``.
        """
        if self._closed:
            raise RuntimeError("RunCheckpointer is closed")
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        step = int(step)
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        if _RESERVED_META_KEY in meta and meta[_RESERVED_META_KEY] != self.base_fingerprint:
            raise ValueError(
                f"meta[{_RESERVED_META_KEY!r}] = {meta[_RESERVED_META_KEY]!r} differs from this checkpointer's "
                f"base_fingerprint {self.base_fingerprint!r}"
            )
        known = self._mngr.all_steps()  # includes an in-flight async step
        if known and step <= max(known):
            raise ValueError(
                f"cannot save step {step} in {self.directory}: step {max(known)} is already saved there; "
                "steps must increase (resume from the latest step, or use a fresh directory)"
            )
        user_meta = {k: v for k, v in meta.items() if k != _RESERVED_META_KEY}
        try:
            json.dumps(user_meta)
        except (TypeError, ValueError) as e:
            raise TypeError(f"meta must be JSON-serialisable (plain int/float/str/bool/list/dict): {e}") from e

        json_metrics = None
        if metrics is not None:
            json_metrics = {str(k): _json_number(str(k), v) for k, v in metrics.items()}
        orbax_metrics = None
        if self.best_metric is not None and json_metrics is not None and self.best_metric in json_metrics:
            v = json_metrics[self.best_metric]
            if not isinstance(v, bool) and math.isfinite(float(v)):
                orbax_metrics = json_metrics

        record = {
            "format_version": _FORMAT_VERSION,
            "step": step,
            "meta": user_meta,
            "base_fingerprint": self.base_fingerprint,
            "metrics": json_metrics,
            "trainable_spec": _tree_spec(trainable),
            "opt_state_spec": _tree_spec(opt_state),
            "trainable_digest": fingerprint(trainable),
            "opt_state_digest": fingerprint(opt_state),
        }
        items = {"trainable": ocp.args.StandardSave(trainable), "opt_state": ocp.args.StandardSave(opt_state)}
        if extras is not None and jax.tree.leaves(extras):
            record["extras_spec"], record["extras_digest"] = _tree_spec(extras), fingerprint(extras)
            items["extras"] = ocp.args.StandardSave(extras)
        args = ocp.args.Composite(**items, meta=ocp.args.JsonSave(record))
        # force=True: our own monotonic-step check above replaces Orbax's save-decision policy, whose
        # silent `return False` would otherwise drop a save without an error.
        fault_point("checkpoint.begin", step)
        saved = self._mngr.save(step, args=args, metrics=orbax_metrics, force=True)
        if not saved:  # pragma: no cover - defensive
            raise RuntimeError(f"Orbax declined to save step {step} in {self.directory}")
        self._unsynced.append(step)
        if not self.async_save:
            self._mngr.wait_until_finished()
            fault_point("checkpoint.written", step)
        self._sync_committed()
        fault_point("checkpoint.synced", step)

    def _sync_committed(self) -> None:
        pending = []
        for s in self._unsynced:
            if self._is_committed(s):
                _fsync_tree(self._step_dir(s))
            elif s in self._mngr.all_steps():
                pending.append(s)
        self._unsynced = pending

    def wait(self) -> None:
        """Block until any in-flight async save is committed (and fsynced); re-raises its error if it failed."""
        self._mngr.wait_until_finished()
        self._sync_committed()

    def close(self) -> None:
        """Wait for in-flight saves and release Orbax resources. Idempotent."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._mngr.close()
            self._closed = True

    def __enter__(self) -> "RunCheckpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- restore

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(
                    f"no checkpoint found in {self.directory}: nothing to resume from (start a fresh run, "
                    "or point the run at the directory that holds its checkpoints)"
                )
            return steps[-1]
        step = int(step)
        if step not in steps:
            raise CheckpointError(
                f"no committed checkpoint for step {step} in {self.directory} (committed steps: {steps or 'none'})"
            )
        return step

    def _corrupt(self, step: int, what: str, cause: BaseException | None = None) -> CheckpointError:
        older = [s for s in self.all_steps() if s < step]
        hint = (
            f"use an older step instead (`--step {older[-1]}` for jaxpeft eval/export, restore(step={older[-1]}) from "
            f"Python; committed older steps: {older}), or delete step {step} so that a resumed run starts from "
            f"step {older[-1]}"
            if older
            else "no older committed step exists in this directory; delete it and restart the run from scratch"
        )
        detail = ""
        if cause is not None:  # TensorStore errors embed a full JSON spec: keep the first line, bounded
            first = (str(cause).strip().splitlines() or [""])[0]
            detail = f": {type(cause).__name__}: {first[:300]}{'...' if len(first) > 300 else ''}"
        return CheckpointError(
            f"checkpoint step {step} at {self._step_dir(step)} is corrupt or incomplete ({what}{detail}); {hint}"
        )

    def _read_record(self, step: int) -> dict:
        try:
            restored = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            record = restored["meta"]
        except Exception as e:  # noqa: BLE001 - any failure to read the record means a damaged step
            raise self._corrupt(step, "cannot read its meta record", e) from e
        required = ("meta", "base_fingerprint", "trainable_spec", "opt_state_spec", "trainable_digest",
                    "opt_state_digest")
        if not isinstance(record, dict) or any(k not in record for k in required):
            raise self._corrupt(step, "its meta record is not a jaxpeft run checkpoint record")
        if record["base_fingerprint"] != self.base_fingerprint:
            raise CheckpointError(
                f"this checkpoint was trained on a different base model (checkpoint step {step} at "
                f"{self._step_dir(step)} has base fingerprint {record['base_fingerprint']}, the loaded base "
                f"model has {self.base_fingerprint}); load the base model it was trained on, or start a new "
                "run directory"
            )
        return record

    def _check_like(self, step: int, record: dict, name: str, like: Any) -> None:
        diff = _spec_diff(name, record[f"{name}_spec"], _tree_spec(like))
        if diff:
            raise CheckpointError(
                f"checkpoint step {step} at {self._step_dir(step)} does not fit {name}_like: "
                + "; ".join(diff)
                + " (pass the freshly initialised trees of the same adapter config and optimizer)"
            )

    def _restore(self, step: int | None, likes: dict[str, Any]) -> tuple[dict[str, Any], dict]:
        step = self._resolve_step(step)
        record = self._read_record(step)
        for name, like in likes.items():
            self._check_like(step, record, name, like)
        args = ocp.args.Composite(**{n: ocp.args.StandardRestore(_abstract(like)) for n, like in likes.items()})
        try:
            with _quiet_background_errors():
                restored = self._mngr.restore(step, args=args)
            out = {n: restored[n] for n in likes}
        except Exception as e:  # noqa: BLE001 - tensorstore/orbax raise many types for damaged files
            raise self._corrupt(step, f"cannot read {'/'.join(likes)}", e) from e
        for name, tree in out.items():
            if jax.tree.structure(tree) != jax.tree.structure(likes[name]):
                raise self._corrupt(step, f"{name} came back with a different tree structure")
            if fingerprint(tree) != record[f"{name}_digest"]:
                raise self._corrupt(step, f"{name} content digest mismatch")
        meta = dict(record["meta"])
        meta[_RESERVED_META_KEY] = record["base_fingerprint"]
        return out, meta

    def restore(
        self, step: int | None = None, *, trainable_like: Any, opt_state_like: Any
    ) -> tuple[Any, Any, dict]:
        """Load ``(trainable, opt_state, meta)`` of ``step`` (None = latest committed).

        ``trainable_like`` / ``opt_state_like`` are the freshly initialised trees (e.g. the adapter params
        and ``optimizer.init(params)``); the result has exactly their pytree structure (namedtuples
        included), shapes, dtypes and shardings, with values bit-identical to what was saved (verified by
        digest). ``meta`` is the saved dict plus ``"base_fingerprint"``.

        Raises CheckpointError when no checkpoint exists, the step was trained on a different base model,
        the ``*_like`` trees do not fit, or the step is corrupt/incomplete (the message names the step and
        its path and suggests an older step).
        """
        out, meta = self._restore(step, {"trainable": trainable_like, "opt_state": opt_state_like})
        return out["trainable"], out["opt_state"], meta

    def restore_extras(self, step: int | None = None, *, extras_like: Any) -> Any | None:
        """The frozen extras saved with ``step`` (None = latest), or None when that checkpoint holds none (saved
        without them, or the adapters have none). Same checks as restore."""
        resolved = self._resolve_step(step)
        if "extras_spec" not in self._read_record(resolved):
            return None
        out, _ = self._restore(resolved, {"extras": extras_like})
        return out["extras"]

    def restore_trainable(self, step: int | None = None, *, trainable_like: Any) -> tuple[Any, dict]:
        """Load only ``(trainable, meta)`` of ``step`` (None = latest) for eval/export; same checks as restore."""
        out, meta = self._restore(step, {"trainable": trainable_like})
        return out["trainable"], meta
