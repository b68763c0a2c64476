"""IMSM: the gate forced to 0 gives the inner adapter's logits and forced to 1 the base model's (the base stream is
W0 itself, also under KaSA's truncation or a prefix's position shift); no gradient reaches the frozen weights
through the base stream; cached generation equals an uncached greedy loop on left-padded prompts; the parameter
count is the inner method's plus 5 d r_g (3 d r_g without query terms); the nested config round-trips through YAML
and the jaxpeft adapter format.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import adapter_fixtures as af  # noqa: E402
import hf_tiny  # noqa: E402
from jaxpeft.adapters import (AdaptedModel, APTConfig, IMSMConfig, KasaConfig, LoraConfig,  # noqa: E402
                              load_adapter, save_adapter)
from jaxpeft.adapters.partition import count_parameters  # noqa: E402
from jaxpeft.models import ModelConfig, build_model  # noqa: E402
from parity import assert_close  # noqa: E402

INNERS = {
    "lora": LoraConfig(r=4, init_lora_weights=False, target_modules=("q_proj", "v_proj")),
    "kasa": KasaConfig(r=4, init_lora_weights=False, target_modules=("q_proj", "v_proj")),
    "apt": APTConfig(num_virtual_tokens=3, gate_init="normal", gate_init_std=0.5),
}


def _model(tiny, cfg, seed=0):
    am = AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)).add(af.NAME, cfg)
    return am, am.init(jax.random.key(seed), tiny.params)


@pytest.mark.parametrize("inner", list(INNERS))
def test_fixed_gate_0_gives_the_inner_adapter_and_1_the_base_model(inner):
    tiny = hf_tiny.load("llama", "causal_lm")
    ids, mask, jkw, _ = af.inputs(tiny)
    am_in, st_in = _model(tiny, INNERS[inner])
    ref_inner = np.asarray(af.jitted(am_in)(tiny.params, st_in, ids, mask, jkw))
    ref_base = np.asarray(af.jitted_base(tiny.cfg, tiny.task)(tiny.params, ids, mask, jkw))
    assert np.abs(ref_inner - ref_base)[mask.astype(bool)].max() > 1e-2
    for fixed, ref in ((0.0, ref_inner), (1.0, ref_base)):
        am, st = _model(tiny, IMSMConfig(inner=INNERS[inner], use_gate=False, fixed_gate=fixed))
        out = np.asarray(af.jitted(am)(tiny.params, st, ids, mask, jkw))
        assert_close(out, ref, mask, max_abs=1e-5, what=f"IMSM({inner}) gate {fixed}")


def test_no_gradient_reaches_the_frozen_weights_through_the_base_stream():
    tiny = hf_tiny.load("llama", "causal_lm")
    ids, mask, jkw, _ = af.inputs(tiny)

    def grads(fixed):
        am, st = _model(tiny, IMSMConfig(inner=INNERS["lora"], use_gate=False, fixed_gate=fixed))
        loss = lambda fr: jnp.sum(am.apply(fr, st, ids, mask, **jkw).logits ** 2)  # noqa: E731
        return jax.grad(loss)(tiny.params)

    # the head reads the mixed states (its weights do get gradients); the layers and final norm below it only
    # through the streams: none through the base stream, some through the tuned one
    body = lambda g: [g["layers"], g["norm"]]  # noqa: E731
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(body(grads(1.0))))
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(body(grads(0.0)))) > 0


def test_learned_gate_mixes_both_streams_and_dropout_needs_a_key():
    tiny = hf_tiny.load("llama", "causal_lm")
    ids, mask, jkw, _ = af.inputs(tiny)
    am, st = _model(tiny, IMSMConfig(inner=INNERS["lora"]))
    out, probes = am.apply(tiny.params, st, ids, mask, capture=True, **jkw)
    g = np.asarray(probes["probes"][f"{af.NAME}:gate"])
    assert g.shape == ids.shape + (tiny.cfg.hidden_size,) and 0.3 < g.mean() < 0.7  # torch init: g ~ 0.5
    with pytest.raises(ValueError, match="rngs"):
        am.apply(tiny.params, st, ids, mask, deterministic=False, **jkw)
    a = am.apply(tiny.params, st, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(1)}, **jkw)
    assert np.abs(np.asarray(a.logits) - np.asarray(out.logits)).max() > 1e-4


@pytest.mark.parametrize("inner", ["lora", "apt"])
def test_doubled_batch_pass_equals_two_separate_passes(inner):
    tiny = hf_tiny.load("llama", "causal_lm")
    ids, mask, jkw, _ = af.inputs(tiny)
    am, st = _model(tiny, IMSMConfig(inner=INNERS[inner]))
    two = am.apply(tiny.params, st, ids, mask, siamese_form="separate", **jkw)
    one = am.apply(tiny.params, st, ids, mask, siamese_form="doubled", **jkw)
    assert_close(np.asarray(one.logits), np.asarray(two.logits), mask, max_abs=1e-5, what=f"IMSM({inner}) doubled")
    with pytest.raises(ValueError, match="deterministic=True"):
        am.apply(tiny.params, st, ids, mask, siamese_form="doubled", deterministic=False,
                 rngs={"dropout": jax.random.key(0)}, **jkw)


def test_cached_generation_equals_uncached_greedy_on_left_padded_prompts():
    from jaxpeft.train.loop import generate_with_adapter

    tiny = hf_tiny.load("llama", "causal_lm")
    am, st = _model(tiny, IMSMConfig(inner=INNERS["apt"]))
    prompts = [[5, 9, 13, 7, 21], [8, 4], [17, 3, 30]]
    new = 5
    got = generate_with_adapter(am, tiny.params, st, prompts, max_new_tokens=new, eos_token_ids=[], pad_token_id=0,
                                batch_size=4)  # the default decode state: one doubled cache
    import dataclasses

    separate = dataclasses.replace(am)  # a distinct (equal) model object: its own compiled decode
    original = separate.init_cache
    object.__setattr__(separate, "init_cache", lambda *a, **k: original(*a, **dict(k, siamese_form="separate")))
    assert generate_with_adapter(separate, tiny.params, st, prompts, max_new_tokens=new, eos_token_ids=[],
                                 pad_token_id=0, batch_size=4) == got
    # uncached: the whole sequence each step (right-padded to one length, so one compile; causal attention keeps
    # the pads out of the last real position), the query = the prompt tokens
    width = max(map(len, prompts)) + new
    full = jax.jit(lambda ids, mask, pm: am.apply(tiny.params, st, ids, mask, prompt_mask_bt=pm).logits)
    for prompt, out in zip(prompts, got):
        seq = list(prompt)
        for _ in range(new):
            ids = jnp.asarray([seq + [0] * (width - len(seq))], jnp.int32)
            mask = jnp.asarray([[i < len(seq) for i in range(width)]])
            pm = jnp.asarray([[i < len(prompt) for i in range(width)]])
            seq.append(int(jnp.argmax(full(ids, mask, pm)[0, len(seq) - 1])))
        assert out == seq[len(prompt):], (prompt, out, seq)


def test_parameter_count_is_inner_plus_5_d_r_or_3_d_r_without_query():
    cfg = ModelConfig.from_hf(af.smollm2_hf_config().to_dict())
    frozen = af.abstract_params(cfg, "causal_lm")
    inner = LoraConfig(r=8, target_modules=("q_proj", "v_proj"))
    for use_query, factor in ((True, 5), (False, 3)):
        am = AdaptedModel.wrap(build_model(cfg, "causal_lm")).add(af.NAME, IMSMConfig(inner=inner, use_query=use_query))
        state = jax.eval_shape(lambda fr: am.init(jax.random.key(0), fr), frozen)
        assert count_parameters(am, state, frozen)[0] == 460_800 + factor * 576 * 8
    assert factor == 3  # both variants ran; docs/methods/imsm.md, Trainable parameters: 460,800 + 23,040 = 483,840


def test_nested_config_from_yaml_and_the_jaxpeft_format_round_trip(tmp_path):
    from jaxpeft.train.config import AdapterSection

    cfg = AdapterSection(method="imsm", gate_rank=4, inner={"method": "lora", "r": 4, "init_lora_weights": False,
                                                             "target_modules": ["q_proj"]}).build()
    assert isinstance(cfg.inner, LoraConfig) and cfg.inner.target_modules == ("q_proj",) and cfg.gate_rank == 4
    tiny = hf_tiny.load("llama", "causal_lm")
    am, st = _model(tiny, cfg, seed=3)
    save_adapter(am, st, af.NAME, tmp_path)
    am2, st2 = load_adapter(AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)), tiny.params, tmp_path)
    assert am2.spec(af.NAME).wrapper == cfg
    ids, mask, jkw, _ = af.inputs(tiny)
    np.testing.assert_array_equal(np.asarray(af.jitted(am)(tiny.params, st, ids, mask, jkw)),
                                  np.asarray(af.jitted(am2)(tiny.params, st2, ids, mask, jkw)))


@pytest.mark.parametrize("kw,match", [
    (dict(), "inner"), (dict(inner={"r": 4}), "method"), (dict(inner=LoraConfig(), gate_rank=0), "gate_rank"),
    (dict(inner=LoraConfig(), target_modules=("q_proj",)), "set it on the inner method"),
    (dict(inner=LoraConfig(), fixed_gate=2.0), "fixed_gate"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        IMSMConfig(**kw)


def test_imsm_cannot_be_merged_or_exported_to_peft():
    from jaxpeft.adapters.merge import merge
    from jaxpeft.adapters.peft_io import peft_unsupported_reason

    tiny = hf_tiny.load("llama", "causal_lm")
    am, st = _model(tiny, IMSMConfig(inner=INNERS["lora"]))
    assert "no Hugging Face PEFT format" in peft_unsupported_reason(am, af.NAME)
    with pytest.raises(ValueError, match="cannot be merged"):
        merge(am, tiny.params, st, af.NAME)
