"""KaSA: HF PEFT 0.21.2 parity (export and import, tiny llama and bert), the regulariser against a NumPy reference in
every mode and reduction, the SVD truncation (the model differs from the base by exactly the dropped components),
merge, parameter counts (docs/methods/kasa.md, Trainable parameters, and PEFT's), config errors.

Random NON-ZERO adapters: init_lora_weights=False makes B random; d is N(0, 1) by default.
"""
import json
import os
import sys

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

sys.path.insert(0, os.path.dirname(__file__))
import adapter_fixtures as af  # noqa: E402
import hf_tiny  # noqa: E402
from jaxpeft.adapters import AdaptedModel, KasaConfig  # noqa: E402
from jaxpeft.adapters.merge import merge  # noqa: E402
from jaxpeft.adapters.partition import count_parameters  # noqa: E402
from jaxpeft.adapters.peft_io import export_peft, import_peft, peft_unsupported_reason  # noqa: E402
from jaxpeft.models import ModelConfig, build_model  # noqa: E402
from parity import assert_close  # noqa: E402

TOL = 1e-4
# id -> (tiny model, task, KaSA kwargs); k_proj on llama is 32 -> 16 (GQA): n_out < n_in
CASES = {
    "llama": ("llama", "causal_lm", dict(r=4, lora_alpha=8.0, target_modules=("q_proj", "k_proj", "v_proj"))),
    "bert_seq_cls": ("bert", "seq_cls", dict(r=4, lora_alpha=16.0, target_modules=("query", "value"),
                                             modules_to_save=("classifier",))),
}


def kasa_model(name, task, seed=0, **kw):
    tiny = hf_tiny.load(name, task)
    am = AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)).add(af.NAME, KasaConfig(**kw))
    return tiny, am, am.init(jax.random.key(seed), tiny.params)


def _compare(tiny, am, state, pm):
    af.assert_peft_parity(tiny, am, state, pm, f"{tiny.name} KaSA", TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_export_logits_match_peft_which_recomputes_the_truncation(case, tmp_path):
    name, task, kw = CASES[case]
    tiny, am, state = kasa_model(name, task, seed=3, init_lora_weights=False, **kw)
    assert peft_unsupported_reason(am, af.NAME) is None
    export_peft(am, state, af.NAME, tmp_path, base_model_name_or_path=tiny.path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["kasa_config"] == {"beta": 1e-4, "gamma": 1e-3} and cfg["peft_type"] == "LORA"
    pm = af.load_peft_quietly(tiny, tmp_path)
    _compare(tiny, am, state, pm)
    # and back: the imported adapter equals the exported one
    am2, state2 = import_peft(AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)), tiny.params, tmp_path)
    assert am2.spec(af.NAME).config.method == "kasa"
    for a, b in zip(jax.tree.leaves(state["trainable"]), jax.tree.leaves(state2["trainable"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _compare(tiny, am2, state2, pm)


@pytest.mark.parametrize("case", list(CASES))
def test_import_of_a_peft_made_kasa_adapter_matches_peft(case, tmp_path):
    name, task, kw = CASES[case]
    tiny = hf_tiny.load(name, task)
    torch.manual_seed(5)
    pcfg = peft.LoraConfig(r=kw["r"], lora_alpha=kw["lora_alpha"], target_modules=list(kw["target_modules"]),
                           kasa_config=peft.tuners.lora.config.KasaConfig(beta=0.01, gamma=0.02),
                           modules_to_save=list(kw.get("modules_to_save", ())) or None)
    pm = peft.get_peft_model(af.fresh_hf(tiny), pcfg).eval()
    with torch.no_grad():  # PEFT inits B = 0: make every factor non-zero
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_diag" in n or "modules_to_save" in n:
                p.add_(0.3 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path))
    am, state = import_peft(AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)), tiny.params, tmp_path)
    cfg = am.spec(af.NAME).config
    assert (cfg.beta, cfg.gamma, cfg.truncation, cfg.ortho_mode, cfg.reduction) == (0.01, 0.02, "hf", "paper_rxr",
                                                                                    "sum")
    _compare(tiny, am, state, pm)
    # PEFT's own regulariser (`_get_kasa_loss`, sum reduction) equals ours on the same weights
    with torch.no_grad():
        theirs = float(pm.base_model._get_kasa_loss())
    assert abs(float(am.regularizer(state)) - theirs) < 1e-5 * max(1.0, abs(theirs))


# ------------------------------------------------------------------------------------------------ regulariser


def _np_reference_r(am, state, cfg):
    """R from the stacked weights with explicit n x n / r x r Gram matrices in float64."""
    spec = am.spec(af.NAME)
    r2s, r3s, n_mod = [], [], 0
    for t in spec.targets:
        node = af.get(state["trainable"][af.NAME]["modules"], t.flax_module)
        for layer in t.layers:
            a = np.asarray(node["lora_A"][layer], np.float64)  # (n_in, r)
            b = np.asarray(node["lora_B"][layer], np.float64)  # (r, n_out)
            d = np.asarray(node["lora_diag"][layer], np.float64)
            r2s.append(np.sum(d ** 2))
            if cfg.ortho_mode == "paper_rxr":
                r3 = (np.linalg.norm(a.T @ a - np.eye(a.shape[1])) + np.linalg.norm(b @ b.T - np.eye(b.shape[0])))
            else:
                r3 = (np.linalg.norm(a @ a.T - np.eye(a.shape[0])) + np.linalg.norm(b.T @ b - np.eye(b.shape[1])))
            r3s.append(r3)
            n_mod += 1
    if cfg.reduction == "sum":
        return sum(cfg.beta * x + cfg.gamma * y for x, y in zip(r2s, r3s))
    return (cfg.beta * sum(r2s) + cfg.gamma * sum(r3s)) / n_mod


@pytest.mark.parametrize("ortho_mode", ["paper_rxr", "code_nxn"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_regularizer_equals_numpy_reference(ortho_mode, reduction):
    tiny = hf_tiny.load("llama", "causal_lm")
    cfg = KasaConfig(r=4, init_lora_weights=False, beta=0.3, gamma=0.7, ortho_mode=ortho_mode, reduction=reduction,
                     target_modules=("q_proj", "v_proj", "down_proj"), layers_to_transform=(1,))
    am = AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)).add(af.NAME, cfg)
    state = am.init(jax.random.key(1), tiny.params)
    ours = float(jax.jit(lambda s: am.regularizer(s))(state))
    ref = _np_reference_r(am, state, cfg)
    assert abs(ours - ref) < 1e-5 * max(1.0, abs(ref)), (ours, ref)


def test_regularizer_is_zero_without_weights_and_absent_from_lora():
    tiny = hf_tiny.load("llama", "causal_lm")
    am = AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)).add(af.NAME, KasaConfig(r=4, beta=0.0, gamma=0.0))
    assert not am.has_regularizer("loss")
    state = am.init(jax.random.key(0), tiny.params)
    assert float(am.regularizer(state)) == 0.0


# ------------------------------------------------------------------------------------------------ truncation


def _truncated_params(tiny, am, drop):
    """The base params with every targeted kernel replaced by its NumPy (float64) SVD truncation."""
    from jaxpeft.adapters.kasa import kept_rank

    params = jax.tree.map(np.array, tiny.params)
    spec = am.spec(af.NAME)
    for t in spec.targets:
        node = af.get(params, t.flax_module)
        for layer in t.layers:
            w = node["kernel"][layer].astype(np.float64)
            keep = kept_rank(spec.config, spec.config.r, *w.shape) if drop else min(w.shape)
            u, s, vh = np.linalg.svd(w, full_matrices=False)
            node["kernel"][layer] = (u[:, :keep] * s[:keep]) @ vh[:keep]
    return params


@pytest.mark.parametrize("truncation", ["hf", "official"])
def test_step0_model_is_the_base_minus_exactly_the_dropped_components(truncation):
    tiny = hf_tiny.load("llama", "causal_lm")
    am = AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)).add(af.NAME, KasaConfig(
        r=4, truncation=truncation, target_modules=("q_proj", "k_proj", "v_proj", "down_proj")))
    state = am.init(jax.random.key(0), tiny.params)
    ids, mask, jkw, _ = af.inputs(tiny)
    ours = np.asarray(af.jitted(am)(tiny.params, state, ids, mask, jkw))
    ref = np.asarray(af.jitted_base(tiny.cfg, tiny.task)(_truncated_params(tiny, am, True), ids, mask, jkw))
    base = np.asarray(af.jitted_base(tiny.cfg, tiny.task)(tiny.params, ids, mask, jkw))
    assert_close(ours, ref, mask, max_abs=1e-5, what=f"KaSA step 0 ({truncation})")
    assert np.abs(ours - base)[mask.astype(bool)].max() > 1e-3


def test_official_truncation_keeps_narrowing_weights_whole_and_hf_drops_r_everywhere():
    tiny = hf_tiny.load("llama", "causal_lm")
    n_in_k, n_out_k = tiny.cfg.hidden_size, tiny.cfg.num_kv_heads * tiny.cfg.head_dim
    assert n_out_k < n_in_k
    for truncation, k_drop in (("official", None), ("hf", 4)):
        am = AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)).add(af.NAME, KasaConfig(
            r=4, truncation=truncation, target_modules=("q_proj", "k_proj")))
        state = am.init(jax.random.key(0), tiny.params)
        ex = state["extras"][af.NAME]["modules"]
        by_name = {t.hf_module.rsplit(".", 1)[-1]: af.get(ex, t.flax_module) for t in am.spec(af.NAME).targets}
        assert by_name["q_proj"]["kasa_drop_left"].shape[-1] == 4  # square q: both rules drop r
        kx = by_name["k_proj"]
        if k_drop is None:
            assert "kasa_drop_left" not in kx
        else:
            assert kx["kasa_drop_left"].shape[-2:] == (n_in_k, k_drop)
            assert kx["kasa_drop_right"].shape[-2:] == (k_drop, n_out_k)


def test_merge_reproduces_the_adapted_forward():
    tiny, am, state = kasa_model("llama", "causal_lm", seed=2, init_lora_weights=False, r=4,
                                 target_modules=("q_proj", "v_proj", "up_proj"))
    merged, _ = merge(am, tiny.params, state, af.NAME)
    ids, mask, jkw, _ = af.inputs(tiny)
    ours = np.asarray(af.jitted(am)(tiny.params, state, ids, mask, jkw))
    ref = np.asarray(af.jitted_base(tiny.cfg, tiny.task)(merged, ids, mask, jkw))
    assert_close(ours, ref, mask, max_abs=TOL, what="KaSA merge")


# ------------------------------------------------------------------------------------------------ counts


@pytest.mark.parametrize("make,cls,task,targets,expected", [
    (af.smollm2_hf_config, transformers.LlamaForCausalLM, "causal_lm", ("q_proj", "v_proj"), 461_280),
    (af.bert_base_hf_config, transformers.BertModel, "base", ("query", "value"), 295_104),
])
def test_trainable_count_equals_section_15_and_peft(make, cls, task, targets, expected):
    cfg = ModelConfig.from_hf(make().to_dict())
    frozen = af.abstract_params(cfg, task)
    am = AdaptedModel.wrap(build_model(cfg, task)).add(af.NAME, KasaConfig(r=8, target_modules=targets))
    state = jax.eval_shape(lambda fr: am.init(jax.random.key(0), fr), frozen)
    assert count_parameters(am, state, frozen)[0] == expected
    with torch.device("meta"):
        model = cls(make())
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=list(targets),
                                                    kasa_config=peft.tuners.lora.config.KasaConfig()))
    assert pm.get_nb_trainable_parameters()[0] == expected
    # no frozen extra is a second copy of a base weight: the dropped spectrum is (n_in, r) and (r, n_out)
    for t in am.spec(af.NAME).targets:
        for v in af.get(state["extras"][af.NAME]["modules"], t.flax_module).values():
            assert v.shape[-2:] != (t.n_in, t.n_out)


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("kw,match", [
    (dict(truncation="paper"), "truncation="),
    (dict(ortho_mode="nxn"), "ortho_mode="),
    (dict(reduction="avg"), "reduction="),
    (dict(preset="kasa_x"), "preset="),
    (dict(preset="kasa_official", beta=-1.0), "beta="),
    (dict(beta=-0.1), "beta="),
])
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        KasaConfig(**kw)


def test_presets_set_the_three_switches_and_reject_conflicts():
    c = KasaConfig(preset="kasa_official")
    assert (c.truncation, c.ortho_mode, c.reduction) == ("official", "code_nxn", "mean")
    d = KasaConfig()
    assert (d.truncation, d.ortho_mode, d.reduction) == ("hf", "paper_rxr", "sum")
    with pytest.raises(ValueError, match="preset='kasa_hf' sets truncation='hf'"):
        KasaConfig(preset="kasa_hf", truncation="official")


def test_rank_at_least_min_dim_is_a_clear_error():
    tiny = hf_tiny.load("llama", "causal_lm")
    # r = min(n_in, n_out) = 32 passes the generic rank check of `add`; KaSA keeps r singular values besides
    am = AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)).add(af.NAME, KasaConfig(r=32, target_modules=("q_proj",)))
    with pytest.raises(ValueError, match="needs r < min"):
        am.init(jax.random.key(0), tiny.params)


def test_official_truncation_and_gpt2_have_no_peft_form():
    tiny = hf_tiny.load("llama", "causal_lm")
    am = AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)).add(af.NAME, KasaConfig(r=4, preset="kasa_official"))
    assert "PEFT recomputes" in peft_unsupported_reason(am, af.NAME)
    g = hf_tiny.load("gpt2", "causal_lm")
    am = AdaptedModel.wrap(build_model(g.cfg, g.task)).add(af.NAME, KasaConfig(r=4))
    assert "Conv1D" in peft_unsupported_reason(am, af.NAME)
