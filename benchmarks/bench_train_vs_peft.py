"""Training throughput, peak memory and FLOP efficiency: jaxpeft against Hugging Face PEFT 0.21.2 on PyTorch 2.13
(CPU, float32), each side in its own persistent process, measured A B A B after warm-up, median of the rounds.

Same model config (random weights, the real vocabulary), batch, sequence length, method, optimizer (AdamW) and
loss: every position in the loss (HF's `labels=input_ids`), or `--sft` for SFT as users run it (loss on the
last `--response` tokens of each row; HF gets -100 on the prompt). Peak RSS is each process's ru_maxrss.

FLOPs per step (documented formula, `step_flops`): a frozen base's training step costs 2x its forward (forward +
activation gradients; no weight gradients), the adapter 3x its own forward (forward, activation and weight
gradients). Forward per token: 2 x (the layers' matmul weights) + 4 x context x (heads x head_dim) per layer
(scores and weighted values) + 2 x hidden x vocab for each position the loss scores (jaxpeft runs the head only
there; PEFT runs it everywhere, which is not counted as useful work).

Usage: python benchmarks/bench_train_vs_peft.py [--models gpt2 smollm2] [--methods lora dora ia3 prefix kasa]
       [--rounds 3] [--steps 2] [--batch 8] [--seq 128] [--sft --response 32] [--peak-gflops 270]
Prints tokens/s and peak RSS per side, the ratios jaxpeft / PEFT (issue 11's targets: tokens/s >= 1.0x and peak
RSS <= 0.7x with every position in the loss, >= 1.3x for SFT) and the achieved share of the matmul peak.
"""
from __future__ import annotations

import argparse
import time

from common import Worker, interleave, median, serve, write_json

SHAPES = {
    "gpt2": dict(hf=dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                         n_inner=None, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True),
                 targets=("c_attn",), hidden=768, layers=12, attn=768, vocab=50257,
                 layer_mm=768 * 3 * 768 + 768 * 768 + 2 * 768 * 3072),
    "smollm2": dict(hf=dict(model_type="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=30,
                            num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536,
                            max_position_embeddings=2048, rms_norm_eps=1e-5, hidden_act="silu",
                            tie_word_embeddings=True, rope_theta=100000.0, attention_dropout=0.0),
                    targets=("q_proj", "v_proj"), hidden=576, layers=30, attn=576, vocab=49152,
                    layer_mm=576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536),
}
METHODS = ("lora", "dora", "ia3", "prefix", "kasa")
LR = 1e-4
R, ALPHA, PREFIX = 8, 16, 20


def step_flops(model: str, method: str, batch: int, seq: int, scored: int) -> float:
    """Useful FLOPs of one training step (see the module docstring); scored: positions per row in the loss."""
    s = SHAPES[model]
    ctx = seq + (PREFIX if method == "prefix" else 0)
    fwd = batch * seq * s["layers"] * (2 * s["layer_mm"] + 4 * ctx * s["attn"]) + batch * scored * 2 * s["hidden"] * s["vocab"]
    adapter = 0.0
    if method in ("lora", "dora", "kasa"):
        d_in, d_out = (768, 3 * 768) if model == "gpt2" else (576, 576)  # q (or c_attn)
        outs = [d_out] if model == "gpt2" else [576, 192]  # q and v
        adapter = batch * seq * s["layers"] * sum(2 * R * (d_in + o) for o in outs)
    return 2 * fwd + 3 * adapter


def random_base(model: str, **hf_overrides):
    """(ModelConfig, linen module, frozen params): the shapes' model with N(0, 0.02) float32 weights, seed 0."""
    import jax
    import numpy as np

    from jaxpeft.loading.convert import unflatten_params
    from jaxpeft.models import ModelConfig, build_model
    from jaxpeft.models.namemap import name_map

    cfg = ModelConfig.from_hf({**SHAPES[model]["hf"], **hf_overrides})
    rng = np.random.RandomState(0)
    frozen = jax.tree.map(jax.numpy.asarray, unflatten_params(
        {e.flax_path: (0.02 * rng.randn(*e.shape)).astype(np.float32) for e in name_map(cfg, "causal_lm")}))
    return cfg, build_model(cfg, "causal_lm"), frozen


def train_stepper(model, frozen, state, batch, lr: float):
    """advance(n) -> last loss: n AdamW steps of jaxpeft's train step on `batch` (the head at its scored
    positions), the trainable tree and optimizer state carried between calls; compiled and warmed up once here."""
    import numpy as np
    import optax

    from jaxpeft.train.loop import gathered_head_tokens, make_train_step
    from jaxpeft.train.tasks import CausalLMTask

    k = gathered_head_tokens([{"loss_mask": row.tolist()} for row in batch["loss_mask"]])
    tx = optax.adamw(lr)
    step = make_train_step(model, CausalLMTask(None, None), tx, 1, seed=0, head_tokens=k, peak_lr=lr,
                           total_steps=1000)
    st = {"trainable": state["trainable"], "opt": tx.init(state["trainable"]), "i": 0}

    def advance(n: int) -> float:
        for _ in range(n):
            st["trainable"], st["opt"], terms = step(st["trainable"], st["opt"], frozen, state["extras"], batch,
                                                     np.int32(st["i"]))
            st["i"] += 1
        return float(terms["loss"])

    advance(1)  # compile + warm-up
    return advance


def _batch(vocab: int, batch: int, seq: int, response: int | None):
    import numpy as np

    rng = np.random.RandomState(0)
    ids = rng.randint(3, vocab, (batch, seq)).astype(np.int32)
    mask = np.zeros((batch, seq), np.int32) if response else np.ones((batch, seq), np.int32)
    if response:
        mask[:, seq - response:] = 1
    return ids, mask


def jax_adapter(method: str, targets: tuple[str, ...]):
    from jaxpeft.adapters import DoraConfig, IA3Config, KasaConfig, LoraConfig, PrefixTuningConfig

    return {"lora": lambda: LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets),
            "dora": lambda: DoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets),
            "kasa": lambda: KasaConfig(r=R, lora_alpha=ALPHA, target_modules=targets),
            "ia3": lambda: IA3Config(),
            "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=PREFIX)}[method]()


def setup_jax(args):
    import jax
    import numpy as np

    from jaxpeft.adapters import AdaptedModel

    cfg, module, frozen = random_base(args.model)
    model = AdaptedModel.wrap(module).add("default", jax_adapter(args.method, SHAPES[args.model]["targets"]))
    state = model.init(jax.random.key(0), frozen)
    ids, loss_mask = _batch(cfg.vocab_size, args.batch, args.seq, args.response if args.sft else None)
    # the loss mask marks the scored tokens (position p predicts token p + 1); all-ones = every position
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask.astype(np.float32),
             "example_weight": np.ones((args.batch,), np.float32)}
    advance = train_stepper(model, frozen, state, batch, LR)

    def measure():
        t0 = time.perf_counter()
        loss = advance(args.steps)
        dt = (time.perf_counter() - t0) / args.steps
        return {"tokens_per_s": args.batch * args.seq / dt, "step_s": dt, "loss": loss}
    return measure


def setup_torch(args):
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    shape = SHAPES[args.model]
    hf = transformers.AutoConfig.for_model(**shape["hf"])
    model = transformers.AutoModelForCausalLM.from_config(hf)
    gpt2 = args.model == "gpt2"
    targets = list(shape["targets"])
    pcfg = {"lora": lambda: peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0,
                                            fan_in_fan_out=gpt2),
            "dora": lambda: peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0,
                                            fan_in_fan_out=gpt2, use_dora=True),
            "kasa": lambda: peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0,
                                            kasa_config=peft.tuners.lora.config.KasaConfig()),
            "ia3": lambda: peft.IA3Config(task_type="CAUSAL_LM"),
            "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PREFIX)}[args.method]()
    if args.method == "kasa" and gpt2:
        raise ValueError("PEFT has no KaSA on GPT-2's Conv1D layers")
    model = peft.get_peft_model(model, pcfg)
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
        return float(loss)

    one()  # warm-up

    def measure():
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = one()
        dt = (time.perf_counter() - t0) / args.steps
        return {"tokens_per_s": args.batch * args.seq / dt, "step_s": dt, "loss": loss}
    return measure


def compare(model: str, method: str, args) -> dict:
    """One configuration: both workers alive, A B A B rounds, medians, ratios and FLOP efficiency."""
    common = ["--model", model, "--method", method, "--steps", str(args.steps), "--batch", str(args.batch),
              "--seq", str(args.seq), "--response", str(args.response)] + (["--sft"] if args.sft else [])
    workers = {side: Worker([__file__, "--worker", side, *common]) for side in ("jax", "torch")}
    runs = interleave(workers, args.rounds)
    rss = {side: w.close().get("peak_rss_mib") for side, w in workers.items()}
    med = {side: {"tokens_per_s": median(rs, "tokens_per_s"), "step_s": median(rs, "step_s"),
                  "peak_rss_mib": rss[side], "error": workers[side].error} for side, rs in runs.items()}
    scored = args.response if args.sft else args.seq - 1
    flops = step_flops(model, method, args.batch, args.seq, scored)
    j, t = med["jax"], med["torch"]
    row = {"model": model, "method": method, "sft": args.sft, "batch": args.batch, "seq": args.seq,
           "jaxpeft": j, "peft": t, "runs": runs, "step_gflops": flops / 1e9,
           "speed_ratio": j["tokens_per_s"] / t["tokens_per_s"] if j["tokens_per_s"] and t["tokens_per_s"] else None,
           "rss_ratio": j["peak_rss_mib"] / t["peak_rss_mib"] if j["peak_rss_mib"] and t["peak_rss_mib"] else None}
    if j["step_s"]:
        row["jaxpeft_gflops_per_s"] = flops / j["step_s"] / 1e9
        if args.peak_gflops:
            row["jaxpeft_peak_fraction"] = row["jaxpeft_gflops_per_s"] / args.peak_gflops
    if t["step_s"]:
        row["peft_gflops_per_s"] = flops / t["step_s"] / 1e9
    return row


def describe(row: dict) -> str:
    j, t = row["jaxpeft"], row["peft"]
    fmt = lambda v, f: (f % v) if v is not None else "-"  # noqa: E731
    return (f"{row['model']:8s} {row['method']:6s} {'SFT' if row['sft'] else 'all':3s}: jaxpeft "
            f"{fmt(j['tokens_per_s'], '%.0f')} tok/s {fmt(j['peak_rss_mib'], '%.0f')} MiB | PEFT "
            f"{fmt(t['tokens_per_s'], '%.0f')} tok/s {fmt(t['peak_rss_mib'], '%.0f')} MiB{' (' + t['error'] + ')' if t['error'] else ''}"
            f" | speed {fmt(row['speed_ratio'], '%.2f')}x memory {fmt(row['rss_ratio'], '%.2f')}x | "
            f"{fmt(row.get('jaxpeft_gflops_per_s'), '%.0f')} GFLOP/s ({fmt(100 * row['jaxpeft_peak_fraction'] if row.get('jaxpeft_peak_fraction') else None, '%.0f%%')} of peak)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["gpt2", "smollm2"], choices=sorted(SHAPES))
    ap.add_argument("--methods", nargs="+", default=["lora"], choices=METHODS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per round")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--sft", action="store_true", help="loss on the last --response tokens of each row only")
    ap.add_argument("--response", type=int, default=32)
    ap.add_argument("--peak-gflops", type=float, default=None, help="JAX's f32 matmul peak (bench_peak.py)")
    ap.add_argument("--out", default=None, help="results name (default train_vs_peft[_sft])")
    ap.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    if args.worker:
        serve(lambda: (setup_jax if args.worker == "jax" else setup_torch)(args))
        return []
    rows = []
    for model in args.models:
        for method in args.methods:
            rows.append(compare(model, method, args))
            print(describe(rows[-1]), flush=True)
    write_json(args.out or f"train_vs_peft{'_sft' if args.sft else ''}", {"rows": rows})
    return rows


if __name__ == "__main__":
    main()
