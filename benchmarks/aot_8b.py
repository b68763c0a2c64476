"""Plan an 8B model's PEFT training step by ahead-of-time compilation for a real TPU v5e topology, on a machine
without a TPU: everything abstract (`jax.eval_shape` for the adapters and the optimizer, ShapeDtypeStructs with
shardings for the frozen base: no weights, no fingerprint, no concrete init), the step of `jaxpeft.train.loop`
compiled by libtpu's compiler, then XLA's memory analysis and cost model read back per device.

Pinned workload: Llama-3-8B shapes, bf16 frozen base, global batch 64 x 2048 tokens, remat per layer (scanned
layers), the LM head and cross-entropy on the 512 scored positions of each row in chunks of 128 (never (B, K, V)
logits at once), micro-batches of 1 row per chip (grad_accum 8 on 8 chips, 1 on 64), AdamW, FSDP over every
chip. Methods: LoRA, KaSA (r=16 on q,k,v,o), APT (32 virtual tokens), IMSM over LoRA.

Memory comes from the pinned step itself. XLA's cost analysis counts a loop body once (not times its trip count),
so the cost figures come from two loop-free variants of one micro-batch (1 and 2 unrolled layers, the head in one
chunk), extrapolated linearly: cost = (c1 + (32 - 1) * (c2 - c1)) * grad_accum. Those variants are compiled
once per method on the 8-chip topology: with 1 row per chip per micro-batch every topology runs the same per-chip
program (only collective group sizes differ), so the 64-chip figures reuse them. The step time is the roofline
of those figures per chip, max(flops / bf16 peak, bytes accessed / HBM bandwidth): libtpu 0.0.52's own
`optimal_seconds` came back negative for these programs (kept in the JSON as `raw_optimal_seconds`, not used).
Collectives over ICI are not in the estimate.

Needs `pip install "jaxpeft[aot]"` (libtpu; it prints warnings about missing TPU host variables: harmless).
Usage: python benchmarks/aot_8b.py [--chips 8 64] [--methods lora kasa apt imsm] [--out benchmarks/results/aot_8b.json]
       (about 7 minutes on 2 CPU cores)
All step times, tokens/s and MFU are estimates from the compiler's cost analysis, not measurements.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp

LLAMA3_8B = dict(arch="llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                 head_dim=128, intermediate_size=14336, max_position_embeddings=8192, norm_eps=1e-5,
                 hidden_act="silu", tie_word_embeddings=False, pad_token_id=0, rope_theta=500000.0)
TOPOLOGY = {8: "v5e:2x4", 16: "v5e:4x4", 32: "v5e:4x8", 64: "v5e:8x8", 128: "v5e:8x16", 256: "v5e:16x16"}
V5E_BF16_PEAK = 197e12  # FLOP/s per chip
V5E_HBM = 16 * 2**30
V5E_HBM_BW = 819e9  # bytes/s per chip
BATCH, SEQ, SCORED, CHUNK = 64, 2048, 512, 128


COST_CHIPS = 8


def grad_accum(chips: int) -> int:
    """Micro-batches of one row per chip."""
    return max(1, BATCH // chips)
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def method_config(name: str):
    from jaxpeft.adapters import IMSMConfig, LoraConfig
    from jaxpeft.adapters.apt import APTConfig
    from jaxpeft.adapters.kasa import KasaConfig

    lora = LoraConfig(r=16, lora_alpha=32, target_modules=QKVO)
    return {"lora": lora, "kasa": KasaConfig(r=16, lora_alpha=32, target_modules=QKVO),
            "apt": APTConfig(num_virtual_tokens=32), "imsm": IMSMConfig(inner=lora)}[name]


def compile_step(method: str, chips: int, layers: int, scan: bool, accum: int, rows: int, chunk: int):
    """(compiled step, base param count, trainable param count) for an abstract Llama-3-8B-shaped model."""
    from jax.experimental import topologies

    from jaxpeft.adapters import AdaptedModel
    from jaxpeft.models import ModelConfig, build_model
    from jaxpeft.models.namemap import name_map
    from jaxpeft.loading.convert import unflatten_params
    from jaxpeft.parallel import make_mesh, sharding_for
    from jaxpeft.train.config import OptimSection
    from jaxpeft.train.loop import init_optimizer_state, make_optimizer, make_train_step
    from jaxpeft.train.placement import Placement
    from jaxpeft.train.tasks import CausalLMTask

    topo = topologies.get_topology_desc(topology_name=TOPOLOGY[chips], platform="tpu")
    mesh = make_mesh(data=1, fsdp=chips, tensor=1, devices=topo.devices)
    place = Placement(mesh)
    cfg = ModelConfig(**dict(LLAMA3_8B, num_layers=layers), dtype="bfloat16", param_dtype="bfloat16",
                      scan_layers=scan, remat="full")
    frozen = unflatten_params({e.flax_path: jax.ShapeDtypeStruct(e.shape, jnp.bfloat16,
                                                                 sharding=sharding_for(e.axes, e.shape, mesh))
                               for e in name_map(cfg, "causal_lm")})
    n_base = sum(x.size for x in jax.tree.leaves(frozen))
    model = AdaptedModel.wrap(build_model(cfg, "causal_lm")).add("default", method_config(method))
    state = jax.eval_shape(lambda f: model.init(jax.random.key(0), f), frozen)
    state_sh = place.state_shardings(model, state)
    groups = model.lr_groups(1e-4)
    tx = make_optimizer(OptimSection(lr=1e-4), 1000, group_lrs=groups,
                        labels=model.param_labels if len(groups) > 1 else None)
    opt = jax.eval_shape(lambda s: init_optimizer_state(model, tx, s), state)
    opt_sh = place.opt_shardings(opt, state_sh["trainable"])
    batch = {"input_ids": jax.ShapeDtypeStruct((rows, SEQ), jnp.int32),
             "attention_mask": jax.ShapeDtypeStruct((rows, SEQ), jnp.int32),
             "loss_mask": jax.ShapeDtypeStruct((rows, SEQ), jnp.int32),
             "example_weight": jax.ShapeDtypeStruct((rows,), jnp.float32)}
    shardings = (state_sh["trainable"], opt_sh, place.like(frozen), state_sh["extras"], place.batch)
    step = make_train_step(model, CausalLMTask(None, None), tx, accum, seed=0, head_tokens=SCORED,
                           loss_chunk=chunk, shardings=shardings)
    compiled = step.lower(state["trainable"], opt, frozen, state["extras"], batch,
                          jax.ShapeDtypeStruct((), jnp.int32)).compile()
    return compiled, n_base, sum(x.size for x in jax.tree.leaves(state["trainable"]))


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {k: float(cost.get(k, float("nan"))) for k in ("flops", "bytes accessed", "optimal_seconds")}


_MICRO_COST: dict[str, dict] = {}


def micro_cost(method: str) -> dict:
    """Per-chip cost of one micro-batch (1 row per chip) of the whole 32-layer model, from loop-free 1- and
    2-layer compiles on the 8-chip topology (memoised per method)."""
    if method not in _MICRO_COST:
        c1, c2 = (_cost(compile_step(method, COST_CHIPS, n, False, 1, COST_CHIPS, SCORED)[0]) for n in (1, 2))
        layers = LLAMA3_8B["num_layers"]
        _MICRO_COST[method] = {k: c1[k] + (layers - 1) * (c2[k] - c1[k]) for k in c1}
    return _MICRO_COST[method]


def plan(method: str, chips: int) -> dict:
    t0 = time.perf_counter()
    accum = grad_accum(chips)
    compiled, n_base, n_trainable = compile_step(method, chips, LLAMA3_8B["num_layers"], True, accum, BATCH, CHUNK)
    mem = compiled.memory_analysis()
    cost = {k: v * accum for k, v in micro_cost(method).items()}
    seconds = max(cost["flops"] / V5E_BF16_PEAK, cost["bytes accessed"] / V5E_HBM_BW)
    tokens = BATCH * SEQ
    model_flops = 6 * n_base * tokens  # the usual 6N per token (a frozen base needs ~4N: no weight gradients)
    return {
        "method": method, "chips": chips, "topology": TOPOLOGY[chips], "grad_accum": accum, "base_params": n_base,
        "trainable_params": n_trainable,
        "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes,
        "peak_bytes": mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes,
        "flops_per_chip": cost["flops"], "bytes_accessed_per_chip": cost["bytes accessed"],
        "raw_optimal_seconds": cost["optimal_seconds"],
        "bound": "compute" if cost["flops"] / V5E_BF16_PEAK >= cost["bytes accessed"] / V5E_HBM_BW else "memory",
        "est_step_s": seconds, "est_tokens_per_s_per_chip": tokens / chips / seconds if seconds else None,
        "est_mfu_6n": model_flops / chips / seconds / V5E_BF16_PEAK if seconds else None,
        "est_hfu": cost["flops"] / seconds / V5E_BF16_PEAK if seconds else None,
        "compile_s": time.perf_counter() - t0,
    }


def table(rows: list[dict]) -> str:
    lora = {r["chips"]: r for r in rows if r["method"] == "lora"}
    out = ["| chips | method | trainable | args / chip | temp / chip | peak / chip (of 16 GiB) | est. step | "
           "bound | est. tok/s/chip | est. MFU (6N) | step vs LoRA |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    gib = 2**30
    for r in rows:
        ratio = r["est_step_s"] / lora[r["chips"]]["est_step_s"] if r["chips"] in lora else float("nan")
        out.append(f"| {r['chips']} ({r['topology']}) | {r['method']} | {r['trainable_params'] / 1e6:.1f}M | "
                   f"{r['argument_bytes'] / gib:.2f} GiB | {r['temp_bytes'] / gib:.2f} GiB | "
                   f"{r['peak_bytes'] / gib:.2f} GiB | {r['est_step_s']:.2f} s | {r['bound']} | "
                   f"{r['est_tokens_per_s_per_chip']:.0f} | "
                   f"{r['est_mfu_6n']:.1%} | {ratio:.2f}x |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chips", type=int, nargs="+", default=[8, 64], choices=sorted(TOPOLOGY))
    ap.add_argument("--methods", nargs="+", default=["lora", "kasa", "apt", "imsm"])
    ap.add_argument("--out", default="benchmarks/results/aot_8b.json")
    ap.add_argument("--jobs", type=int, default=1,
                    help="topologies compiled in parallel processes (default 1: XLA already uses the cores)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.jobs > 1 and len(args.chips) > 1:  # XLA compiles mostly on one core: one process per topology
        import subprocess
        import sys
        import tempfile

        tmp = Path(tempfile.mkdtemp())
        env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")  # libtpu otherwise locks one process per host
        procs = [subprocess.Popen([sys.executable, __file__, "--chips", str(c), "--methods", *args.methods,
                                   "--out", str(tmp / f"{c}.json"), "--jobs", "1"], env=env) for c in args.chips]
        if any(p.wait() for p in procs):
            raise SystemExit("a topology's compilation failed (see above)")
        rows = [r for c in args.chips for r in json.loads((tmp / f"{c}.json").read_text())]
    else:
        rows = []
        for chips in args.chips:
            for method in args.methods:
                r = plan(method, chips)
                rows.append(r)
                print(f"{method:5s} {chips:3d} chips: peak {r['peak_bytes'] / 2**30:.2f} GiB/chip "
                      f"(args {r['argument_bytes'] / 2**30:.2f}, temp {r['temp_bytes'] / 2**30:.2f}), "
                      f"est. step {r['est_step_s']:.2f} s, compiled in {r['compile_s']:.0f} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    if len(args.chips) > 1 or args.jobs == 1:
        print(table(rows))
        print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
