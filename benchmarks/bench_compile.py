"""Init-from-checkpoint and compile times of a training-shaped forward+backward, scanned vs unrolled layers.

Usage: python benchmarks/bench_compile.py [--checkpoint smollm2-135m-instruct] [--batch 4] [--seq 64]
Prints times and the ratio scan/unrolled (target: <= 0.5). The persistent compilation cache is off.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def loss_fn(module, params, ids, mask):
    logits = module.apply({"params": params}, ids, mask).logits
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])


def measure(checkpoint: str, scan: bool, batch: int, seq: int, shape: str) -> dict[str, float]:
    """shape 'full': gradient w.r.t. every weight; 'lora': w.r.t. a LoRA adapter on q,v (frozen base)."""
    from jaxpeft import load_pretrained
    from jaxpeft.adapters import AdaptedModel, LoraConfig

    t0 = time.perf_counter()
    pre = load_pretrained(checkpoint, scan_layers=scan)
    jax.block_until_ready(pre.params)
    t_init = time.perf_counter() - t0
    ids = jnp.asarray(np.random.RandomState(0).randint(0, pre.config.vocab_size, (batch, seq)), jnp.int32)
    mask = jnp.ones((batch, seq), jnp.int32)
    if shape == "full":
        step = jax.jit(jax.value_and_grad(lambda p, i, m: loss_fn(pre.module, p, i, m)))
        args = (pre.params, ids, mask)
    else:
        model = AdaptedModel.wrap(pre.module).add("default", LoraConfig())
        state = model.init(jax.random.key(0), pre.params)

        class _Bound:  # loss_fn's module.apply, routed through the adapter
            @staticmethod
            def apply(variables, i, m):
                return model.apply(variables["params"][0], {"trainable": variables["params"][1],
                                                            "extras": state["extras"]}, i, m)

        step = jax.jit(jax.value_and_grad(lambda t, f, i, m: loss_fn(_Bound, (f, t), i, m)))
        args = (state["trainable"], pre.params, ids, mask)
    t0 = time.perf_counter()
    lowered = step.lower(*args)
    t_trace = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    t_run = time.perf_counter() - t0
    return {"init_from_checkpoint_s": t_init, "trace_lower_s": t_trace, "compile_s": t_compile,
            "first_step_s": t_run}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--shape", choices=["lora", "full"], default="lora",
                    help="training shape: LoRA q,v (what jaxpeft trains) or full fine-tuning")
    args = ap.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), checkpoint {args.checkpoint}, "
          f"batch {args.batch}x{args.seq}, {args.shape} training shape, compilation cache off")
    rows = {}
    for scan in (True, False):
        rows[scan] = measure(args.checkpoint, scan, args.batch, args.seq, args.shape)
        label = "scan" if scan else "unrolled"
        print(f"{label:9s} " + "  ".join(f"{k}={v:7.2f}" for k, v in rows[scan].items()))
    total = {s: rows[s]["trace_lower_s"] + rows[s]["compile_s"] for s in rows}
    ratio = total[True] / total[False]
    print(f"compile (trace+lower+compile) scan/unrolled = {total[True]:.2f}s / {total[False]:.2f}s = {ratio:.3f} "
          f"(target <= 0.5: {'PASS' if ratio <= 0.5 else 'FAIL'})")
    from common import write_json

    write_json("compile", {"checkpoint": args.checkpoint, "batch": args.batch, "seq": args.seq, "shape": args.shape,
                           "scan": rows[True], "unrolled": rows[False], "compile_ratio_scan_vs_unrolled": ratio})
    return {"scan": rows[True], "unrolled": rows[False], "ratio": ratio}


if __name__ == "__main__":
    main()
