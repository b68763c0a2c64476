"""The machine's matmul peak as each framework reaches it: JAX float32 and bfloat16, PyTorch float32 (never
PyTorch bf16 on CPU: measured at ~0.3 GFLOP/s here, meaningless), square matmuls, best of the repeats.

Usage: python benchmarks/bench_peak.py [--n 2048] [--repeats 5]
"""
from __future__ import annotations

import argparse
import time

from common import Worker, serve, write_json


def setup(side: str, n: int, repeats: int):
    import numpy as np

    a = np.random.RandomState(0).randn(n, n).astype(np.float32)
    b = np.random.RandomState(1).randn(n, n).astype(np.float32)
    if side == "torch":
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        fns = {"torch_f32": lambda: ta @ tb}
        sync = lambda r: r  # noqa: E731
    else:
        import jax
        import jax.numpy as jnp

        mm = jax.jit(lambda x, y: x @ y)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ha, hb = ja.astype(jnp.bfloat16), jb.astype(jnp.bfloat16)
        fns = {"jax_f32": lambda: mm(ja, jb), "jax_bf16": lambda: mm(ha, hb)}
        sync = jax.block_until_ready
    for f in fns.values():
        sync(f())

    def measure():
        out = {}
        for name, f in fns.items():
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                sync(f())
                best = min(best, time.perf_counter() - t0)
            out[name] = 2 * n ** 3 / best / 1e9
        return out
    return measure


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        serve(lambda: setup(args.worker, args.n, args.repeats))
        return {}
    peaks: dict[str, float] = {}
    for side in ("jax", "torch"):
        w = Worker([__file__, "--worker", side, "--n", str(args.n), "--repeats", str(args.repeats)])
        peaks.update(w.run())
        w.close()
    print("matmul peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()), flush=True)
    write_json("matmul_peak", {"n": args.n, "gflops_per_s": peaks})
    return peaks


if __name__ == "__main__":
    main()
