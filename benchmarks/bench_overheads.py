"""Method overheads measured side by side in one process on SmolLM2-135M shapes (random weights, the real
vocabulary, float32, batch 8 x 128, SFT loss on the last 32 tokens): training-step time of KaSA and IMSM (over
LoRA) against plain LoRA, APT against prefix tuning (same 20 virtual tokens, no prefix dropout on either), and
inference (a forward over the batch) of LoRA merged into the weights against the base model.

Rounds run every configuration in turn (A B C A B C), the ratio of medians is reported.
Usage: python benchmarks/bench_overheads.py [--rounds 3] [--steps 2]
Targets (issue 11): KaSA <= 1.05x LoRA; APT <= 1.15x prefix tuning; merged inference within 2% of the base.
"""
from __future__ import annotations

import argparse
import statistics
import time

from bench_train_vs_peft import random_base, train_stepper
from common import write_json

B, T, RESPONSE = 8, 128, 32


def build(layers: int = 30):
    import numpy as np

    cfg, module, frozen = random_base("smollm2", num_hidden_layers=layers)
    rng = np.random.RandomState(1)
    ids = rng.randint(3, cfg.vocab_size, (B, T)).astype(np.int32)
    loss_mask = np.zeros((B, T), np.float32)
    loss_mask[:, T - RESPONSE:] = 1
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask,
             "example_weight": np.ones((B,), np.float32)}
    return cfg, module, frozen, batch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--layers", type=int, default=30, help="fewer for a quick smoke run")
    args = ap.parse_args(argv)

    import jax

    from jaxpeft.adapters import (AdaptedModel, APTConfig, IMSMConfig, KasaConfig, LoraConfig,
                                  PrefixTuningConfig)
    from jaxpeft.adapters.merge import merge

    cfg, module, frozen, batch = build(args.layers)
    targets = ("q_proj", "v_proj")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=targets)
    configs = {"lora": lora, "kasa": KasaConfig(r=8, lora_alpha=16, target_modules=targets),
               "imsm": IMSMConfig(inner=lora, gate_dropout=0.0),
               "prefix": PrefixTuningConfig(num_virtual_tokens=20),
               "apt": APTConfig(num_virtual_tokens=20, prefix_dropout=0.0)}
    runners = {}
    for name, acfg in configs.items():
        model = AdaptedModel.wrap(module).add("default", acfg)
        state = model.init(jax.random.key(0), frozen)
        # (before the stepper: its steps donate the initial trainable buffers)
        trained = jax.tree.map(lambda x: x + 0.01, state["trainable"])  # nonzero B, so a merge is real
        runners[name] = train_stepper(model, frozen, state, batch, 1e-4)
        if name == "lora":  # inference: base vs LoRA merged into the weights
            merged, _ = merge(model, frozen, {"trainable": trained, "extras": state["extras"]}, "default")
            fwd = jax.jit(lambda p, ids, m: module.apply({"params": p}, ids, m).logits)
            ids, m = jax.numpy.asarray(batch["input_ids"]), jax.numpy.asarray(batch["attention_mask"])
            for p in (frozen, merged):
                jax.block_until_ready(fwd(p, ids, m))

            def infer(n, p):  # one forward is short: 5x the repeats of a step, so noise does not decide 2%
                for _ in range(5 * n):
                    out = fwd(p, ids, m)
                jax.block_until_ready(out)
            runners["base_forward"] = lambda n: infer(n, frozen)
            runners["merged_forward"] = lambda n: infer(n, merged)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, advance in runners.items():
            t0 = time.perf_counter()
            advance(args.steps)
            per = args.steps * (5 if name.endswith("_forward") else 1)
            times[name].append((time.perf_counter() - t0) / per)
    med = {name: statistics.median(v) for name, v in times.items()}
    ratios = {"kasa_vs_lora": med["kasa"] / med["lora"], "imsm_vs_lora": med["imsm"] / med["lora"],
              "apt_vs_prefix": med["apt"] / med["prefix"], "merged_vs_base": med["merged_forward"] / med["base_forward"]}
    print("step seconds: " + ", ".join(f"{n} {v:.3f}" for n, v in med.items()), flush=True)
    print("overheads: " + ", ".join(f"{n} {v:.3f}x" for n, v in ratios.items()), flush=True)
    write_json("overheads", {"batch": B, "seq": T, "response": RESPONSE, "median_s": med, "times_s": times,
                             "ratios": ratios})
    return ratios


if __name__ == "__main__":
    main()
