"""LoRA on real SmolLM2 weights and the real arithmetic task: validation loss falls; the zero-initialised adapter
starts exactly at the base model; the frozen tree passed in keeps every leaf object and byte, and the base model
computes bitwise the same validation loss after training as before."""
import json

from jaxpeft.bundled import dataset_path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpeft.adapters import AdaptedModel, LoraConfig

pytestmark = pytest.mark.real_weights
DATA = dataset_path("arithmetic")
SEQ = 32


def _encode(tok, rows):
    """Prompt + ' ' + response + EOS, right-padded; loss mask on the response tokens and EOS."""
    eos = tok.eos_token_ids[0]
    ids = np.full((len(rows), SEQ), eos, np.int32)
    loss_mask = np.zeros((len(rows), SEQ), np.float32)
    attn = np.zeros((len(rows), SEQ), np.int32)
    for i, r in enumerate(rows):
        p = tok.encode(r["prompt"])
        a = tok.encode(" " + r["response"]) + [eos]
        seq = (p + a)[:SEQ]
        ids[i, : len(seq)] = seq
        attn[i, : len(seq)] = 1
        loss_mask[i, len(p): len(seq)] = 1
    return ids, attn, loss_mask


def _masked_nll(logits, ids, mask):
    """Mean -log p(next token) over the loss-mask positions."""
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    m = mask[:, 1:]
    return jnp.sum(nll * m) / jnp.sum(m)


def test_lora_twenty_steps_on_smollm2_arithmetic_cut_val_loss_and_keep_base_bitwise(smollm2_gguf):
    from jaxpeft import load_pretrained

    pre = load_pretrained(smollm2_gguf)
    frozen = pre.params
    frozen_copy = jax.tree.map(lambda x: np.array(x), frozen)  # the bytes, taken before anything runs
    leaves_before = dict(jax.tree_util.tree_leaves_with_path(frozen))  # the leaf objects in the dict passed in
    model = AdaptedModel.wrap(pre.module).add("default", LoraConfig(r=8, lora_alpha=16))
    state = model.init(jax.random.key(0), frozen)
    train = [json.loads(line) for line in open(DATA / "train.jsonl")][:160]
    val = [json.loads(line) for line in open(DATA / "validation.jsonl")][:64]
    v_ids, v_attn, v_mask = _encode(pre.tokenizer, val)

    def loss_fn(trainable, ids, attn, mask):
        st = {"trainable": trainable, "extras": state["extras"]}
        return _masked_nll(model.apply(frozen, st, ids, attn).logits, ids, mask)

    @jax.jit
    def base_loss(params, ids, attn, mask):  # the plain backbone on whatever `params` holds (an argument)
        return _masked_nll(pre.module.apply({"params": params}, ids, attn).logits, ids, mask)

    tx = optax.adamw(2e-3, weight_decay=0.0)
    trainable = state["trainable"]
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state, ids, attn, mask):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, ids, attn, mask)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    eval_loss = jax.jit(loss_fn)
    loss0 = float(eval_loss(trainable, v_ids, v_attn, v_mask))
    first = _encode(pre.tokenizer, train[:8])
    base0 = float(base_loss(frozen, *first))
    for s in range(20):
        batch = train[(s * 8) % len(train):(s * 8) % len(train) + 8]
        trainable, opt_state, loss = step(trainable, opt_state, *_encode(pre.tokenizer, batch))
        if s == 0:  # B = 0: the adapted model is the base model (not bitwise: XLA fuses the graphs differently)
            assert float(loss) == pytest.approx(base0, rel=1e-5, abs=0), (float(loss), base0)
    loss1 = float(eval_loss(trainable, v_ids, v_attn, v_mask))
    print(f"val loss {loss0:.4f} -> {loss1:.4f}")
    assert loss1 <= 0.6 * loss0, (loss0, loss1)  # measured 2.43 -> 1.02
    # the dict passed in: same paths, every leaf the very object it was, every byte as before
    leaves_after = dict(jax.tree_util.tree_leaves_with_path(frozen))
    assert leaves_after.keys() == leaves_before.keys()
    replaced = [jax.tree_util.keystr(k) for k, x in leaves_after.items() if x is not leaves_before[k]]
    assert replaced == [], f"leaves replaced in the frozen tree: {replaced[:5]}"
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), b)), frozen, frozen_copy))
    # and the base model still computes exactly what it computed before training
    assert float(base_loss(frozen, *first)) == base0
