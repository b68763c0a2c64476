"""KV-cache decoding equals the full forward: a left-padded prompt through the cache, then single tokens
(or chunks) with mask ones; the logits at each step equal the full-sequence forward at that position, and
match transformers' full forward too. gemma3's sliding window (4) is shorter than prompt + generated (13)."""
import functools

import jax
import numpy as np
import pytest

import hf_tiny
from jaxpeft.models import KVCache, build_model
from parity import assert_close

TOL = dict(max_abs=1e-4, rel=1e-5)
P, N = 7, 6                 # prompt length (incl. left pads), generated tokens
LEFT_PADS = (0, 2, 4)       # one row per entry
EXTRA_SLOTS = 3             # cache longer than needed: unused slots must stay invisible


@functools.lru_cache(maxsize=None)
def _apply(cfg):
    module = build_model(cfg, "causal_lm")
    return jax.jit(lambda p, ids, mask, cache: module.apply({"params": p}, ids, mask, cache=cache))


def _inputs(tiny):
    rs = np.random.RandomState(5)
    b = len(LEFT_PADS)
    ids = rs.randint(3, hf_tiny.VOCAB, (b, P + N)).astype(np.int64)
    mask = np.ones((b, P + N), np.int64)
    for r, left in enumerate(LEFT_PADS):
        mask[r, :left] = 0
    ids[mask == 0] = tiny.pad_id
    return ids, mask


def _empty_cache(cfg, b):
    return KVCache.init(cfg.num_layers, b, P + N + EXTRA_SLOTS, cfg.num_kv_heads, cfg.head_dim)


def _decode(tiny, ids, mask, chunk):
    """Prompt through the cache, then `chunk` tokens at a time: (B, P+N, V) logits assembled from the steps."""
    cfg, params = tiny.cfg, tiny.params
    step = _apply(cfg)
    out = step(params, ids[:, :P], mask[:, :P], _empty_cache(cfg, ids.shape[0]))
    logits = [np.asarray(out.logits)]
    cache = out.cache
    for s in range(P, P + N, chunk):
        out = step(params, ids[:, s:s + chunk], np.ones((ids.shape[0], chunk), np.int64), cache)
        cache = out.cache
        logits.append(np.asarray(out.logits))
    return np.concatenate(logits, axis=1), cache


@pytest.mark.parametrize("name", ["llama", "gemma3", "qwen2", "gpt2"])
def test_token_by_token_decoding_matches_full_forward(name):
    tiny = hf_tiny.load(name, "causal_lm")
    ids, mask = _inputs(tiny)
    full = hf_tiny.jax_forward(tiny.cfg, "causal_lm", tiny.params, ids, mask).logits
    cached, cache = _decode(tiny, ids, mask, chunk=1)
    # prompt (non-pad positions) and every generated step
    assert_close(cached[:, :P], full[:, :P], mask[:, :P], **TOL, what=f"{name} prompt through cache")
    for s in range(P, P + N):
        assert_close(cached[:, s], full[:, s], **TOL, what=f"{name} step {s - P}")
    # and the same as transformers' full forward
    ref = hf_tiny.hf_forward(tiny, ids, mask).logits.numpy()
    assert_close(cached, ref, mask, **TOL, what=f"{name} cached vs HF")
    # bookkeeping
    assert int(cache.index) == P + N
    np.testing.assert_array_equal(np.asarray(cache.next_pos), mask.sum(1))
    valid = np.zeros((len(LEFT_PADS), P + N + EXTRA_SLOTS), bool)
    valid[:, :P + N] = mask.astype(bool)
    np.testing.assert_array_equal(np.asarray(cache.key_valid), valid)
    assert cache.k.shape == (tiny.cfg.num_layers, len(LEFT_PADS), P + N + EXTRA_SLOTS,
                             tiny.cfg.num_kv_heads, tiny.cfg.head_dim)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_chunked_decoding_matches_full_forward(name):
    """Several new tokens per call (causal inside the chunk, sliding window across chunks)."""
    tiny = hf_tiny.load(name, "causal_lm")
    ids, mask = _inputs(tiny)
    full = hf_tiny.jax_forward(tiny.cfg, "causal_lm", tiny.params, ids, mask).logits
    cached, _ = _decode(tiny, ids, mask, chunk=2)
    assert_close(cached, full, mask, **TOL, what=f"{name} chunked decode")


def test_gemma3_window_is_shorter_than_the_decoded_sequence():
    """Guard: the gemma3 cache case must cross the sliding window, and the window must matter there."""
    tiny = hf_tiny.load("gemma3", "causal_lm")
    assert tiny.cfg.sliding_window < P + N - max(LEFT_PADS)
    ids, mask = _inputs(tiny)
    wide = tiny.cfg.replace(sliding_window=P + N)
    a = np.asarray(hf_tiny.jax_forward(tiny.cfg, "causal_lm", tiny.params, ids, mask).logits)[:, -1]
    b = np.asarray(hf_tiny.jax_forward(wide, "causal_lm", tiny.params, ids, mask).logits)[:, -1]
    assert np.abs(a - b).max() > 1e-2


def test_empty_cache_layout():
    c = KVCache.init(3, 2, 5, 4, 8)
    assert c.k.shape == c.v.shape == (3, 2, 5, 4, 8)
    assert c.key_valid.shape == (2, 5) and not bool(c.key_valid.any())
    assert int(c.index) == 0 and c.next_pos.shape == (2,)
    assert c.max_len == 5
