"""Inference latency of an adapter applied on the fly vs merged into the weights, measured in one run.

Usage: python benchmarks/bench_merged_inference.py [--checkpoint smollm2-135m-instruct] [--method lora]
Prints per-call times (median of repeats) and the ratio merged/unmerged (merged should be <= 1: no extra
adapter matmuls), plus the disabled-adapter (base) time as the floor.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn, *args, repeats: int = 10) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    from jaxpeft import load_pretrained
    from jaxpeft.adapters import AdaptedModel, DoraConfig, IA3Config, LoraConfig
    from jaxpeft.adapters.merge import merge

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="smollm2-135m-instruct")
    ap.add_argument("--method", choices=["lora", "dora", "ia3"], default="lora")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    pre = load_pretrained(args.checkpoint)
    cfg = {"lora": LoraConfig(r=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"), init_lora_weights=False),
           "dora": DoraConfig(r=16, init_lora_weights=False), "ia3": IA3Config(init_ia3_weights=False)}[args.method]
    model = AdaptedModel.wrap(pre.module).add("a", cfg)
    state = model.init(jax.random.key(0), pre.params)
    merged, _ = merge(model, pre.params, state, "a")
    ids = jnp.asarray(np.random.RandomState(0).randint(0, pre.config.vocab_size, (args.batch, args.seq)), jnp.int32)
    unmerged_fn = jax.jit(lambda f, s, i: model.apply(f, s, i).logits)
    plain_fn = jax.jit(lambda p, i: pre.module.apply({"params": p}, i).logits)
    t_unmerged = timed(unmerged_fn, pre.params, state, ids)
    t_merged = timed(plain_fn, merged, ids)
    t_base = timed(plain_fn, pre.params, ids)
    print(f"device {jax.devices()[0].device_kind}, {args.checkpoint}, {args.method}, batch {args.batch}x{args.seq}")
    print(f"adapter on the fly {t_unmerged * 1e3:8.1f} ms | merged {t_merged * 1e3:8.1f} ms | base {t_base * 1e3:8.1f} ms")
    print(f"merged / unmerged = {t_merged / t_unmerged:.3f}   merged / base = {t_merged / t_base:.3f}")


if __name__ == "__main__":
    main()
