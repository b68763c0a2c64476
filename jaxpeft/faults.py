"""Named fault-injection points for reliability tests: `fault_point(name, step)` does nothing unless the
JAXPEFT_FAULT environment variable names that point, then kills the process, signals it or fails a write there.
Imports nothing from jaxpeft (every layer may call it).

JAXPEFT_FAULT = "POINT[@STEP]:ACTION[+DELAY]" (several comma-separated). ACTION is SIGKILL, SIGTERM or SIGINT
(sent to this process, after DELAY seconds on a timer thread when given, so the signal lands while the write that
follows the point is under way) or ENOSPC (an OSError "no space left on device" raised at the point). Each entry
fires at most once per process. The points (see docs/reliability.md):

- `train.step`: after step STEP's update is queued (STEP counts from 1).
- `checkpoint.begin`: before checkpoint STEP is written; `checkpoint.written`: after Orbax committed it (renamed
  from its temporary folder), before it is fsynced; `checkpoint.synced`: after the fsync.
- `export.written`: the final adapter's files are complete in their temporary folder, before the rename;
  `export.renamed`: after the rename.
"""
from __future__ import annotations

import errno
import os
import signal
import threading

ENV = "JAXPEFT_FAULT"
POINTS = ("train.step", "checkpoint.begin", "checkpoint.written", "checkpoint.synced", "export.written",
          "export.renamed")
ACTIONS = ("SIGKILL", "SIGTERM", "SIGINT", "ENOSPC")
_fired: set[str] = set()


def parse(spec: str) -> list[tuple[str, int | None, str, float]]:
    """[(point, step or None, action, delay seconds)] of a JAXPEFT_FAULT value; ValueError names a bad entry."""
    out = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        where, _, what = entry.partition(":")
        point, _, step = where.partition("@")
        action, _, delay = what.partition("+")
        if point not in POINTS or action not in ACTIONS or (step and not step.isdigit()):
            raise ValueError(f"{ENV}={spec!r}: bad entry {entry!r}; expected POINT[@STEP]:ACTION[+DELAY] with POINT "
                             f"in {POINTS} and ACTION in {ACTIONS}")
        out.append((point, int(step) if step else None, action, float(delay) if delay else 0.0))
    return out


def fault_point(name: str, step: int | None = None) -> None:
    """Fire the fault JAXPEFT_FAULT sets for point `name` (at `step`, when the entry names one); else nothing."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for point, at, action, delay in parse(spec):
        key = f"{point}@{at}:{action}"
        if point != name or (at is not None and at != step) or key in _fired:
            continue
        _fired.add(key)
        if action == "ENOSPC":
            raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV} at {name})")
        sig = getattr(signal, action)
        if delay:
            threading.Timer(delay, os.kill, (os.getpid(), sig)).start()
        else:
            os.kill(os.getpid(), sig)
