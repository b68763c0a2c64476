"""IMSM's cost against plain LoRA, measured side by side in one process on SmolLM2-135M shapes (random weights,
the real vocabulary): the training step (forward + backward of the gathered-head loss) in both siamese forms, its
peak memory (XLA's compiled memory analysis: arguments + outputs + temporaries, not noisy), and greedy decoding
tokens/s in both forms.

Usage: python benchmarks/bench_imsm.py [--batch 8] [--prompt 96] [--response 32] [--new 32] [--repeats 3]
Prints ratios IMSM / LoRA (targets from issue 9: train step <= 1.6x, decode >= 0.8x, peak memory <= 1.15x).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

SMOLLM2 = dict(arch="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
               head_dim=64, intermediate_size=1536, max_position_embeddings=2048, norm_eps=1e-5, hidden_act="silu",
               tie_word_embeddings=True, pad_token_id=0)


def build():
    from jaxpeft.loading.convert import unflatten_params
    from jaxpeft.models import ModelConfig, build_model
    from jaxpeft.models.namemap import name_map

    cfg = ModelConfig(**SMOLLM2)
    rng = np.random.RandomState(0)
    params = unflatten_params({e.flax_path: jnp.asarray(0.02 * rng.randn(*e.shape), jnp.float32)
                               for e in name_map(cfg, "causal_lm")})
    return build_model(cfg, "causal_lm"), params


def best_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    from jaxpeft.adapters import AdaptedModel, IMSMConfig, LoraConfig
    from jaxpeft.train.loop import generate_with_adapter

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=96)
    ap.add_argument("--response", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    module, frozen = build()
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"))
    models = {"lora": AdaptedModel.wrap(module).add("default", lora),
              "imsm": AdaptedModel.wrap(module).add("default", IMSMConfig(inner=lora, gate_dropout=0.0))}
    b, t = args.batch, args.prompt + args.response
    rs = np.random.RandomState(1)
    ids = jnp.asarray(rs.randint(3, SMOLLM2["vocab_size"], (b, t)), jnp.int32)
    mask = jnp.ones((b, t), jnp.int32)
    prompt = jnp.asarray(np.arange(t)[None, :] < args.prompt).repeat(b, 0)
    positions = jnp.broadcast_to(jnp.arange(args.prompt - 1, t - 1, dtype=jnp.int32), (b, args.response))
    targets = ids[:, args.prompt:]

    def make_step(model, form):
        def loss(trainable, frozen, extras):  # frozen is an argument, as in training (not a folded constant)
            out = model.apply(frozen, {"trainable": trainable, "extras": extras}, ids, mask, prompt_mask_bt=prompt,
                              head_positions_bk=positions, **({"siamese_form": form} if form else {}))
            logp = jax.nn.log_softmax(out.logits, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
        return jax.jit(jax.value_and_grad(loss))

    rows = []
    for name, model in models.items():
        state = model.init(jax.random.key(0), frozen)
        forms = [None] if name == "lora" else ["separate", "doubled"]
        for form in forms:
            step = make_step(model, form)
            mem = step.lower(state["trainable"], frozen, state["extras"]).compile().memory_analysis()
            peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes) if mem else 0
            temp = mem.temp_size_in_bytes if mem else 0
            t_step = best_time(lambda: step(state["trainable"], frozen, state["extras"]), args.repeats)
            prompts = [list(map(int, r)) for r in np.asarray(ids[:, : args.prompt])]
            dec = model if form is None else AdaptedModel.wrap(module).add("default", IMSMConfig(
                inner=lora, gate_dropout=0.0, fixed_gate=0.5))  # a distinct model object: its own decode compile
            if form == "separate":
                original = dec.init_cache
                object.__setattr__(dec, "init_cache", lambda *a, **k: original(*a, **dict(k, siamese_form="separate")))

            def decode():
                return generate_with_adapter(dec, frozen, state, prompts, max_new_tokens=args.new,
                                             eos_token_ids=[], pad_token_id=0, batch_size=b)
            t_dec = best_time(decode, max(1, args.repeats - 1))
            rows.append((name, form or "-", t_step, peak, b * args.new / t_dec, temp))
            print(f"{name:5s} {form or '-':9s} train step {t_step:.3f} s | peak {peak / 2**20:.0f} MiB "
                  f"(temporaries {temp / 2**20:.0f} MiB) | "
                  f"decode {b * args.new / t_dec:.1f} tok/s", flush=True)
    base = rows[0]
    for name, form, t_step, peak, tps, temp in rows[1:]:
        print(f"{name} ({form}) / lora: train step {t_step / base[2]:.2f}x (target <= 1.6) | peak memory "
              f"{peak / base[3]:.2f}x (target <= 1.15; temporaries alone {temp / base[5]:.2f}x) | "
              f"decode {tps / base[4]:.2f}x (target >= 0.8)")


if __name__ == "__main__":
    main()
