"""Stopping a run cleanly on SIGTERM / SIGINT (what a TPU pod, SLURM or Ctrl-C sends): the first signal asks the
loop to finish its step, write a checkpoint and exit with `jaxpeft.errors.EXIT_PREEMPTED`; a second one stops at
once. Across processes the request is agreed on with one tiny collective, so all stop at the same step.

Imports jax (multihost_utils) only.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

import numpy as np


class StopSignals:
    """Context manager: while active, SIGTERM and SIGINT set `signal_name` instead of killing the process; a second
    signal restores the default behaviour (SIGINT raises KeyboardInterrupt, SIGTERM terminates). Handlers are only
    installed from the main thread (elsewhere `signal` cannot: the run then keeps the default behaviour)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, say: Any = None) -> None:
        self.signal_name: str | None = None
        self._old: dict[int, Any] = {}
        self._say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            self._say(f"received {name}: finishing the current step, writing a checkpoint, then exiting "
                      f"(send it again to stop at once)")
            return
        self.__exit__()  # the second signal: default behaviour, now
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)

    @property
    def requested(self) -> bool:
        """Whether this process received a stop signal."""
        return self.signal_name is not None

    def agreed(self, step: int, every: int = 1) -> bool:
        """Whether the run stops after `step` (counting from 1): this process's request alone when it is the only
        one; with several processes, at every `every`-th step all of them exchange their flags (a collective every
        process reaches at the same step) and all stop when any received a signal."""
        import jax

        if jax.process_count() == 1:
            return self.requested
        if step % every:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([int(self.requested)], np.int32))
        if np.asarray(flags).max() > 0 and self.signal_name is None:
            self.signal_name = "a signal to another process"
        return bool(np.asarray(flags).max() > 0)
