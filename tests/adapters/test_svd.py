"""The shared SVD core and what every SVD-family method must satisfy: float32 decompositions (bf16 weights upcast),
the randomized SVD, the model equals the base at step 0 (PiSSA, SORSA, SVFit, CorDA, SALT), merge reproduces the
adapted forward, trainable counts equal the worked counts of docs/methods/{pissa,corda,kasa,sorsa,svfit,salt}.md
(Trainable parameters), and no frozen extra but SALT's is a second copy of a base weight.
"""
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import adapter_fixtures as af  # noqa: E402
import hf_tiny  # noqa: E402
from jaxpeft.adapters import (AdaptedModel, CordaConfig, KasaConfig, PissaConfig, SaltConfig, SorsaConfig,  # noqa: E402
                              SvfitConfig)
from jaxpeft.adapters.merge import merge  # noqa: E402
from jaxpeft.adapters.partition import count_parameters  # noqa: E402
from jaxpeft.adapters.svd import randomized_svd_f32, svd_f32  # noqa: E402
from jaxpeft.models import ModelConfig, build_model  # noqa: E402
from parity import assert_close  # noqa: E402

TARGETS = ("q_proj", "v_proj", "down_proj")  # square, narrowing (GQA v) and wide-to-narrow shapes
METHOD_CONFIGS = {
    "pissa": PissaConfig(r=4, target_modules=TARGETS),
    "pissa_niter_2": PissaConfig(r=4, niter=2, target_modules=TARGETS),
    "sorsa": SorsaConfig(r=4, target_modules=TARGETS),
    "sorsa_alpha": SorsaConfig(r=4, lora_alpha=8.0, target_modules=TARGETS),
    "svfit": SvfitConfig(r=4, target_modules=TARGETS),
    "salt": SaltConfig(r=4, r_top=4, target_modules=TARGETS),
    "corda_ipm": CordaConfig(r=4, target_modules=TARGETS),
    "corda_kpm": CordaConfig(r=4, corda_method="kpm", target_modules=TARGETS),
}


def calibration_examples(tiny, n=3):
    ids, mask = hf_tiny.batch(tiny)
    return [ids[i][mask[i].astype(bool)] for i in range(n)]


def build(tiny, cfg, seed=0):
    am = AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)).add(af.NAME, cfg)
    calib = None
    if cfg.method == "corda":
        calib = {af.NAME: am.calibrate(tiny.params, calibration_examples(tiny), af.NAME)}
    return am, am.init(jax.random.key(seed), tiny.params, calibration=calib)


def test_svd_f32_upcasts_bf16_and_reconstructs():
    w = jax.random.normal(jax.random.key(0), (24, 16)).astype(jnp.bfloat16)
    p, s, q = svd_f32(w)
    assert p.dtype == s.dtype == q.dtype == jnp.float32 and p.shape == (24, 16) and q.shape == (16, 16)
    assert bool(jnp.all(s[:-1] >= s[1:]))
    np.testing.assert_allclose(np.asarray((p * s) @ q.T), np.asarray(w, np.float32), atol=1e-5)


def test_randomized_svd_finds_the_top_triplets():
    k = jax.random.split(jax.random.key(1), 3)
    u, _ = jnp.linalg.qr(jax.random.normal(k[0], (40, 30)))
    v, _ = jnp.linalg.qr(jax.random.normal(k[1], (30, 30)))
    sigma = jnp.concatenate([jnp.array([9.0, 7.0, 5.0, 4.0]), 0.1 * jnp.ones(26)])
    w = (u * sigma) @ v.T
    p, s, q = randomized_svd_f32(w, 4, 4, k[2])
    np.testing.assert_allclose(np.asarray(s), [9.0, 7.0, 5.0, 4.0], rtol=1e-3)
    np.testing.assert_allclose(np.asarray((p * s) @ q.T), np.asarray((u[:, :4] * sigma[:4]) @ v[:, :4].T), atol=1e-2)


@pytest.mark.parametrize("case", list(METHOD_CONFIGS))
def test_step0_model_equals_the_base(case):
    tiny = hf_tiny.load("llama", "causal_lm")
    am, state = build(tiny, METHOD_CONFIGS[case])
    ids, mask, jkw, _ = af.inputs(tiny)
    ours = np.asarray(af.jitted(am)(tiny.params, state, ids, mask, jkw))
    base = np.asarray(af.jitted_base(tiny.cfg, tiny.task)(tiny.params, ids, mask, jkw))
    assert_close(ours, base, mask, max_abs=1e-5, what=f"{case} at step 0")
    # and the adapter is live: moving its trainable leaves moves the logits
    moved = jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), state["trainable"])
    out = np.asarray(af.jitted(am)(tiny.params, {"trainable": moved, "extras": state["extras"]}, ids, mask, jkw))
    assert np.abs(out - base)[mask.astype(bool)].max() > 1e-3


@pytest.mark.parametrize("case", list(METHOD_CONFIGS))
def test_merge_reproduces_the_adapted_forward(case):
    tiny = hf_tiny.load("llama", "causal_lm")
    am, state = build(tiny, METHOD_CONFIGS[case])
    rng = np.random.RandomState(3)
    moved = jax.tree.map(lambda x: x + jnp.asarray(0.1 * rng.randn(*x.shape), x.dtype), state["trainable"])
    state = {"trainable": moved, "extras": state["extras"]}
    merged, _ = merge(am, tiny.params, state, af.NAME)
    ids, mask, jkw, _ = af.inputs(tiny)
    ours = np.asarray(af.jitted(am)(tiny.params, state, ids, mask, jkw))
    ref = np.asarray(af.jitted_base(tiny.cfg, tiny.task)(merged, ids, mask, jkw))
    assert_close(ours, ref, mask, max_abs=1e-4, what=f"{case} merge")


def _abstract_state(make, task, cfg):
    """(model, shape-only state, shape-only frozen) on a full-size config: nothing is allocated or decomposed."""
    mcfg = ModelConfig.from_hf(make().to_dict())
    frozen = af.abstract_params(mcfg, task)
    am = AdaptedModel.wrap(build_model(mcfg, task)).add(af.NAME, cfg)
    calib = am.placeholder_calibration(af.NAME)
    state = jax.eval_shape(lambda fr, c: am.init(jax.random.key(0), fr, calibration=c), frozen,
                           None if calib is None else {af.NAME: calib})
    return am, state, frozen


# docs/methods/<method>.md, Trainable parameters: r = 8 (SALT r_t = r_lora = 8) on q and v
SECTION_15 = {
    "pissa": (PissaConfig, {}, 460_800, 294_912),
    "corda": (CordaConfig, {}, 460_800, 294_912),
    "kasa": (KasaConfig, {}, 461_280, 295_104),
    "sorsa": (SorsaConfig, {}, 461_280, 295_104),
    "svfit": (SvfitConfig, {}, 480, 192),
    "salt": (SaltConfig, dict(r_top=8), 361_920, 292_224),
}


@pytest.mark.parametrize("method", list(SECTION_15))
def test_trainable_counts_equal_section_15(method):
    cls, kw, smol, bert = SECTION_15[method]
    for make, task, targets, expected in ((af.smollm2_hf_config, "causal_lm", ("q_proj", "v_proj"), smol),
                                          (af.bert_base_hf_config, "base", ("query", "value"), bert)):
        am, state, frozen = _abstract_state(make, task, cls(r=8, target_modules=targets, **kw))
        assert count_parameters(am, state, frozen)[0] == expected, (method, task)


@pytest.mark.parametrize("method", list(SECTION_15))
def test_no_frozen_extra_is_a_second_copy_of_a_base_weight_except_salt(method):
    """On SmolLM2 shapes with every linear layer of a block targeted (square, narrowing, widening)."""
    cls, kw, _, _ = SECTION_15[method]
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    am, state, _ = _abstract_state(af.smollm2_hf_config, "causal_lm", cls(r=8, target_modules=targets, **kw))
    full = []
    for t in am.spec(af.NAME).targets:
        node = af.get(state["extras"][af.NAME]["modules"], t.flax_module)
        for key, v in node.items():
            if v.shape[-2:] == (t.n_in, t.n_out) or (v.ndim >= 2 and v.shape[-2] * v.shape[-1] >= t.n_in * t.n_out):
                full.append((t.hf_module, key, v.shape))
    if method == "salt":  # the documented exception: the full U and V
        assert full and all(key in ("salt_U", "salt_Vt") for _, key, _ in full)
    else:
        assert full == []


def test_corda_without_calibration_is_a_clear_error():
    tiny = hf_tiny.load("llama", "causal_lm")
    am = AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)).add(af.NAME, CordaConfig(r=4))
    with pytest.raises(ValueError, match="needs calibration statistics"):
        am.init(jax.random.key(0), tiny.params)
    with pytest.raises(ValueError, match="one unpadded example per forward"):
        ids, _ = hf_tiny.batch(tiny)
        am.calibrate(tiny.params, [ids[:2]], af.NAME)


@pytest.mark.parametrize("kw,match", [(dict(r_top=0), "r_top"), (dict(top_ratio=1.5), "top_ratio"),
                                      (dict(reg_multiplier=-1.0), "reg_multiplier")])
def test_salt_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        SaltConfig(**kw)


def test_config_errors_of_the_family():
    with pytest.raises(ValueError, match="corda_method"):
        CordaConfig(corda_method="abc")
    with pytest.raises(ValueError, match="niter"):
        PissaConfig(niter=-1)
    with pytest.raises(ValueError, match="gamma"):
        SorsaConfig(gamma=-1.0)
    with pytest.raises(ValueError, match="r="):
        SvfitConfig(r=0)
    assert dataclasses.replace(SorsaConfig(), lora_alpha=None).lora_alpha is None
