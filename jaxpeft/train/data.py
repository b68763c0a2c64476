"""Rows in, padded numpy batches out: loading splits with `datasets`, length buckets, deterministic resumable
shuffling.

Imports numpy/datasets and jaxpeft.train.config only. Batches are dicts of numpy arrays; a batch's length is
the smallest configured bucket that fits its longest row, so jit compiles once per bucket, not per batch.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from jaxpeft.errors import JaxpeftError
from jaxpeft.bundled import PREFIX as BUNDLED, names as bundled_names, resolve as resolve_bundled
from jaxpeft.train.config import DataSection

Example = dict[str, Any]
"""One encoded row: 'input_ids' (list[int]) plus task fields (lists are per-token, scalars per row)."""

# padding value per per-token field
PAD_VALUES = {"input_ids": None, "attention_mask": 0, "loss_mask": 0.0, "token_type_ids": 0, "labels": -100}
_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(JaxpeftError, ValueError):
    """Bad data: empty split, missing field, label out of range, row too long. Names the file/row and fix."""


def load_split(section: DataSection, split: str, max_rows: int | None = None) -> list[dict[str, Any]]:
    """Rows of one split: a local folder holding `<split>.jsonl|.json|.csv|.parquet`, or a hub dataset name."""
    import datasets

    if section.path is None:
        raise DataError("data.path is not set: give a folder with train/validation files or a dataset name")
    if section.path.startswith("tfds:"):
        return _load_tfds(section.path[len("tfds:"):], split, max_rows)
    path = Path(data_folder(section.path)).expanduser()
    if path.is_dir() or (path.suffix in _FORMATS and path.exists()):
        file = path
        if path.is_dir():
            files = [path / f"{split}{ext}" for ext in _FORMATS if (path / f"{split}{ext}").exists()]
            if not files:
                have = sorted(p.name for p in path.iterdir() if p.suffix in _FORMATS)
                raise DataError(f"{path}: no {split}.jsonl/.json/.csv/.parquet file for split {split!r} (the folder "
                                f"has {have or 'no data files'}): add that file, or point data.train_split / "
                                "data.eval_split at a split the folder has")
            file = files[0]
        if file.stat().st_size == 0:
            raise DataError(f"{file}: split {split!r} is empty (the file has no rows): add rows, or point data.path "
                            "at a folder whose split files hold data")
        try:
            ds = datasets.load_dataset(_FORMATS[file.suffix], data_files={split: str(file)}, split=split)
        except Exception as e:  # noqa: BLE001 - `datasets` raises StopIteration, ValueError, DatasetGenerationError...
            raise DataError(_unreadable(file, split, e)) from e
        where = str(file)
    else:
        try:
            ds = datasets.load_dataset(section.path, split=split)
        except Exception as e:  # hub errors, offline mode, unknown names: one clear message
            raise DataError(f"data.path={section.path!r}: not a local folder/file and not loadable as a "
                            f"`datasets` name ({type(e).__name__}: {e}); check the path (relative paths start at the "
                            "working directory), or use bundled:NAME, tfds:NAME or a reachable hub dataset") from e
        where = f"{section.path}[{split}]"
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    rows = ds.to_list()
    if not rows:
        key = "eval_split" if split == section.eval_split else "train_split"
        raise DataError(f"{where}: split {split!r} is empty: add rows, or point data.path / data.{key} at a split "
                        "that holds data")
    return rows


def _unreadable(file: Path, split: str, error: BaseException) -> str:
    """The DataError message for a data file `datasets` could not read: for JSON Lines, the first bad line."""
    cause = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    if file.suffix == ".jsonl":
        import json

        rows = 0
        with open(file, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rows += 1
                try:
                    value = json.loads(line)
                except ValueError as e:
                    return (f"{file}: line {number} is not valid JSON ({e}): fix or remove that line (JSON Lines: "
                            "one JSON object per line)")
                if not isinstance(value, dict):
                    return (f"{file}: line {number} is a JSON {type(value).__name__}, not an object: every line must "
                            "be one JSON object such as {\"prompt\": ..., \"response\": ...}")
        if not rows:
            return f"{file}: split {split!r} is empty (the file has no rows): add rows, or point data.path at a " \
                   "folder whose split files hold data"
    return (f"{file}: split {split!r} is empty or unreadable ({cause}); check the file (rows with the same fields "
            "and types, one per line), or export it again")


def data_folder(path: str) -> str:
    """data.path as a local path: `bundled:NAME` becomes the packaged dataset's folder; other paths unchanged."""
    try:
        return resolve_bundled(path)
    except KeyError:
        raise DataError(f"data.path={path!r}: no such bundled dataset; bundled: "
                        f"{', '.join(BUNDLED + n for n in bundled_names())}") from None


def _load_tfds(name: str, split: str, max_rows: int | None) -> list[dict[str, Any]]:
    """Rows of a TensorFlow Datasets dataset (`data.path: tfds:NAME`; needs the `tfds` extra)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError("data.path=tfds:...: install the optional extra: pip install 'jaxpeft[tfds]'") from e
    ds = tfds.load(name, split=split if max_rows is None else f"{split}[:{max_rows}]")
    rows = [{k: (v.decode() if isinstance(v, bytes) else v.tolist() if hasattr(v, "tolist") else v)
             for k, v in ex.items()} for ex in tfds.as_numpy(ds)]
    if not rows:
        raise DataError(f"tfds:{name}: split {split!r} is empty")
    return rows


def plan_buckets(batch_maxima: Sequence[int], max_length: int, multiple: int = 8, max_buckets: int = 4
                 ) -> tuple[int, ...]:
    """Bucket lengths that pad the given batches least: at most `max_buckets` multiples of `multiple` chosen by
    dynamic programming over the batches' longest rows (each batch pads to the smallest bucket >= its longest
    row), the fewest that come within 2% of the batches' tokens of the least padding (each bucket is one
    compile), plus max_length (rounded up) as the fallback for anything longer. Deterministic."""
    def up(n: int) -> int:
        return -(-int(n) // multiple) * multiple

    top = up(max_length)
    sizes = sorted(min(up(m), top) for m in batch_maxima)
    cands = sorted(set(sizes))
    if not cands:
        return (top,)
    counts = [sizes.count(c) for c in cands]
    # prefix sums: batches (num[j]) and their tokens (tok[j]) among candidates 0 .. j - 1
    num, tok = [0], [0]
    for c, m in zip(cands, counts):
        num.append(num[-1] + m)
        tok.append(tok[-1] + m * c)
    # best[j][k]: least padding of the batches up to candidate j with k buckets, the last one at cands[j]
    inf = float("inf")
    n = len(cands)
    best = [[inf] * (max_buckets + 1) for _ in range(n)]
    prev = [[-1] * (max_buckets + 1) for _ in range(n)]

    def cost(i: int, j: int) -> float:  # batches with sizes in cands[i+1 .. j] padded to cands[j]
        return cands[j] * (num[j + 1] - num[i + 1]) - (tok[j + 1] - tok[i + 1])
    for j in range(n):
        best[j][1] = cost(-1, j)
        for k in range(2, max_buckets + 1):
            for i in range(j):
                c = best[i][k - 1] + cost(i, j)
                if c < best[j][k]:
                    best[j][k], prev[j][k] = c, i
    # fewest buckets (compiles) whose padding is within 2% of the batches' tokens of the best possible
    least = min(best[n - 1][1:])
    k = next(kk for kk in range(1, max_buckets + 1) if best[n - 1][kk] <= least + 0.02 * sum(sizes))
    chosen, j = [], n - 1
    while j >= 0 and k >= 1:
        chosen.append(cands[j])
        j, k = prev[j][k], k - 1
    return tuple(sorted(set(chosen) | {top}))


def batch_maxima(examples: Sequence[Example], batch_size: int, seed: int | None = None) -> list[int]:
    """The longest row of each batch: the training order of epoch 0 (`Batcher`, seed given) or sequential
    evaluation batches (seed None)."""
    lengths = [len(e["input_ids"]) for e in examples]
    if seed is None:
        return [max(lengths[start:start + batch_size]) for start in range(0, len(lengths), batch_size)]
    order = epoch_order(seed, 0, len(lengths))
    return [max(lengths[j] for j in order[i * batch_size:(i + 1) * batch_size])
            for i in range(len(order) // batch_size)]


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The training permutation of n examples in `epoch`: a pure function of (seed, epoch), so resume is exact."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (DataError when n is longer than the largest)."""
    for b in buckets:
        if n <= b:
            return b
    raise DataError(f"a row of {n} tokens is longer than the largest bucket {buckets[-1]}: add a bucket >= "
                    "data.max_length to data.buckets (or use buckets: auto)")


def collate(examples: Sequence[Example], buckets: Sequence[int], pad_id: int, batch_size: int | None = None
            ) -> dict[str, np.ndarray]:
    """Pad examples to one bucket length; pad the batch with weight-0 rows up to batch_size."""
    n = len(examples)
    size = batch_size or n
    length = bucket_length(max(len(e["input_ids"]) for e in examples), buckets)
    out: dict[str, np.ndarray] = {}
    for key, first in examples[0].items():
        if isinstance(first, (list, tuple)):
            pad = pad_id if PAD_VALUES.get(key, 0) is None else PAD_VALUES.get(key, 0)
            dtype = np.float32 if key == "loss_mask" else np.int32
            arr = np.full((size, length), pad, dtype)
            for i, e in enumerate(examples):
                arr[i, : len(e[key])] = e[key]
        else:
            arr = np.zeros((size,), np.int32 if isinstance(first, (int, np.integer)) else np.float32)
            arr[:n] = [e[key] for e in examples]
        out[key] = arr
    mask = np.zeros((size, length), np.int32)
    for i, e in enumerate(examples):
        mask[i, : len(e["input_ids"])] = 1
    out["attention_mask"] = mask
    out["example_weight"] = (np.arange(size) < n).astype(np.float32)
    return out


class Batcher:
    """Shuffled training batches, deterministic in (seed, epoch) and resumable at (epoch, index).

    Every epoch is a fresh permutation of the examples from `np.random.default_rng([seed, epoch])`;
    the last incomplete batch of an epoch is dropped so every step sees `batch_size` rows.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, buckets: Sequence[int], pad_id: int,
                 seed: int):
        if len(examples) < batch_size:
            raise DataError(f"only {len(examples)} training rows for batch_size {batch_size}: lower "
                            "train.batch_size or add data")
        self.examples, self.batch_size, self.buckets, self.pad_id, self.seed = (
            examples, batch_size, tuple(buckets), pad_id, seed)

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per epoch: len(examples) // batch_size (the rest of the epoch is dropped)."""
        return len(self.examples) // self.batch_size

    def _order(self, epoch: int) -> np.ndarray:
        return epoch_order(self.seed, epoch, len(self.examples))

    def iterate(self, epoch: int = 0, index: int = 0) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """Yield (epoch, index, batch) forever, starting at batch `index` of `epoch`."""
        while True:
            order = self._order(epoch)
            for i in range(index, self.batches_per_epoch):
                chosen = [self.examples[j] for j in order[i * self.batch_size:(i + 1) * self.batch_size]]
                yield epoch, i, collate(chosen, self.buckets, self.pad_id)
            epoch, index = epoch + 1, 0


T = TypeVar("T")


class Prefetch(Iterator[T]):
    """Iterate `source` in a background thread, up to `depth` items ahead (collating the next batch while the
    device runs the step). Items come in the source's order, so training stays deterministic; an exception in the
    source is raised from `next`. `close()` (or leaving a `with` block) stops the thread; depth 0 reads in line.
    """

    _END = object()

    def __init__(self, source: Iterator[T], depth: int = 2):
        self._source, self._depth = source, depth
        if depth <= 0:
            return
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="jaxpeft-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for item in self._source:
                if not self._put((item, None)):
                    return
            self._put((self._END, None))
        except BaseException as e:  # handed to the consumer, raised there
            self._put((self._END, e))

    def __next__(self) -> T:
        if self._depth <= 0:
            return next(self._source)
        item, error = self._queue.get()
        if error is not None:
            self._stop.set()
            raise error
        if item is self._END:
            self._stop.set()
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the background thread (items already collated are dropped)."""
        if self._depth > 0:
            self._stop.set()
            self._thread.join(timeout=5)

    def __enter__(self) -> "Prefetch[T]":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def eval_batches(examples: Sequence[Example], batch_size: int, buckets: Sequence[int], pad_id: int
                 ) -> Iterator[dict[str, np.ndarray]]:
    """Sequential batches of a fixed size (the last padded with weight-0 rows, so shapes do not change)."""
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start:start + batch_size], buckets, pad_id, batch_size)
