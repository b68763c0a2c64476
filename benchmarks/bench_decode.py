"""Greedy decoding with a KV cache, tokens/s: jaxpeft (LoRA unmerged, and IMSM over it) against transformers +
PEFT (LoRA unmerged) on SmolLM2-135M shapes (random weights, the real vocabulary, float32), batch 1 and 8,
each side in its own persistent process, measured A B A B, median of the rounds. Every row generates exactly
--new tokens (no EOS), after a --prompt-token prompt; the time includes prefill.

Usage: python benchmarks/bench_decode.py [--batches 1 8] [--prompt 32] [--new 64] [--rounds 3]
Target (issue 11): jaxpeft >= 1.5x transformers + PEFT at batch 1 and 8.
"""
from __future__ import annotations

import argparse
import time

from bench_train_vs_peft import SHAPES, random_base
from common import Worker, interleave, median, serve, write_json

TARGETS = ["q_proj", "v_proj"]


def _prompts(vocab: int, batch: int, prompt: int):
    import numpy as np

    return np.random.RandomState(0).randint(3, vocab, (batch, prompt)).astype(np.int64)


def setup_jax(args):
    import jax

    from jaxpeft.adapters import AdaptedModel, IMSMConfig, LoraConfig
    from jaxpeft.train.loop import generate_with_adapter

    cfg, module, frozen = random_base("smollm2")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=tuple(TARGETS))
    acfg = lora if args.method == "lora" else IMSMConfig(inner=lora, gate_dropout=0.0)
    model = AdaptedModel.wrap(module).add("default", acfg)
    state = model.init(jax.random.key(0), frozen)
    prompts = [list(map(int, r)) for r in _prompts(cfg.vocab_size, args.batch, args.prompt)]

    def decode():
        return generate_with_adapter(model, frozen, state, prompts, max_new_tokens=args.new, eos_token_ids=[],
                                     pad_token_id=0, batch_size=args.batch)
    decode()

    def measure():
        t0 = time.perf_counter()
        outs = decode()
        dt = time.perf_counter() - t0
        return {"tokens_per_s": sum(len(o) for o in outs) / dt, "seconds": dt}
    return measure


def setup_torch(args):
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.AutoConfig.for_model(**SHAPES["smollm2"]["hf"])
    model = transformers.AutoModelForCausalLM.from_config(hf)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)).eval()
    ids = torch.tensor(_prompts(hf.vocab_size, args.batch, args.prompt))
    mask = torch.ones_like(ids)

    def decode():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new,
                                  min_new_tokens=args.new, do_sample=False, pad_token_id=0, use_cache=True)
    decode()

    def measure():
        t0 = time.perf_counter()
        out = decode()
        dt = time.perf_counter() - t0
        return {"tokens_per_s": (out.shape[1] - args.prompt) * out.shape[0] / dt, "seconds": dt}
    return measure


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--method", default="lora", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        serve(lambda: (setup_jax if args.worker == "jax" else setup_torch)(args))
        return []
    rows = []
    for b in args.batches:
        common = ["--batch", str(b), "--prompt", str(args.prompt), "--new", str(args.new)]
        workers = {"jaxpeft_lora": Worker([__file__, "--worker", "jax", *common]),
                   "jaxpeft_imsm": Worker([__file__, "--worker", "jax", "--method", "imsm", *common]),
                   "peft_lora": Worker([__file__, "--worker", "torch", *common])}
        runs = interleave(workers, args.rounds)
        for w in workers.values():
            w.close()
        med = {k: median(v, "tokens_per_s") for k, v in runs.items()}
        row = {"batch": b, "prompt": args.prompt, "new": args.new, "tokens_per_s": med, "runs": runs,
               "speed_ratio": med["jaxpeft_lora"] / med["peft_lora"],
               "imsm_vs_lora": med["jaxpeft_imsm"] / med["jaxpeft_lora"]}
        rows.append(row)
        print(f"decode batch {b}: jaxpeft LoRA {med['jaxpeft_lora']:.0f} tok/s, IMSM {med['jaxpeft_imsm']:.0f}, "
              f"transformers+PEFT {med['peft_lora']:.0f} | speed {row['speed_ratio']:.2f}x, IMSM/LoRA "
              f"{row['imsm_vs_lora']:.2f}x", flush=True)
    write_json("decode", {"rows": rows})
    return rows


if __name__ == "__main__":
    main()
