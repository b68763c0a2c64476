"""Shared pieces of the benchmark scripts: machine info, persistent worker processes driven A B A B from the
parent (imports and compiles paid once per process), medians and result files.

Imports the standard library only (workers import jax or torch themselves).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    """CPU, core count, platform and the versions of the libraries compared."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count()}
    try:
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    for mod in ("jax", "torch", "peft", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def peak_rss_mib() -> float:
    """This process's peak resident set size (ru_maxrss) in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def serve(setup: Callable[[], Callable[[], dict[str, Any]]]) -> None:
    """Worker side: build the measurement once (setup() compiles and warms up and returns `measure`), say READY,
    then answer 'run' with one RESULT line per call and 'quit' with the peak RSS."""
    try:
        measure = setup()
    except Exception as e:  # noqa: BLE001 - the parent records why this side could not run
        print("FAILED " + json.dumps({"error": f"{type(e).__name__}: {e}"[:500]}), flush=True)
        return
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            print("RESULT " + json.dumps(measure()), flush=True)
        else:
            break
    print("RESULT " + json.dumps({"peak_rss_mib": peak_rss_mib()}), flush=True)


class Worker:
    """Parent side of `serve`: a child process running `argv` (python script + args)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
                                              **(env or {})))
        self.error: str | None = None
        first = self._line(("READY", "FAILED"))
        if first.startswith("FAILED"):
            self.error = json.loads(first[7:])["error"]
            self.proc.wait()

    def _line(self, prefixes: tuple[str, ...]) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefixes):
                return line.strip()
        raise RuntimeError(f"worker {self.proc.args[1:]} died:\n{self.proc.stderr.read()[-3000:]}")

    def run(self) -> dict[str, Any]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return json.loads(self._line(("RESULT",))[7:])

    def close(self) -> dict[str, Any]:
        """Stop the worker; returns its peak RSS record."""
        if self.error:
            return {}
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        out = json.loads(self._line(("RESULT",))[7:])
        self.proc.wait()
        return out


def interleave(workers: dict[str, Worker], rounds: int) -> dict[str, list[dict[str, Any]]]:
    """A B A B: `rounds` measurements of each live worker in turn, so a noisy machine's drift hits every side."""
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in workers}
    for _ in range(rounds):
        for name, w in workers.items():
            if not w.error:
                runs[name].append(w.run())
    return runs


def median(records: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return statistics.median(values) if values else None


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """benchmarks/results/<name>.json with the machine info added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return path
