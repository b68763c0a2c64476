"""Jitted text generation with a KV cache: greedy or sampling (temperature, top-k, top-p), stop tokens,
batched prompts with left padding.

Imports jax, jaxpeft.models and jaxpeft.parallel. Prefill and every decode step run inside one jitted function; the
prompt length is padded to a bucket so new prompt lengths rarely recompile.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.models.cache import KVCache
from jaxpeft.models.layers import jnp_dtype
from jaxpeft.models.outputs import ModelOutput
from jaxpeft.parallel import place_host

ModelFn = Callable[[Any, jax.Array, jax.Array, KVCache], Any]


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")


def choose_tokens(logits_bv: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """(B, V) float32 logits -> (B,) int32 next tokens."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv / sampling.temperature
    neg = jnp.finfo(logits.dtype).min
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest set whose mass reaches top_p (always at least the best token)
        cutoff_idx = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < sampling.top_p, axis=-1) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx[:, None], axis=-1)
        logits = jnp.where(logits < cutoff, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _default_model_fn(module) -> ModelFn:
    """The backbone with the head on the last position only (all a decode step reads): prefill never computes
    (B, T, V) logits."""
    def fn(params, ids_bt, mask_bt, cache):
        h, new_cache = module.apply({"params": params}, ids_bt, mask_bt, cache=cache, method="hidden_states")
        logits = module.apply({"params": params}, h[:, -1:], mask_bt[:, -1:], method="head")
        return ModelOutput(logits=logits, cache=new_cache)
    return fn


def _bucket(n: int, size: int) -> int:
    return max(size, -(-n // size) * size)


_COMPILED: dict[Any, Callable] = {}


def generate(module, params: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
             sampling: SamplingConfig = SamplingConfig(), seed: int = 0, bucket: int = 32,
             model_fn: ModelFn | None = None, cache_key: Any = None,
             init_cache: Callable[[int, int], KVCache] | None = None, position_shift: int = 0,
             replicated: Any = None) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; stop a row at its first stop token.

    prompts: token-id lists of any lengths (left-padded internally to a multiple of `bucket`).
    model_fn(params, ids_bt, mask_bt, cache) -> ModelOutput overrides the forward (adapters use it; pass a
    `cache_key` that identifies it so its compiled function is reused); only logits[:, -1] are read, so it may
    compute the head at the last position alone (the default does). init_cache(batch, max_len) -> KVCache
    lets the model own its decode state (prefix adapters reserve their slots: `AdaptedModel.init_cache`);
    position_shift: how far the model shifts positions (counted against GPT-2's learned positions).
    replicated: a replicated NamedSharding of the mesh `params` live on: prompts, cache and key are placed with
    it and the compiled function returns the tokens whole on every process (multi-device and multi-process).
    Returns the new tokens per row, the stop token included when one was produced.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    cfg = module.cfg
    b, p_len = len(prompts), _bucket(max(len(p) for p in prompts), bucket)
    if p_len + max_new_tokens + position_shift > cfg.max_position_embeddings and cfg.arch == "gpt2":
        shift = f" + prefix position shift ({position_shift})" if position_shift else ""
        raise ValueError(f"prompt ({p_len}) + max_new_tokens ({max_new_tokens}){shift} exceeds gpt2's "
                         f"{cfg.max_position_embeddings} learned positions")
    ids = np.full((b, p_len), pad_token_id, np.int32)
    mask = np.zeros((b, p_len), bool)
    for i, p in enumerate(prompts):
        ids[i, p_len - len(p):] = p
        mask[i, p_len - len(p):] = True
    key = (cache_key if model_fn is not None else module, b, p_len, max_new_tokens, tuple(eos_token_ids),
           pad_token_id, sampling, replicated)
    if key not in _COMPILED:
        _COMPILED[key] = _build(module, model_fn or _default_model_fn(module), b, p_len, max_new_tokens,
                                tuple(eos_token_ids), pad_token_id, sampling, replicated)
    if init_cache is not None:
        cache = init_cache(b, p_len + max_new_tokens)
    else:
        cache = KVCache.init(cfg.num_layers, b, p_len + max_new_tokens, cfg.num_kv_heads, cfg.head_dim,
                             jnp_dtype(cfg.dtype))
    inputs = (jnp.asarray(ids), jnp.asarray(mask), cache, np.uint32(seed))
    if replicated is not None:  # global arrays: every process passes the same values
        inputs = jax.tree.map(lambda x: place_host(x, replicated), (ids, mask, cache, np.uint32(seed)))
    out = np.asarray(_COMPILED[key](params, *inputs))
    results = []
    for row in out:
        toks = []
        for t in row.tolist():
            toks.append(t)
            if t in eos_token_ids:
                break
        results.append(toks)
    return results


def _build(module, model_fn: ModelFn, b: int, p_len: int, max_new: int, eos: tuple[int, ...], pad: int,
           sampling: SamplingConfig, replicated: Any = None):
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)

    def run(params, ids_bt, mask_bt, cache, seed):
        rng = jax.random.key(seed)
        out = model_fn(params, ids_bt, mask_bt, cache)
        rng, sub = jax.random.split(rng)
        tok = choose_tokens(out.logits[:, -1], sub, sampling)
        done = jnp.isin(tok, eos_arr)

        def step(carry, _):
            cache, tok, done, rng = carry
            o = model_fn(params, tok[:, None], jnp.ones((b, 1), bool), cache)
            rng, sub = jax.random.split(rng)
            nxt = choose_tokens(o.logits[:, -1], sub, sampling)
            nxt = jnp.where(done, pad, nxt)
            return (o.cache, nxt, done | jnp.isin(nxt, eos_arr), rng), nxt

        if max_new == 1:
            return tok[:, None]
        _, rest = jax.lax.scan(step, (out.cache, tok, done, rng), None, length=max_new - 1)
        return jnp.concatenate([tok[:, None], rest.T], axis=1)

    # the cache is donated where the backend can reuse its buffers (not on CPU)
    donate = (3,) if jax.default_backend() != "cpu" else ()
    if replicated is None:
        return jax.jit(run, donate_argnums=donate)
    return jax.jit(run, donate_argnums=donate, out_shardings=replicated)
