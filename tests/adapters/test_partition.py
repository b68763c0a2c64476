"""Frozen / trainable partitions and optimizer state.

- AdamW on the trainable tree only: its state is exactly 2x the trainable bytes plus the step count.
- `partitioned_optimizer` on a tree mixing frozen and trainable leaves: frozen leaves never move and hold no
  optimizer state; `optax.masked` alone is the trap: it passes raw gradients through for masked-out leaves,
  so the "frozen" leaves move.
- A training step with bf16 frozen weights and an f32 LoRA: gradients are f32, the loss falls, the frozen tree
  is never touched.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import adapter_fixtures as af  # noqa: E402
from jaxpeft.adapters import AdaptedModel, LoraConfig  # noqa: E402
from jaxpeft.adapters.partition import (join_state, partitioned_optimizer, split_state,  # noqa: E402
                                        tree_bytes)
from jaxpeft.models import build_model  # noqa: E402

COUNT_BYTES = 4  # optax's int32 step count


# ---------------------------------------------------------------------------------------------- mixed tree


def _mixed():
    rng = np.random.RandomState(0)
    params = {"frozen": {"w": jnp.asarray(rng.randn(8, 8), jnp.float32), "b": jnp.asarray(rng.randn(8), jnp.float32)},
              "adapter": {"a": jnp.asarray(rng.randn(8, 2), jnp.float32),
                          "b2": jnp.asarray(rng.randn(2, 8), jnp.float32)}}
    mask = {"frozen": {"w": False, "b": False}, "adapter": {"a": True, "b2": True}}
    x = jnp.asarray(rng.randn(16, 8), jnp.float32)
    y = jnp.asarray(rng.randn(16, 8), jnp.float32)

    def loss(p):
        w = p["frozen"]["w"] + p["adapter"]["a"] @ p["adapter"]["b2"]
        return jnp.mean((x @ w + p["frozen"]["b"] - y) ** 2)

    return params, mask, loss


def _train(tx, params, loss, steps=5):
    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@pytest.mark.parametrize("as_callable", [False, True])
def test_partitioned_optimizer_freezes_and_holds_no_state(as_callable):
    params, mask, loss = _mixed()
    tx = partitioned_optimizer(optax.adamw(1e-2, weight_decay=0.1), (lambda p: mask) if as_callable else mask)
    new, state = _train(tx, params, loss)
    for k in ("w", "b"):
        assert np.array_equal(np.asarray(new["frozen"][k]), np.asarray(params["frozen"][k])), k
    for k in ("a", "b2"):
        assert np.abs(np.asarray(new["adapter"][k]) - np.asarray(params["adapter"][k])).max() > 1e-3, k
    assert float(loss(new)) < float(loss(params))
    # Adam's mu and nu for the adapter leaves only, plus the step count
    assert tree_bytes(state) == 2 * tree_bytes(params["adapter"]) + COUNT_BYTES
    shapes = {tuple(x.shape) for x in jax.tree.leaves(state)}
    assert (8, 8) not in shapes and (8,) not in shapes, "frozen leaves must hold no optimizer state"


def test_optax_masked_alone_moves_frozen_leaves():
    """The trap: optax.masked leaves masked-out updates as the raw gradients, so apply_updates adds them."""
    params, mask, loss = _mixed()
    tx = optax.masked(optax.adamw(1e-2, weight_decay=0.1), mask)
    new, _ = _train(tx, params, loss, steps=1)
    g = jax.grad(loss)(params)
    for k in ("w", "b"):
        moved = np.asarray(new["frozen"][k]) - np.asarray(params["frozen"][k])
        assert np.abs(moved).max() > 1e-3, f"{k} did not move: the trap is gone?"
        np.testing.assert_allclose(moved, np.asarray(g["frozen"][k]), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def bf16_lora():
    """Small llama with bf16 frozen weights (f32 compute) and an f32 LoRA (q, v, r 4; B = 0 at init)."""
    cfg = af.small_cfg(param_dtype="bfloat16")
    frozen = af.random_params(cfg, "causal_lm", seed=5)
    am = AdaptedModel.wrap(build_model(cfg)).add("default", LoraConfig(r=4, lora_alpha=8.0))
    state = am.init(jax.random.key(5), frozen)
    ids = jnp.asarray(np.random.RandomState(5).randint(3, cfg.vocab_size, (4, 12)), jnp.int32)
    return cfg, frozen, am, state, ids


def test_adamw_state_is_twice_the_trainable_bytes_plus_count(bf16_lora):
    _, frozen, _, state, _ = bf16_lora
    trainable, extras = split_state(state)
    assert join_state(trainable, extras) == state
    opt_state = optax.adamw(1e-3).init(trainable)
    t_bytes = tree_bytes(trainable)
    assert t_bytes == 4 * 2 * (32 * 4 + 4 * 32 + 32 * 4 + 4 * 16)  # f32, 2 layers, q (32->32), v (32->16)
    assert tree_bytes(opt_state) == 2 * t_bytes + COUNT_BYTES
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(opt_state) if x.ndim)
    assert tree_bytes(frozen) == sum(x.size * 2 for x in jax.tree.leaves(frozen)), "frozen is bf16"


def test_bf16_frozen_f32_adapter_training_step(bf16_lora):
    cfg, frozen, am, state, ids = bf16_lora
    trainable, extras = split_state(state)
    tx = optax.adamw(3e-2)

    def loss_fn(tr, frozen, ids):
        logits = am.apply(frozen, join_state(tr, extras), ids[:, :-1]).logits
        logp = jax.nn.log_softmax(logits, -1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))

    @jax.jit
    def step(tr, opt, frozen, ids):
        loss, g = jax.value_and_grad(loss_fn)(tr, frozen, ids)
        upd, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, upd), opt, loss, g

    frozen_before = jax.tree.map(lambda x: np.asarray(x.astype(jnp.float32)), frozen)
    opt = tx.init(trainable)
    tr, losses = trainable, []
    for i in range(6):
        tr, opt, loss, g = step(tr, opt, frozen, ids)
        losses.append(float(loss))
        if i == 0:
            leaves = jax.tree_util.tree_flatten_with_path(g)[0]
            assert leaves and all(x.dtype == jnp.float32 for _, x in leaves)
            assert all(np.isfinite(np.asarray(x)).all() for _, x in leaves)
            b_grads = [np.abs(np.asarray(x)).max() for p, x in leaves if "lora_B" in jax.tree_util.keystr(p)]
            assert b_grads and min(b_grads) > 0, "B must get a gradient at step 0 (A's is 0 while B = 0)"
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tr))
    assert losses[-1] < losses[0] - 1e-3, losses
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(frozen))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), b), frozen,
                 frozen_before)
