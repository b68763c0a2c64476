"""HF PEFT 0.21.2 interop for LoRA, both directions, on tiny random llama / gpt2 / bert models.

export: a random NON-ZERO jaxpeft LoRA (init_lora_weights=False) is written with `export_peft`, loaded with
`peft.PeftModel.from_pretrained` onto the same transformers base (saved with save_pretrained), and the PEFT
logits must equal jaxpeft's within 1e-4 max-abs over non-pad positions. PEFT must load it without any
missing/unexpected-key report, and the file must hold exactly the keys and shapes PEFT itself would save
(A (r, n_in), B (n_out, r) for every architecture, GPT-2's Conv1D included).
import: the PEFT model is saved with `save_pretrained` and read back with `import_peft` (same parity), and an
adapter created natively by PEFT (its own random init) imports with the same parity.
Broken folders raise CheckpointError.
"""
import copy
import json
import os
import re
import sys

import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch

sys.path.insert(0, os.path.dirname(__file__))
import adapter_fixtures as af  # noqa: E402
import hf_tiny  # noqa: E402
from jaxpeft.adapters import AdaptedModel  # noqa: E402
from jaxpeft.adapters.peft_io import config_from_peft, export_peft, import_peft  # noqa: E402
from jaxpeft.loading.errors import CheckpointError  # noqa: E402
from jaxpeft.models import build_model  # noqa: E402
from parity import assert_close  # noqa: E402

TOL = 1e-4
CASES = af.EXPORT_CASES


def _fresh_hf(tiny):
    """A fresh copy of the transformers base, loaded from the folder the tiny model was saved to."""
    cls = hf_tiny.HF_CLASSES[(tiny.name, tiny.task)]
    return cls.from_pretrained(tiny.path, attn_implementation="eager").eval()


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    """Export a random jaxpeft LoRA, load it with PeftModel.from_pretrained (messages captured)."""
    name, task, kw = CASES[request.param]
    tiny, am, state = af.lora_case(name, task, seed=af.CASE_SEED, **kw)
    folder = tmp_path_factory.mktemp(request.param) / "adapter"
    export_peft(am, state, af.NAME, folder, base_model_name_or_path=tiny.path)
    with af.capture_messages() as msgs:
        pm = peft.PeftModel.from_pretrained(_fresh_hf(tiny), str(folder)).eval()
    ids, mask, jkw, hkw = af.inputs(tiny)
    ours = np.asarray(af.jitted(am)(tiny.params, state, ids, mask, jkw))
    ref = af.torch_forward(pm, ids, mask, hkw, task)
    return dict(case=request.param, tiny=tiny, am=am, state=state, folder=folder, pm=pm, msgs=msgs, kw=kw,
                ids=ids, mask=mask, jkw=jkw, hkw=hkw, ours=ours, ref=ref)


def test_export_logits_match_peft(exported):
    e = exported
    task = e["tiny"].task
    assert_close(e["ours"], e["ref"], af.cmp_mask(task, e["mask"]), max_abs=TOL, what=f"{e['case']} export")
    # the adapter must matter, else the comparison proves nothing
    base = af.torch_forward(e["tiny"].hf, e["ids"], e["mask"], e["hkw"], task)
    m = af.cmp_mask(task, e["mask"])
    diff = np.abs(e["ref"] - base)[m.astype(bool)] if m is not None else np.abs(e["ref"] - base)
    assert diff.max() > 1e-2, f"{e['case']}: the adapter does not change the PEFT output"


def test_export_loads_without_key_reports(exported):
    e = exported
    assert af.key_messages(e["msgs"]) == [], e["msgs"]
    # PEFT ignores unexpected keys silently in from_pretrained: check its load result directly too
    res = e["pm"].load_adapter(str(e["folder"]), adapter_name="reload")
    assert list(res.missing_keys) == [] and list(res.unexpected_keys) == [], res


def test_export_file_keys_and_shapes_equal_peft_own_save(exported):
    e = exported
    ours = safetensors.numpy.load_file(str(e["folder"] / "adapter_model.safetensors"))
    theirs = peft.get_peft_model_state_dict(e["pm"], adapter_name="default")
    assert sorted(ours) == sorted(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    for k, v in ours.items():
        assert v.dtype == np.float32, k
    with open(e["folder"] / "adapter_model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "pt"}


# 'base_model.model.[model.|transformer.|bert.]<stack>.<i>.<module>.lora_<A|B>.weight'; the flax module path is the
# dotted HF path with '/' (llama 'layers', gpt2 'h', bert 'encoder/layer' stacks), written out here by hand
_LORA_KEY = re.compile(r"^base_model\.model\.(?:model\.|transformer\.|bert\.)?(layers|h|encoder\.layer)\.(\d+)\."
                       r"(.+)\.(lora_[AB])\.weight$")


def test_export_file_values_are_the_in_memory_factors_per_layer_transposed(exported):
    """Every tensor in the file equals the array that went in: lora_A[layer].T (r, n_in), lora_B[layer].T
    (n_out, r) of the adapter state, and a modules_to_save classifier's kernel.T / bias; nothing else is in it."""
    e = exported
    ours = safetensors.numpy.load_file(str(e["folder"] / "adapter_model.safetensors"))
    dense, saved = e["state"]["trainable"][af.NAME]["modules"], e["state"]["trainable"][af.NAME]["saved"]
    checked = set()
    for key, v in ours.items():
        m = _LORA_KEY.match(key)
        if m:
            stack, layer, module, leaf = m.groups()
            factor = np.asarray(af.get(dense, f"{stack}.{module}".replace(".", "/"))[leaf])[int(layer)]
            expected = factor.T
        else:
            module, leaf = key[len("base_model.model."):].rsplit(".", 1)
            expected = np.asarray(af.get(saved, module.replace(".", "/"))[{"weight": "kernel", "bias": "bias"}[leaf]])
            expected = expected.T if leaf == "weight" else expected
        np.testing.assert_array_equal(v, expected, err_msg=key)
        assert np.abs(v).max() > 0, f"{key}: an all-zero tensor cannot tell a wrong layer or factor apart"
        checked.add(key)
    assert checked == set(ours) and any(_LORA_KEY.match(k) for k in checked)
    if "layers_to_transform" not in e["kw"]:  # both layers exported, and they differ (a layer swap would show)
        keys = [k for k in ours if ".0." in k]
        assert keys and all(not np.array_equal(ours[k], ours[k.replace(".0.", ".1.", 1)]) for k in keys)


def test_export_config(exported):
    e = exported
    tiny, kw = e["tiny"], e["kw"]
    cfg = json.loads((e["folder"] / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    assert cfg["task_type"] == {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "base": "FEATURE_EXTRACTION"}[tiny.task]
    assert cfg["fan_in_fan_out"] is (tiny.cfg.arch == "gpt2")
    assert cfg["r"] == kw["r"] and cfg["lora_alpha"] == kw["lora_alpha"]
    assert cfg["use_rslora"] is kw.get("use_rslora", False)
    assert cfg["layers_to_transform"] == (list(kw["layers_to_transform"]) if "layers_to_transform" in kw else None)
    assert cfg["rank_pattern"] == kw.get("rank_pattern", {})
    assert cfg["alpha_pattern"] == kw.get("alpha_pattern", {})
    assert (cfg["modules_to_save"] or []) == list(kw.get("modules_to_save", ()))
    loaded = e["pm"].peft_config["default"]
    assert loaded.fan_in_fan_out is (tiny.cfg.arch == "gpt2")
    assert loaded.use_rslora is kw.get("use_rslora", False)


def test_export_factor_shapes_are_r_by_in_and_out_by_r(exported):
    """(r, n_in) / (n_out, r) from the HF modules themselves; GPT-2's Conv1D included."""
    e = exported
    ours = safetensors.numpy.load_file(str(e["folder"] / "adapter_model.safetensors"))
    mods = dict(e["tiny"].hf.named_modules())
    kw = e["kw"]
    n = 0
    for key, v in ours.items():
        if ".lora_" not in key:
            continue
        mod_name = key[len("base_model.model."):].rsplit(".lora_", 1)[0]
        mod = mods[mod_name]
        if type(mod).__name__ == "Conv1D":
            n_in, n_out = mod.weight.shape  # Conv1D stores (in, out)
        else:
            n_out, n_in = mod.weight.shape
        r = kw.get("rank_pattern", {}).get(mod_name.rsplit(".", 1)[1], kw["r"])
        assert v.shape == ((r, n_in) if ".lora_A." in key else (n_out, r)), key
        if "layers_to_transform" in kw:  # only the selected layers are saved
            assert int(mod_name.split(".layer")[1].split(".")[1]) in kw["layers_to_transform"], key
        n += 1
    assert n > 0
    if e["case"] == "gpt2":
        d = e["tiny"].cfg.hidden_size
        assert ours["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (8, d)
        assert ours["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (3 * d, 8)


def test_peft_save_then_import_matches(exported, tmp_path):
    """PEFT save_pretrained of the loaded model -> import_peft: same logits, same selected-layer weights."""
    e = exported
    tiny = e["tiny"]
    e["pm"].save_pretrained(str(tmp_path), selected_adapters=["default"])
    am2, st2 = import_peft(AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)), tiny.params, tmp_path)
    ours2 = np.asarray(af.jitted(am2)(tiny.params, st2, e["ids"], e["mask"], e["jkw"]))
    assert_close(ours2, e["ref"], af.cmp_mask(tiny.task, e["mask"]), max_abs=TOL, what=f"{e['case']} import")
    # weights round-trip exactly on the selected layers
    for t in am2.spec(af.NAME).targets:
        a = af.get(st2["trainable"][af.NAME]["modules"], t.flax_module)
        b = af.get(e["state"]["trainable"][af.NAME]["modules"], t.flax_module)
        for leaf in a:
            sel = np.asarray(t.layers) if t.layered else slice(None)
            np.testing.assert_array_equal(np.asarray(a[leaf])[sel], np.asarray(b[leaf])[sel])
    for x, y in zip(jax.tree.leaves(st2["trainable"][af.NAME]["saved"]),
                    jax.tree.leaves(e["state"]["trainable"][af.NAME]["saved"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------------- PEFT-native

NATIVE = {  # adapters PEFT creates itself (its own random non-zero init), imported into jaxpeft
    "llama": ("llama", "causal_lm", dict(r=4, lora_alpha=8, use_rslora=True, layers_to_transform=[0],
                                         target_modules=["q_proj", "v_proj", "o_proj"],
                                         rank_pattern={"o_proj": 2}, alpha_pattern={"v_proj": 2.0})),
    "gpt2": ("gpt2", "causal_lm", dict(r=4, lora_alpha=8, fan_in_fan_out=True,
                                       target_modules=["c_attn", "c_proj", "c_fc"])),
    "bert_seq_cls": ("bert", "seq_cls", dict(r=4, lora_alpha=8, target_modules=["query", "value"])),
}


@pytest.mark.parametrize("case", list(NATIVE))
def test_peft_native_adapter_imports(case, tmp_path):
    name, task, kw = NATIVE[case]
    tiny = hf_tiny.load(name, task)
    torch.manual_seed(3)
    task_type = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}[task]
    pm = peft.get_peft_model(copy.deepcopy(tiny.hf), peft.LoraConfig(init_lora_weights=False, task_type=task_type,
                                                                     **kw)).eval()
    if task == "seq_cls":  # PEFT adds the classifier to modules_to_save for SEQ_CLS: make its copy differ
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "modules_to_save.default" in n:
                    p.add_(0.3 * torch.randn(p.shape))
    pm.save_pretrained(str(tmp_path))
    ids, mask, jkw, hkw = af.inputs(tiny)
    ref = af.torch_forward(pm, ids, mask, hkw, task)
    base = af.torch_forward(tiny.hf, ids, mask, hkw, task)
    assert np.abs(ref - base).max() > 1e-2
    saved_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    config_from_peft(saved_cfg)  # every key PEFT writes is understood
    am, st = import_peft(AdaptedModel.wrap(build_model(tiny.cfg, task)), tiny.params, tmp_path)
    ours = np.asarray(af.jitted(am)(tiny.params, st, ids, mask, jkw))
    assert_close(ours, ref, af.cmp_mask(task, mask), max_abs=TOL, what=f"native {case}")
    if task == "seq_cls":
        assert st["trainable"][af.NAME]["saved"], "modules_to_save classifier was not imported"


# ---------------------------------------------------------------------------------------------- broken files


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    tiny = hf_tiny.load("llama", "causal_lm")
    am, state = af.lora_model(tiny, seed=2, r=2)
    folder = tmp_path_factory.mktemp("good")
    export_peft(am, state, af.NAME, folder)
    return tiny, folder


def _copy(folder, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        (dst / f).write_bytes((folder / f).read_bytes())
    return dst


def _import(tiny, folder):
    return import_peft(AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)), tiny.params, folder)


def test_key_report_capture_sees_peft_missing_key_warning(good_folder, tmp_path):
    """The no-warning check above can fail: a folder lacking one tensor makes PEFT warn, and we see it."""
    tiny, folder = good_folder
    d = _copy(folder, tmp_path / "d")
    tensors = safetensors.numpy.load_file(str(d / "adapter_model.safetensors"))
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    safetensors.numpy.save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    with af.capture_messages() as msgs:
        peft.PeftModel.from_pretrained(_fresh_hf(tiny), str(d))
    reports = af.key_messages(msgs)
    assert len(reports) == 1 and "layers.1.self_attn.v_proj.lora_B" in reports[0], msgs


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_missing_file_raises(good_folder, tmp_path, missing):
    tiny, folder = good_folder
    d = _copy(folder, tmp_path / "d")
    (d / missing).unlink()
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        _import(tiny, d)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_safetensors_raises(good_folder, tmp_path, how):
    tiny, folder = good_folder
    d = _copy(folder, tmp_path / "d")
    f = d / "adapter_model.safetensors"
    raw = f.read_bytes()
    f.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": b"\x13\x00not a safetensors file" * 5}[how])
    with pytest.raises(CheckpointError):
        _import(tiny, d)


def test_missing_tensor_raises_naming_it(good_folder, tmp_path):
    tiny, folder = good_folder
    d = _copy(folder, tmp_path / "d")
    tensors = safetensors.numpy.load_file(str(d / "adapter_model.safetensors"))
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del tensors[gone]
    safetensors.numpy.save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=gone.replace(".", r"\.")):
        _import(tiny, d)


def test_wrong_shape_raises(good_folder, tmp_path):
    tiny, folder = good_folder
    d = _copy(folder, tmp_path / "d")
    tensors = safetensors.numpy.load_file(str(d / "adapter_model.safetensors"))
    k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[k] = np.ascontiguousarray(tensors[k].T)
    safetensors.numpy.save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="shape"):
        _import(tiny, d)


def test_unexpected_tensor_is_an_error(good_folder, tmp_path):
    """Stricter than PEFT (which warns): a tensor no selected module uses means another model or another save."""
    tiny, folder = good_folder
    d = _copy(folder, tmp_path / "d")
    tensors = safetensors.numpy.load_file(str(d / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.zz_proj.lora_A.weight"] = np.zeros((2, 32), np.float32)
    safetensors.numpy.save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 tensors match no module.*zz_proj.*load it on its own base model"):
        _import(tiny, d)


def test_corrupt_config_json_raises_checkpoint_error(good_folder, tmp_path):
    tiny, folder = good_folder
    d = _copy(folder, tmp_path / "d")
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(CheckpointError):
        _import(tiny, d)
