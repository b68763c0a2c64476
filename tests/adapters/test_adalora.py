"""AdaLoRA against HF PEFT 0.21.2: the rank allocator step by step on the same weights and gradients (masks, E),
export of a pruned adapter (PEFT's rank_pattern and resized tensors) and import of one PEFT trained and pruned, with
logits parity; the orthogonality regulariser; counts (docs/methods/adalora.md, Trainable parameters: r_init = 12).
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

sys.path.insert(0, os.path.dirname(__file__))
import adapter_fixtures as af  # noqa: E402
import hf_tiny  # noqa: E402
from jaxpeft.adapters import AdaloraConfig, AdaptedModel  # noqa: E402
from jaxpeft.adapters.partition import count_parameters  # noqa: E402
from jaxpeft.adapters.native_io import load_adapter, save_adapter  # noqa: E402
from jaxpeft.adapters.peft_io import export_peft, import_peft  # noqa: E402
from jaxpeft.models import ModelConfig, build_model  # noqa: E402
from parity import assert_close  # noqa: E402

TARGETS = ("q_proj", "v_proj")
KW = dict(init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=2, total_step=9, lora_alpha=8.0, target_modules=TARGETS)


def _peft_model(tiny):
    cfg = peft.AdaLoraConfig(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in KW.items()})
    return peft.get_peft_model(af.fresh_hf(tiny), cfg)


def _ours(tiny, seed=0):
    am = AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)).add(af.NAME, AdaloraConfig(**KW))
    return am, am.init(jax.random.key(seed), tiny.params)


def _peft_params(pm, am):
    """{(hf module, leaf): torch parameter} of PEFT's adapter in our leaf names."""
    mods = dict(pm.base_model.model.named_modules())
    out = {}
    for t in am.spec(af.NAME).targets:
        for layer in t.layers:
            mod = mods[t.hf_name(layer)]
            for leaf in ("lora_A", "lora_E", "lora_B"):
                out[(t.hf_name(layer), leaf)] = getattr(mod, leaf)["default"]
    return out


def _to_torch(leaf, value):
    """Our per-layer array in PEFT's layout: A (n_in, r) -> (r, n_in), B (r, n_out) -> (n_out, r), E (r,) -> (r, 1)."""
    value = np.asarray(value, np.float32)
    return torch.tensor(value.T.copy() if leaf != "lora_E" else value[:, None].copy())


def test_rank_allocator_equals_peft_step_by_step():
    """Same weights and gradients each step (random, moving): after every step the E values (masked ones zeroed) and
    the rank masks (PEFT's rank_pattern) are equal, through warm-up, the cubic budget and the final phase."""
    tiny = hf_tiny.load("llama", "causal_lm")
    am, state = _ours(tiny)
    pm = _peft_model(tiny)
    params = _peft_params(pm, am)
    hooks = am.init_hook_state(state)
    rng = np.random.RandomState(0)
    spec = am.spec(af.NAME)
    step_fn = jax.jit(lambda tr, g, h, s: am.after_step(tr, g, state["extras"], h, s, KW["total_step"]))
    for step in range(KW["total_step"]):
        noise = lambda x: jnp.asarray(rng.randn(*x.shape), jnp.float32)  # noqa: E731
        trainable = jax.tree.map(lambda x: 0.1 * noise(x), state["trainable"])
        grads = jax.tree.map(lambda x: noise(x), state["trainable"])
        with torch.no_grad():
            for t in spec.targets:
                node, gnode = (af.get(tr[af.NAME]["modules"], t.flax_module) for tr in (trainable, grads))
                for layer in t.layers:
                    for leaf in ("lora_A", "lora_E", "lora_B"):
                        p = params[(t.hf_name(layer), leaf)]
                        p.copy_(_to_torch(leaf, node[leaf][layer]))
                        p.grad = _to_torch(leaf, gnode[leaf][layer])
        pm.base_model.update_and_allocate(step)
        new, hooks = step_fn(trainable, grads, hooks, np.int32(step))
        pattern = pm.peft_config["default"].rank_pattern or {}
        for t in spec.targets:
            node = af.get(new[af.NAME]["modules"], t.flax_module)
            mask = np.asarray(hooks[af.NAME]["rank_mask"][t.flax_module])
            for layer in t.layers:
                theirs_e = params[(t.hf_name(layer), "lora_E")].detach().numpy()[:, 0]
                np.testing.assert_allclose(np.asarray(node["lora_E"][layer]), theirs_e, rtol=1e-6, atol=1e-7,
                                           err_msg=f"step {step} {t.hf_name(layer)}")
                key = f"{t.hf_name(layer)}.lora_E.default"
                if key in pattern:
                    assert mask[layer].tolist() == list(pattern[key]), (step, key)
    assert pattern and sum(sum(v) for v in pattern.values()) == KW["target_r"] * len(pattern)


def test_export_of_a_pruned_adapter_matches_peft(tmp_path):
    tiny = hf_tiny.load("llama", "causal_lm")
    am, state = _ours(tiny, seed=2)
    rng = np.random.RandomState(1)
    tr = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.randn(*x.shape), jnp.float32), state["trainable"])
    masks = {}
    for t in am.spec(af.NAME).targets:  # prune a different set of triplets per layer, E = 0 there
        mask = rng.rand(t.num_layers, KW["init_r"]) > 0.4
        mask[:, 0] = True
        node = af.get(tr[af.NAME]["modules"], t.flax_module)
        node["lora_E"] = jnp.where(jnp.asarray(mask), node["lora_E"], 0.0)
        masks[t.flax_module] = jnp.asarray(mask)
    state = am.with_hook_extras({"trainable": tr, "extras": state["extras"]},
                                {af.NAME: {"rank_mask": masks, "avg_ipt": None, "avg_unc": None}})
    export_peft(am, state, af.NAME, tmp_path, base_model_name_or_path=tiny.path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and len(cfg["rank_pattern"]) == 2 * tiny.cfg.num_layers
    af.assert_peft_parity(tiny, am, state, af.load_peft_quietly(tiny, tmp_path), "AdaLoRA export")
    # import pads back to r_init at the kept positions: same arrays, same masks
    am2, state2 = import_peft(AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)), tiny.params, tmp_path)
    for t in am.spec(af.NAME).targets:
        a = af.get(state["trainable"][af.NAME]["modules"], t.flax_module)
        b = af.get(state2["trainable"][af.NAME]["modules"], t.flax_module)
        m = np.asarray(masks[t.flax_module])
        np.testing.assert_array_equal(np.asarray(af.get(state2["extras"][af.NAME]["modules"], t.flax_module)
                                                 ["rank_mask"]), m)
        np.testing.assert_array_equal(np.asarray(a["lora_E"]), np.asarray(b["lora_E"]))
        np.testing.assert_array_equal(np.where(m[:, None, :], np.asarray(a["lora_A"]), 0), np.asarray(b["lora_A"]))


def test_a_pruned_adapter_with_its_rank_mask_round_trips_through_the_jaxpeft_format(tmp_path):
    """A state written after training carries the rank mask in its extras (hook_extras); the native format saves
    and loads it (the mask is what PEFT export needs), and a state saved before training (no mask) still loads."""
    tiny = hf_tiny.load("llama", "causal_lm")
    am, state = _ours(tiny, seed=3)
    rng = np.random.RandomState(4)
    tr = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.randn(*x.shape), jnp.float32), state["trainable"])
    masks = {t.flax_module: jnp.asarray(rng.rand(t.num_layers, KW["init_r"]) > 0.5)
             for t in am.spec(af.NAME).targets}
    pruned = am.with_hook_extras({"trainable": tr, "extras": state["extras"]},
                                 {af.NAME: {"rank_mask": masks, "avg_ipt": None, "avg_unc": None}})
    save_adapter(am, pruned, af.NAME, tmp_path / "pruned")
    am2, loaded = load_adapter(AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)), tiny.params, tmp_path / "pruned",
                               af.NAME)
    for t in am.spec(af.NAME).targets:
        np.testing.assert_array_equal(
            np.asarray(af.get(loaded["extras"][af.NAME]["modules"], t.flax_module)["rank_mask"]),
            np.asarray(masks[t.flax_module]))
    jax.tree.map(np.testing.assert_array_equal, pruned["trainable"], loaded["trainable"])  # same tree, same values
    ids, mask, jkw, _ = af.inputs(tiny)
    np.testing.assert_array_equal(np.asarray(af.jitted(am)(tiny.params, pruned, ids, mask, jkw)),
                                  np.asarray(af.jitted(am2)(tiny.params, loaded, ids, mask, jkw)))
    save_adapter(am, state, af.NAME, tmp_path / "fresh")  # before training: no mask in the file
    _, fresh = load_adapter(AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)), tiny.params, tmp_path / "fresh",
                            af.NAME)
    assert "rank_mask" not in str(jax.tree_util.tree_structure(fresh["extras"]))


def test_import_of_a_peft_trained_and_pruned_adapter_matches_peft(tmp_path):
    tiny = hf_tiny.load("llama", "causal_lm")
    torch.manual_seed(0)
    pm = _peft_model(tiny)
    opt = torch.optim.SGD(pm.parameters(), lr=0.5)
    ids, mask, jkw, hkw = af.inputs(tiny)
    for step in range(KW["total_step"]):
        out = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(ids))
        out.loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.save_pretrained(str(tmp_path))
    pm.eval()
    am, state = import_peft(AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)), tiny.params, tmp_path)
    ours = np.asarray(af.jitted(am)(tiny.params, state, ids, mask, jkw))
    ref = af.torch_forward(pm, ids, mask, hkw, tiny.task)
    assert_close(ours, ref, mask, max_abs=1e-4, what="AdaLoRA import")
    # and out again: PEFT's own files, byte for byte in every tensor
    export_peft(am, state, af.NAME, tmp_path / "again", base_model_name_or_path=tiny.path)
    from safetensors.numpy import load_file

    a, b = load_file(str(tmp_path / "adapter_model.safetensors")), load_file(str(tmp_path / "again" /
                                                                                 "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_regularizer_is_the_mean_orthogonality_gap_times_the_weight():
    tiny = hf_tiny.load("llama", "causal_lm")
    am, state = _ours(tiny)
    gaps = []
    for t in am.spec(af.NAME).targets:
        node = af.get(state["trainable"][af.NAME]["modules"], t.flax_module)
        for layer in t.layers:
            a, b = np.asarray(node["lora_A"][layer], np.float64), np.asarray(node["lora_B"][layer], np.float64)
            gaps += [np.linalg.norm(a.T @ a - np.eye(a.shape[1])), np.linalg.norm(b @ b.T - np.eye(b.shape[0]))]
    assert abs(float(am.regularizer(state)) - 0.5 * np.mean(gaps)) < 1e-5


def test_trainable_count_equals_section_15_and_peft():
    make = af.smollm2_hf_config
    cfg = ModelConfig.from_hf(make().to_dict())
    frozen = af.abstract_params(cfg, "causal_lm")
    am = AdaptedModel.wrap(build_model(cfg, "causal_lm")).add(af.NAME, AdaloraConfig(target_modules=TARGETS))
    state = jax.eval_shape(lambda fr: am.init(jax.random.key(0), fr), frozen)
    assert count_parameters(am, state, frozen)[0] == 691_920
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(make())
    pm = peft.get_peft_model(model, peft.AdaLoraConfig(target_modules=list(TARGETS), total_step=10))
    # on the meta device PEFT also flags its per-module `ranknum` scalar (a constant, r_init) as trainable: 60 of
    # them here; a model built on the CPU does not, and docs/methods/adalora.md (Trainable parameters) counts 691,920
    ranknum = sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad and "ranknum" in n)
    assert pm.get_nb_trainable_parameters()[0] - ranknum == 691_920


@pytest.mark.parametrize("kw,match", [(dict(target_r=13), "target_r"), (dict(beta1=1.0), "beta1"),
                                      (dict(total_step=5, tinit=5), "schedule"), (dict(orth_reg_weight=-1.0),
                                                                                 "orth_reg_weight")])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        AdaloraConfig(**kw)


def test_a_rank_pattern_is_refused_because_adalora_allocates_ranks_itself():
    from jaxpeft.errors import AdapterError

    with pytest.raises(AdapterError, match="AdaLoRA allocates each module's rank itself"):
        AdaloraConfig(init_r=6, target_r=2, rank_pattern={"q_proj": 4})
