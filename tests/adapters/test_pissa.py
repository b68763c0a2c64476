"""PiSSA and CorDA against HF PEFT 0.21.2: the SVD init (per layer, s A B and the residual base weight equal PEFT's,
which rewrites its base weight where we keep a low-rank correction beside it), and the export as a rank-2r LoRA
that PEFT loads against the ORIGINAL base with logits parity. SORSA shares the export path.
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
from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
from peft.tuners.lora.corda import preprocess_corda

sys.path.insert(0, os.path.dirname(__file__))
import adapter_fixtures as af  # noqa: E402
import hf_tiny  # noqa: E402
from jaxpeft.adapters import AdaptedModel, CordaConfig, PissaConfig, SorsaConfig  # noqa: E402
from jaxpeft.adapters.peft_io import export_peft  # noqa: E402
from jaxpeft.models import build_model  # noqa: E402

TARGETS = ("q_proj", "v_proj", "down_proj")
R, ALPHA = 4, 8.0


def _examples(tiny, n=3):
    ids, mask = hf_tiny.batch(tiny)
    return [ids[i][mask[i].astype(bool)] for i in range(n)]


def _ours(tiny, cfg):
    am = AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)).add(af.NAME, cfg)
    calib = None
    if cfg.method == "corda":
        calib = {af.NAME: am.calibrate(tiny.params, _examples(tiny), af.NAME)}
    return am, am.init(jax.random.key(0), tiny.params, calibration=calib)


def _peft(tiny, method):
    model = af.fresh_hf(tiny)
    if method == "pissa":
        cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS), init_lora_weights="pissa")
    else:
        cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS), init_lora_weights="corda",
                              corda_config=PeftCordaConfig(corda_method=method.split("_")[1]))

        def run_model():
            with torch.no_grad():
                for ex in _examples(tiny):
                    model(input_ids=torch.tensor(ex)[None])
        preprocess_corda(model, cfg, run_model=run_model)
    return peft.get_peft_model(model, cfg)


@pytest.mark.parametrize("method", ["pissa", "corda_ipm", "corda_kpm"])
def test_init_and_residual_equal_peft_per_layer(method):
    tiny = hf_tiny.load("llama", "causal_lm")
    cfg = (PissaConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS) if method == "pissa" else
           CordaConfig(r=R, lora_alpha=ALPHA, corda_method=method.split("_")[1], target_modules=TARGETS))
    am, state = _ours(tiny, cfg)
    pm = _peft(tiny, method)
    pmods = dict(pm.named_modules())
    scale = ALPHA / R
    checked = 0
    for t in am.spec(af.NAME).targets:
        tr = af.get(state["trainable"][af.NAME]["modules"], t.flax_module)
        ex = af.get(state["extras"][af.NAME]["modules"], t.flax_module)
        w0 = np.asarray(af.get(tiny.params, t.flax_module)["kernel"])
        for layer in t.layers:
            mod = pmods["base_model.model." + t.hf_name(layer)]
            a_pt, b_pt = mod.lora_A["default"].weight.detach().numpy(), mod.lora_B["default"].weight.detach().numpy()
            theirs = scale * (b_pt @ a_pt).T  # (n_in, n_out)
            ours = scale * np.asarray(tr["lora_A"][layer] @ tr["lora_B"][layer])
            np.testing.assert_allclose(ours, theirs, atol=2e-4 * max(1.0, np.abs(theirs).max()))
            res_theirs = mod.base_layer.weight.detach().numpy().T  # PEFT rewrote its base weight: W_res
            res_ours = w0[layer] - scale * np.asarray(ex["res_left"][layer] @ ex["res_right"][layer])
            np.testing.assert_allclose(res_ours, res_theirs, atol=2e-4 * max(1.0, np.abs(w0[layer]).max()))
            checked += 1
    assert checked == 3 * tiny.cfg.num_layers


@pytest.mark.parametrize("cfg", [PissaConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS),
                                 CordaConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS),
                                 SorsaConfig(r=R, target_modules=TARGETS)], ids=["pissa", "corda", "sorsa"])
def test_export_as_rank_2r_lora_matches_peft_on_the_original_base(cfg, tmp_path):
    tiny = hf_tiny.load("llama", "causal_lm")
    am, state = _ours(tiny, cfg)
    rng = np.random.RandomState(4)  # a trained-like adapter: every factor moved
    state = {"trainable": jax.tree.map(lambda x: x + jnp.asarray(0.2 * rng.randn(*x.shape), x.dtype),
                                       state["trainable"]), "extras": state["extras"]}
    export_peft(am, state, af.NAME, tmp_path, base_model_name_or_path=tiny.path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["r"] == 2 * R and written["peft_type"] == "LORA"
    af.assert_peft_parity(tiny, am, state, af.load_peft_quietly(tiny, tmp_path), f"{cfg.method} as LoRA-2r")
