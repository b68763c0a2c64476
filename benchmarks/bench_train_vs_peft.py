"""Training throughput and peak memory, jaxpeft against Hugging Face PEFT 0.21.2 on PyTorch 2.13 (CPU, float32),
each in its own process, interleaved A B A B after warm-up, median of the repeats.

Same model config (random weights, the real vocabulary), batch, sequence length, method, optimizer (AdamW) and
loss: every position in the loss (HF's `labels=input_ids`), or `--sft` for SFT as users run it (loss on the
last `--response` tokens of each row; HF gets -100 on the prompt). Peak RSS is the process's ru_maxrss.

Usage: python benchmarks/bench_train_vs_peft.py [--models gpt2 smollm2] [--method lora] [--repeats 3]
       [--steps 4] [--batch 8] [--seq 128] [--sft --response 32] [--out benchmarks/results/train_vs_peft.json]
Prints tokens/s and peak RSS per side and the ratios jaxpeft / PEFT (issue 11's targets: tokens/s >= 1.0x,
peak RSS <= 0.7x with every position in the loss; >= 1.3x tokens/s for SFT).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "gpt2": dict(hf=dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                         n_inner=None, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True),
                 targets=("c_attn",)),
    "smollm2": dict(hf=dict(model_type="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=30,
                            num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536,
                            max_position_embeddings=2048, rms_norm_eps=1e-5, hidden_act="silu",
                            tie_word_embeddings=True, rope_theta=100000.0, attention_dropout=0.0),
                    targets=("q_proj", "v_proj")),
}
LR = 1e-4


def _batch(vocab: int, batch: int, seq: int, response: int | None):
    import numpy as np

    rng = np.random.RandomState(0)
    ids = rng.randint(3, vocab, (batch, seq)).astype(np.int32)
    mask = np.zeros((batch, seq), np.int32) if response else np.ones((batch, seq), np.int32)
    if response:
        mask[:, seq - response:] = 1
    return ids, mask


def worker_jax(args) -> dict:
    import jax
    import numpy as np
    import optax

    from jaxpeft.adapters import AdaptedModel, LoraConfig
    from jaxpeft.loading.convert import unflatten_params
    from jaxpeft.models import ModelConfig, build_model
    from jaxpeft.models.namemap import name_map
    from jaxpeft.train.loop import gathered_head_tokens, make_train_step
    from jaxpeft.train.tasks import CausalLMTask

    shape = SHAPES[args.model]
    cfg = ModelConfig.from_hf(shape["hf"])
    rng = np.random.RandomState(0)
    frozen = unflatten_params({e.flax_path: (0.02 * rng.randn(*e.shape)).astype(np.float32)
                               for e in name_map(cfg, "causal_lm")})
    frozen = jax.tree.map(jax.numpy.asarray, frozen)
    model = AdaptedModel.wrap(build_model(cfg, "causal_lm")).add(
        "default", LoraConfig(r=8, lora_alpha=16, target_modules=shape["targets"]))
    state = model.init(jax.random.key(0), frozen)
    ids, loss_mask = _batch(cfg.vocab_size, args.batch, args.seq, args.response if args.sft else None)
    # the loss mask marks the scored tokens (position p predicts token p + 1); all-ones = every position
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask,
             "example_weight": np.ones((args.batch,), np.float32)}
    k = gathered_head_tokens([{"loss_mask": row.tolist()} for row in loss_mask])
    tx = optax.adamw(LR)
    step = make_train_step(model, CausalLMTask(None, None), tx, 1, seed=0, head_tokens=k)
    trainable, opt_state = state["trainable"], tx.init(state["trainable"])
    trainable, opt_state, terms = step(trainable, opt_state, frozen, state["extras"], batch, np.int32(0))
    jax.block_until_ready(terms)  # compile + warm-up
    t0 = time.perf_counter()
    for i in range(args.steps):
        trainable, opt_state, terms = step(trainable, opt_state, frozen, state["extras"], batch, np.int32(i + 1))
    jax.block_until_ready(terms)
    dt = time.perf_counter() - t0
    return {"tokens_per_s": args.batch * args.seq * args.steps / dt, "step_s": dt / args.steps,
            "loss": float(terms["loss"])}


def worker_torch(args) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    shape = SHAPES[args.model]
    hf = transformers.AutoConfig.for_model(**shape["hf"])
    model = transformers.AutoModelForCausalLM.from_config(hf)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(shape["targets"]),
                                             lora_dropout=0.0, fan_in_fan_out=args.model == "gpt2"))
    model.train()
    ids, loss_mask = _batch(hf.vocab_size, args.batch, args.seq, args.response if args.sft else None)
    ids_t = torch.tensor(ids, dtype=torch.long)
    labels = ids_t.clone()
    if args.sft:  # HF shifts labels inside: label p is the target of position p - 1; -100 = unscored
        labels[torch.tensor(loss_mask) == 0] = -100
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def one():
        loss = model(input_ids=ids_t, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    one()  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = one()
    dt = time.perf_counter() - t0
    return {"tokens_per_s": args.batch * args.seq * args.steps / dt, "step_s": dt / args.steps,
            "loss": float(loss)}


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["gpt2", "smollm2"], choices=sorted(SHAPES))
    ap.add_argument("--method", default="lora", choices=["lora"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--sft", action="store_true", help="loss on the last --response tokens of each row only")
    ap.add_argument("--response", type=int, default=32)
    ap.add_argument("--out", default=None, help="JSON results (default benchmarks/results/train_vs_peft[_sft].json)")
    ap.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = (worker_jax if args.worker == "jax" else worker_torch)(args)
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(res), flush=True)
        return
    common = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
              "--response", str(args.response)] + (["--sft"] if args.sft else [])
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    rows = []
    for model in args.models:
        runs: dict[str, list[dict]] = {"jax": [], "torch": []}
        for _ in range(args.repeats):  # A B A B: drifts of a noisy machine hit both sides
            for side in ("jax", "torch"):
                out = subprocess.run([sys.executable, __file__, "--worker", side, "--model", model, *common],
                                     capture_output=True, text=True, check=True, env=env).stdout
                runs[side].append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:]))
        med = {side: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "peak_rss_mib", "step_s")}
               for side, rs in runs.items()}
        row = {"model": model, "method": args.method, "sft": args.sft, "batch": args.batch, "seq": args.seq,
               "jaxpeft": med["jax"], "peft": med["torch"], "runs": runs,
               "speed_ratio": med["jax"]["tokens_per_s"] / med["torch"]["tokens_per_s"],
               "rss_ratio": med["jax"]["peak_rss_mib"] / med["torch"]["peak_rss_mib"]}
        rows.append(row)
        print(f"{model:8s} {args.method} {'SFT' if args.sft else 'all positions'}: jaxpeft "
              f"{med['jax']['tokens_per_s']:.0f} tok/s {med['jax']['peak_rss_mib']:.0f} MiB | PEFT "
              f"{med['torch']['tokens_per_s']:.0f} tok/s {med['torch']['peak_rss_mib']:.0f} MiB | speed "
              f"{row['speed_ratio']:.2f}x, memory {row['rss_ratio']:.2f}x", flush=True)
    out = Path(args.out or f"benchmarks/results/train_vs_peft{'_sft' if args.sft else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
