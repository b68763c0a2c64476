"""SVD time at adapter creation for the SVD family: jaxpeft's jitted, layer-scanned init against the peer PEFT
uses (one `torch.linalg.svd` per weight in float32, or NumPy's when torch is absent), on SmolLM2-135M shapes and
a 0.5B (Qwen2.5-0.5B-shaped) model, every linear layer of every block targeted. Random weights of the right shapes
(the vocabulary is cut to 1024: embeddings are not decomposed).

Usage: python benchmarks/bench_svd_init.py [--models smollm2-135m qwen2.5-0.5b] [--method kasa] [--repeats 2]
Prints, per model: jaxpeft's first init (compile + SVDs), its best later init (SVDs only), the peer's loop, and the
ratio peer / jaxpeft (> 1: jaxpeft is faster). Machines here are noisy: compare ratios, not seconds.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {  # HF config fields
    "smollm2-135m": dict(arch="llama", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                         intermediate_size=1536),
    "qwen2.5-0.5b": dict(arch="qwen2", hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                         intermediate_size=4864),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(name: str):
    from jaxpeft.models import ModelConfig, build_model
    from jaxpeft.models.namemap import name_map
    from jaxpeft.loading.convert import unflatten_params

    cfg = ModelConfig(**SHAPES[name], vocab_size=1024, max_position_embeddings=2048, norm_eps=1e-6,
                      hidden_act="silu", tie_word_embeddings=True, pad_token_id=0)
    rng = np.random.RandomState(0)
    params = unflatten_params({e.flax_path: jnp.asarray(0.02 * rng.randn(*e.shape), jnp.float32)
                               for e in name_map(cfg, "causal_lm")})
    return build_model(cfg, "causal_lm"), params


def kernels(params) -> list[np.ndarray]:
    """Every targeted kernel, one (n_in, n_out) matrix per layer."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = jax.tree_util.keystr(path)
        if key.endswith("['kernel']") and any(f"'{t}'" in key for t in TARGETS):
            out += [np.asarray(w) for w in np.asarray(leaf)]
    return out


def peer(mats: list[np.ndarray]) -> float:
    try:
        import torch

        t0 = time.perf_counter()
        for w in mats:
            torch.linalg.svd(torch.from_numpy(w.T.copy()), full_matrices=False)
        return time.perf_counter() - t0
    except ImportError:
        t0 = time.perf_counter()
        for w in mats:
            np.linalg.svd(w, full_matrices=False)
        return time.perf_counter() - t0


def main() -> None:
    from jaxpeft.adapters import AdaptedModel
    from jaxpeft.train.config import AdapterSection

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--method", default="kasa", help="an SVD-family method without calibration")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    for name in args.models:
        module, params = build(name)
        cfg = AdapterSection(method=args.method, r=8, target_modules=list(TARGETS)).build()
        model = AdaptedModel.wrap(module).add("default", cfg)
        times = []
        for i in range(1 + args.repeats):
            t0 = time.perf_counter()
            state = model.init(jax.random.key(i), params)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
        mats = kernels(params)
        t_peer = min(peer(mats) for _ in range(args.repeats))
        best = min(times[1:])
        print(f"{name}: {len(mats)} weights decomposed | jaxpeft first init {times[0]:.2f} s (compile + SVD), "
              f"later {best:.2f} s | peer loop {t_peer:.2f} s | peer/jaxpeft {t_peer / best:.2f}x", flush=True)


if __name__ == "__main__":
    main()
