"""Prefix tuning: HF PEFT 0.21.2 interop both ways (llama, gpt2, qwen2, gemma3 causal LMs; bert, roberta bare
encoders), the reparameterisation MLP and its folding, parameter counts, cached generation, the per-example
adapter index, the summary, and the refusals (merge, a model without a prefix hook, target_modules).

PEFT ignores position_ids and token_type_ids for prefix tuning and shifts the real tokens' positions by l, as
jaxpeft's default position_offset='l' does; decoders are compared on full and right-padded rows only (PEFT/HF
count left pads into positions, jaxpeft does not, by design).
"""
import copy
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch

sys.path.insert(0, os.path.dirname(__file__))
import adapter_fixtures as af  # noqa: E402
import hf_tiny  # noqa: E402
from jaxpeft.adapters import AdaptedModel, LoraConfig, PrefixTuningConfig  # noqa: E402
from jaxpeft.adapters.merge import merge  # noqa: E402
from jaxpeft.adapters.method import method_for  # noqa: E402
from jaxpeft.adapters.partition import count_parameters  # noqa: E402
from jaxpeft.adapters.peft_io import export_peft, import_peft, peft_unsupported_reason  # noqa: E402
from jaxpeft.generation import generate  # noqa: E402
from jaxpeft.models import build_model  # noqa: E402
from parity import assert_close  # noqa: E402

TOL = 1e-4
TIGHT = 1e-5
NAME = af.NAME
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "base": "FEATURE_EXTRACTION"}


def _fresh_hf(tiny):
    """A fresh copy of the transformers base, loaded from the folder the tiny model was saved to."""
    cls = hf_tiny.HF_CLASSES[(tiny.name, tiny.task)]
    return cls.from_pretrained(tiny.path, attn_implementation="eager").eval()


def _inputs(tiny):
    """(ids, mask): decoders get full and right-padded rows only; encoders the standard left/right padded batch."""
    if tiny.cfg.is_decoder:
        ids, mask = hf_tiny.batch(tiny, b=6)
        rows = [0, 2, 4]  # full, 4 right pads, 2 right pads
        return ids[rows], mask[rows]
    return hf_tiny.batch(tiny)


def _hf_kv_shape(tiny):
    """(L, H_kv, d_h) read from the transformers config (independent of jaxpeft's ModelConfig)."""
    c = tiny.hf.config
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, kv, head_dim


def _prefix_node(am, state, name=NAME):
    return af.get(state["trainable"][name]["modules"], am.spec(name).hooks[0].flax_module)


def _folded(am, state, name=NAME):
    """(AdaptedModel, state) with adapter `name`'s reparameterisation MLP folded into plain prefixes."""
    spec = am.spec(name)
    cfg, tr, ex = method_for(spec.config).fold(spec.config, spec.hooks, state["trainable"][name],
                                               state["extras"][name])
    return am.delete(name).add(name, cfg), {"trainable": {name: tr}, "extras": {name: ex}}


def _effect(a, b, mask):
    """Max |a - b| over the real positions (shows the adapter changes the output)."""
    return float(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask).astype(bool)].max())


# ---------------------------------------------------------------------------------------------- export

EXPORT = {  # id -> (tiny model, task, PrefixTuningConfig kwargs, init seed)
    "llama": ("llama", "causal_lm", dict(num_virtual_tokens=3), 11),
    "gpt2": ("gpt2", "causal_lm", dict(num_virtual_tokens=4), 12),
    "qwen2": ("qwen2", "causal_lm", dict(num_virtual_tokens=2), 13),
    # l = 5 > sliding window 4: in sliding layers later tokens lose sight of the first entries, as in HF's cache
    "gemma3": ("gemma3", "causal_lm", dict(num_virtual_tokens=5), 14),
    "bert": ("bert", "base", dict(num_virtual_tokens=3), 15),
    "roberta": ("roberta", "base", dict(num_virtual_tokens=4), 16),
    "llama_projection": ("llama", "causal_lm", dict(num_virtual_tokens=3, prefix_projection=True, token_dim=12,
                                                    encoder_hidden_size=20), 17),
}


@pytest.fixture(scope="module", params=list(EXPORT))
def exported(request, tmp_path_factory):
    """Export a random non-zero jaxpeft prefix, load it with PeftModel.from_pretrained (messages captured)."""
    name, task, kw, seed = EXPORT[request.param]
    tiny = hf_tiny.load(name, task)
    am = AdaptedModel.wrap(build_model(tiny.cfg, task)).add(NAME, PrefixTuningConfig(**kw))
    state = am.init(jax.random.key(seed), tiny.params)
    folder = tmp_path_factory.mktemp(request.param) / "adapter"
    export_peft(am, state, NAME, folder, base_model_name_or_path=tiny.path)
    with af.capture_messages() as msgs:
        pm = peft.PeftModel.from_pretrained(_fresh_hf(tiny), str(folder)).eval()
    ids, mask = _inputs(tiny)
    ours = np.asarray(af.jitted(am)(tiny.params, state, ids, mask, {}))
    ref = af.torch_forward(pm, ids, mask, {}, task)
    base = af.torch_forward(tiny.hf, ids, mask, {}, task)
    return dict(case=request.param, tiny=tiny, am=am, state=state, folder=folder, pm=pm, msgs=msgs, kw=kw,
                mask=mask, ours=ours, ref=ref, base=base)


def test_export_outputs_match_peft(exported):
    e = exported
    assert_close(e["ours"], e["ref"], e["mask"], max_abs=TOL, what=f"{e['case']} export")
    assert _effect(e["ref"], e["base"], e["mask"]) > 1e-2, f"{e['case']}: the prefix does not change PEFT's output"


def test_export_loads_in_peft_without_key_reports_and_with_our_prefix(exported):
    e = exported
    assert af.key_messages(e["msgs"]) == [], e["msgs"]
    file = safetensors.numpy.load_file(str(e["folder"] / "adapter_model.safetensors"))
    loaded = e["pm"].prompt_encoder[NAME].embedding.weight.detach().numpy()
    np.testing.assert_array_equal(loaded, file["prompt_embeddings"])
    theirs = peft.get_peft_model_state_dict(e["pm"], adapter_name=NAME)
    assert sorted(theirs) == ["prompt_embeddings"]
    np.testing.assert_array_equal(theirs["prompt_embeddings"].detach().numpy(), file["prompt_embeddings"])


def test_export_config_and_prompt_embeddings_layout(exported):
    """adapter_config.json sizes, one (l, 2*L*H_kv*d_h) tensor, slot 2i = layer-i keys, 2i+1 = layer-i values."""
    e = exported
    tiny, l = e["tiny"], e["kw"]["num_virtual_tokens"]
    n_layers, h_kv, d_h = _hf_kv_shape(tiny)
    cfg = json.loads((e["folder"] / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PREFIX_TUNING"
    assert cfg["task_type"] == TASK_TYPES[tiny.task]
    assert cfg["num_virtual_tokens"] == l
    assert cfg["num_layers"] == n_layers
    assert cfg["num_attention_heads"] == h_kv
    assert cfg["token_dim"] == h_kv * d_h
    assert cfg["prefix_projection"] is False  # the MLP, if any, is folded into the saved prefix
    loaded = e["pm"].peft_config[NAME]
    assert (loaded.num_layers, loaded.num_attention_heads, loaded.token_dim) == (n_layers, h_kv, h_kv * d_h)
    file = safetensors.numpy.load_file(str(e["folder"] / "adapter_model.safetensors"))
    assert sorted(file) == ["prompt_embeddings"]
    emb = file["prompt_embeddings"]
    assert emb.shape == (l, 2 * n_layers * h_kv * d_h) and emb.dtype == np.float32
    am, state = _folded(e["am"], e["state"])
    node = _prefix_node(am, state)
    kv = emb.reshape(l, 2 * n_layers, h_kv, d_h)
    for i in range(n_layers):
        np.testing.assert_array_equal(kv[:, 2 * i], np.asarray(node["prefix_k"][i]), err_msg=f"layer {i} keys")
        np.testing.assert_array_equal(kv[:, 2 * i + 1], np.asarray(node["prefix_v"][i]), err_msg=f"layer {i} values")


def test_export_then_import_round_trips_prefix_exactly(exported):
    e = exported
    tiny = e["tiny"]
    am2, st2 = import_peft(AdaptedModel.wrap(build_model(tiny.cfg, tiny.task)), tiny.params, e["folder"])
    cfg2 = am2.spec(NAME).config
    assert cfg2.method == "prefix" and cfg2.num_virtual_tokens == e["kw"]["num_virtual_tokens"]
    assert cfg2.prefix_projection is False and cfg2.position_offset == "l"
    am, state = _folded(e["am"], e["state"])
    a, b = _prefix_node(am2, st2), _prefix_node(am, state)
    assert sorted(a) == ["prefix_k", "prefix_v"]
    for leaf in ("prefix_k", "prefix_v"):
        np.testing.assert_array_equal(np.asarray(a[leaf]), np.asarray(b[leaf]), err_msg=leaf)
    assert st2["trainable"][NAME]["shared"] == {} and st2["trainable"][NAME]["saved"] == {}


@pytest.mark.parametrize("case", ["llama", "gpt2", "qwen2", "gemma3"])
def test_left_padding_does_not_change_a_decoder_row_with_prefix(case):
    """jaxpeft's decoders ignore left pads (positions count real tokens only), so a row's outputs must not depend
    on how much left padding its batch needs, prefix or not; gemma3's sliding layers included."""
    name, task, kw, seed = EXPORT[case]
    tiny = hf_tiny.load(name, task)
    am = AdaptedModel.wrap(build_model(tiny.cfg, task)).add(NAME, PrefixTuningConfig(**kw))
    state = am.init(jax.random.key(seed), tiny.params)
    n, pads = 8, hf_tiny.T - 8
    ids, mask = _inputs(tiny)  # the export batch's shapes (compiled already)
    tokens = np.random.RandomState(3).randint(3, hf_tiny.VOCAB, n)
    ids[:2], mask[:2] = tiny.pad_id, 0
    ids[0, :n], mask[0, :n] = tokens, 1  # right-padded
    ids[1, pads:], mask[1, pads:] = tokens, 1  # the same tokens left-padded
    out = np.asarray(af.jitted(am)(tiny.params, state, ids, mask, {}))
    assert_close(out[1, pads:], out[0, :n], max_abs=TIGHT, what=f"{case}: left-padded row vs the same row unpadded")


def test_export_refuses_what_peft_cannot_express(tmp_path):
    """position_offset=0 and layers_to_transform have no PEFT form: export raises instead of writing a lie."""
    cfg = af.small_cfg("llama")
    frozen = af.abstract_params(cfg, "causal_lm")
    am = (AdaptedModel.wrap(build_model(cfg, "causal_lm"))
          .add("zero", PrefixTuningConfig(num_virtual_tokens=2, position_offset=0))
          .add("some", PrefixTuningConfig(num_virtual_tokens=2, layers_to_transform=(1,)))
          .add("ok", PrefixTuningConfig(num_virtual_tokens=2)))
    state = jax.eval_shape(lambda f: am.init(jax.random.key(0), f), frozen)
    assert "position_offset" in peft_unsupported_reason(am, "zero")
    assert "layers_to_transform" in peft_unsupported_reason(am, "some")
    assert peft_unsupported_reason(am, "ok") is None
    for name, word in (("zero", "position_offset"), ("some", "layers_to_transform")):
        with pytest.raises(NotImplementedError, match=word):
            export_peft(am, state, name, tmp_path / name)
        assert not (tmp_path / name / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------------------------------------- import

NATIVE = {  # adapters PEFT creates itself (torch Embedding init N(0, 1); the MLP with PyTorch's Linear init)
    "llama": ("llama", "causal_lm", dict(num_virtual_tokens=3)),
    "bert": ("bert", "base", dict(num_virtual_tokens=3)),
    "llama_projection": ("llama", "causal_lm", dict(num_virtual_tokens=3, prefix_projection=True,
                                                    encoder_hidden_size=24)),
}


@pytest.mark.parametrize("case", list(NATIVE))
def test_peft_native_prefix_imports(case, tmp_path):
    name, task, kw = NATIVE[case]
    tiny = hf_tiny.load(name, task)
    torch.manual_seed(5)
    pm = peft.get_peft_model(copy.deepcopy(tiny.hf), peft.PrefixTuningConfig(task_type=TASK_TYPES[task], **kw)).eval()
    pm.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["prefix_projection"] is kw.get("prefix_projection", False)
    file = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    n_layers, h_kv, d_h = _hf_kv_shape(tiny)
    assert {k: v.shape for k, v in file.items()} == {
        "prompt_embeddings": (kw["num_virtual_tokens"], 2 * n_layers * h_kv * d_h)}  # materialised, even with the MLP
    ids, mask = _inputs(tiny)
    ref = af.torch_forward(pm, ids, mask, {}, task)
    assert _effect(ref, af.torch_forward(tiny.hf, ids, mask, {}, task), mask) > 1e-2
    am, st = import_peft(AdaptedModel.wrap(build_model(tiny.cfg, task)), tiny.params, tmp_path)
    ours = np.asarray(af.jitted(am)(tiny.params, st, ids, mask, {}))
    assert_close(ours, ref, mask, max_abs=TOL, what=f"native {case}")


# ---------------------------------------------------------------------------------------------- reparameterisation

PROJ = dict(num_virtual_tokens=3, prefix_projection=True, token_dim=12, encoder_hidden_size=20)


@pytest.fixture(scope="module")
def projection():
    tiny = hf_tiny.load("llama", "causal_lm")
    am = AdaptedModel.wrap(build_model(tiny.cfg, "causal_lm")).add(NAME, PrefixTuningConfig(**PROJ))
    state = am.init(jax.random.key(21), tiny.params)
    return tiny, am, state


def test_projection_state_holds_only_the_shared_mlp(projection):
    tiny, am, state = projection
    n_layers, h_kv, d_h = _hf_kv_shape(tiny)
    l, d_e, m, d_kv = PROJ["num_virtual_tokens"], PROJ["token_dim"], PROJ["encoder_hidden_size"], h_kv * d_h
    shared = state["trainable"][NAME]["shared"]
    assert jax.tree.map(lambda x: tuple(x.shape), shared) == {
        "embedding": (l, d_e), "mlp_in": {"kernel": (d_e, m), "bias": (m,)},
        "mlp_out": {"kernel": (m, 2 * n_layers * d_kv), "bias": (2 * n_layers * d_kv,)}}
    assert jax.tree.leaves(state["trainable"][NAME]["modules"]) == []  # no per-layer prefix while training the MLP


def test_projection_output_equals_folded_and_exported_then_imported(projection, tmp_path):
    tiny, am, state = projection
    ids, mask = _inputs(tiny)
    out = np.asarray(af.jitted(am)(tiny.params, state, ids, mask, {}))
    base = hf_tiny.hf_forward(tiny, ids, mask).logits.numpy()  # explicit positions = jaxpeft's, no prefix
    assert _effect(out, base, mask) > 1e-2
    am_f, st_f = _folded(am, state)
    assert am_f.spec(NAME).config.prefix_projection is False
    assert st_f["trainable"][NAME]["shared"] == {}
    assert_close(np.asarray(af.jitted(am_f)(tiny.params, st_f, ids, mask, {})), out, mask, max_abs=TIGHT,
                 what="folded")
    export_peft(am, state, NAME, tmp_path)
    am_i, st_i = import_peft(AdaptedModel.wrap(build_model(tiny.cfg, "causal_lm")), tiny.params, tmp_path)
    assert_close(np.asarray(af.jitted(am_i)(tiny.params, st_i, ids, mask, {})), out, mask, max_abs=TIGHT,
                 what="exported and imported")
    for leaf in ("prefix_k", "prefix_v"):
        np.testing.assert_array_equal(np.asarray(_prefix_node(am_i, st_i)[leaf]),
                                      np.asarray(_prefix_node(am_f, st_f)[leaf]))


def test_projection_count_is_embedding_plus_mlp_and_fold_leaves_the_prefix(projection):
    tiny, am, state = projection
    n_layers, h_kv, d_h = _hf_kv_shape(tiny)
    l, d_e, m, d_kv = PROJ["num_virtual_tokens"], PROJ["token_dim"], PROJ["encoder_hidden_size"], h_kv * d_h
    base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tiny.params))
    expect = l * d_e + d_e * m + m + m * 2 * n_layers * d_kv + 2 * n_layers * d_kv
    assert expect == 1640
    assert count_parameters(am, state, tiny.params) == (expect, base + expect)
    am_f, st_f = _folded(am, state)
    assert count_parameters(am_f, st_f, tiny.params) == (l * 2 * n_layers * d_kv, base + l * 2 * n_layers * d_kv)


# ---------------------------------------------------------------------------------------------- parameter counts

_BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, head_dim=64,
                  intermediate_size=3072, max_position_embeddings=512, norm_eps=1e-12)
_SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                     intermediate_size=1536, max_position_embeddings=8192, tie_word_embeddings=True)
COUNTS = {  # id -> (arch, shapes, task, PrefixTuningConfig kwargs, trainable, base parameters)
    "bert_base_direct": ("bert", _BERT_BASE, "base", dict(num_virtual_tokens=20), 368_640, 109_482_240),
    "bert_base_projection": ("bert", _BERT_BASE, "base", dict(num_virtual_tokens=20, prefix_projection=True,
                                                             token_dim=768, encoder_hidden_size=512),
                             9_864_704, 109_482_240),
    "smollm2_direct": ("llama", _SMOLLM2_135M, "causal_lm", dict(num_virtual_tokens=10), 115_200, 134_515_008),
    "smollm2_projection": ("llama", _SMOLLM2_135M, "causal_lm", dict(num_virtual_tokens=10, prefix_projection=True,
                                                                    token_dim=192, encoder_hidden_size=512),
                           6_010_496, 134_515_008),
}


@pytest.mark.parametrize("case", list(COUNTS))
def test_count_parameters_real_model_shapes(case):
    """direct: l * 2L * d_kv; projection: l*d_e + d_e*m + m + m*2L*d_kv + 2L*d_kv (shapes only, no weights)."""
    arch, shapes, task, kw, trainable, base = COUNTS[case]
    cfg = af.small_cfg(arch, **shapes)
    frozen = af.abstract_params(cfg, task)
    am = AdaptedModel.wrap(build_model(cfg, task)).add(NAME, PrefixTuningConfig(**kw))
    state = jax.eval_shape(lambda f: am.init(jax.random.key(0), f), frozen)
    l, n_layers, d_kv = kw["num_virtual_tokens"], cfg.num_layers, cfg.num_kv_heads * cfg.head_dim
    if kw.get("prefix_projection"):
        d_e, m = kw["token_dim"], kw["encoder_hidden_size"]
        formula = l * d_e + d_e * m + m + m * 2 * n_layers * d_kv + 2 * n_layers * d_kv
    else:
        formula = l * 2 * n_layers * d_kv
    assert formula == trainable
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen)) == base
    assert count_parameters(am, state, frozen) == (trainable, base + trainable)


@pytest.mark.parametrize("projection_on", [False, True])
def test_count_parameters_equals_peft_get_nb_trainable_parameters(projection_on):
    tiny = hf_tiny.load("llama", "causal_lm")
    kw = dict(num_virtual_tokens=4, prefix_projection=projection_on, encoder_hidden_size=24)
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(tiny.hf), peft.PrefixTuningConfig(task_type="CAUSAL_LM", **kw))
    am = AdaptedModel.wrap(build_model(tiny.cfg, "causal_lm")).add(NAME, PrefixTuningConfig(**kw))
    state = jax.eval_shape(lambda f: am.init(jax.random.key(0), f), tiny.params)
    assert count_parameters(am, state, tiny.params) == tuple(pm.get_nb_trainable_parameters())


# ---------------------------------------------------------------------------------------------- generation

MAX_NEW = 6


@pytest.mark.parametrize("name,offset", [("llama", "l"), ("llama", 0), ("gpt2", "l"), ("gpt2", 0)])
def test_cached_generation_equals_uncached_greedy(name, offset):
    """generate() on a left-padded batch of two prompts (KV cache, prefix slots written at prefill) gives the tokens
    of a greedy loop of uncached forwards on each prompt alone; the last-position logits of the prefill and of every
    decode step (recorded inside the compiled loop) equal the uncached ones."""
    tiny = hf_tiny.load(name, "causal_lm")
    l = EXPORT[name][2]["num_virtual_tokens"]
    am = AdaptedModel.wrap(build_model(tiny.cfg, "causal_lm")).add(
        NAME, PrefixTuningConfig(num_virtual_tokens=l, position_offset=offset))
    state = am.init(jax.random.key(31), tiny.params)
    rs = np.random.RandomState(7)
    prompts = [rs.randint(3, hf_tiny.VOCAB, 4).tolist(), rs.randint(3, hf_tiny.VOCAB, 6).tolist()]
    seen = []

    def model_fn(p, ids, mask, cache):
        out = am.apply(p[0], p[1], ids, mask, cache=cache)
        jax.debug.callback(lambda x: seen.append(np.asarray(x)), out.logits[:, -1], ordered=True)
        return out

    toks = generate(am.module, (tiny.params, state), prompts, max_new_tokens=MAX_NEW, bucket=8,
                    model_fn=model_fn, cache_key=(am, "x", "recorded"),
                    init_cache=lambda b, n: am.init_cache(state, b, n), position_shift=am.max_position_shift())
    assert len(seen) == MAX_NEW and seen[0].shape == (2, hf_tiny.VOCAB)  # prefill + MAX_NEW - 1 decode steps

    fwd = af.jitted(am)
    ref_ids, ref_mask = _inputs(tiny)  # the export batch's shapes (compiled already for offset 'l')

    def uncached(seq):  # logits of one sequence alone (row 0, right-padded; the other rows are all padding)
        ids, mask = np.full_like(ref_ids, tiny.pad_id), np.zeros_like(ref_mask)
        ids[0, :len(seq)], mask[0, :len(seq)] = seq, 1
        return np.asarray(fwd(tiny.params, state, ids, mask, {}))[0]

    expect = []
    for i, p in enumerate(prompts):
        seq = list(p)
        for step in range(MAX_NEW):
            logits = uncached(seq)[len(seq) - 1]
            what = f"row {i} " + ("prefill" if step == 0 else f"decode step {step}")
            assert_close(seen[step][i], logits, max_abs=TIGHT, what=what)
            seq.append(int(np.argmax(logits)))
        expect.append(seq[len(p):])
        plain = hf_tiny.hf_forward(tiny, np.asarray([p]), np.ones((1, len(p)), np.int64)).logits.numpy()[0, -1]
        assert np.abs(seen[0][i] - plain).max() > 1e-2, "the prefix does not change the next-token logits"
    assert toks == expect


# ---------------------------------------------------------------------------------------------- adapter index


@pytest.mark.parametrize("name,task", [("llama", "causal_lm"), ("bert", "base")])
def test_per_example_adapter_index_equals_each_row_alone(name, task):
    """Rows pick 'lora' (0), 'prefix' (1) or nothing (-1); each equals that row run alone with only its adapter
    (and differs from the other two choices, so a wrong pick shows)."""
    tiny = hf_tiny.load(name, task)
    am = (AdaptedModel.wrap(build_model(tiny.cfg, task)).add("lora", LoraConfig(init_lora_weights=False))
          .add("prefix", PrefixTuningConfig(num_virtual_tokens=3)))
    state = am.init(jax.random.key(41), tiny.params)
    ids, mask = hf_tiny.batch(tiny, b=5)  # full, left 3, right 4, left 5, right 2
    index = np.array([0, 1, -1, 1, 0])

    @jax.jit
    def mixed_fn(frozen, st, ids, mask, index):
        return af.main(am.apply(frozen, st, ids, mask, active=("lora", "prefix"), adapter_index=index), task)

    mixed = np.asarray(mixed_fn(tiny.params, state, ids, mask, jnp.asarray(index)))
    choices = {0: "lora", 1: "prefix", -1: None}
    for r, k in enumerate(index):
        alone = {c: np.asarray(af.jitted(am, a)(tiny.params, state, ids[r:r + 1], mask[r:r + 1], {}))[0]
                 for c, a in choices.items()}
        m = mask[r]
        assert_close(mixed[r], alone[int(k)], m, max_abs=TIGHT, what=f"row {r} ({choices[int(k)]})")
        for other in choices:
            if other != int(k):
                assert _effect(mixed[r], alone[other], m) > 1e-2, f"row {r}: indistinguishable from {other}"


# ---------------------------------------------------------------------------------------------- refusals


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.relu(nn.Dense(8)(x)))


def _abstract_prefix_model():
    cfg = af.small_cfg("llama")
    frozen = af.abstract_params(cfg, "causal_lm")
    am = AdaptedModel.wrap(build_model(cfg, "causal_lm")).add(NAME, PrefixTuningConfig(num_virtual_tokens=3))
    return am, frozen, jax.eval_shape(lambda f: am.init(jax.random.key(0), f), frozen)


def test_merge_prefix_adapter_raises_cannot_be_merged():
    am, frozen, state = _abstract_prefix_model()
    with pytest.raises(ValueError, match="cannot be merged"):
        merge(am, frozen, state, NAME)


def test_prefix_on_model_without_prefix_hook_raises():
    wrapped = AdaptedModel.wrap_any(_MLP(), jnp.zeros((1, 4)))
    assert wrapped.add("lora", LoraConfig(r=2, target_modules=("Dense_0",))).names == ("lora",)  # the model is fine
    with pytest.raises(ValueError, match="prefix hook"):
        wrapped.add(NAME, PrefixTuningConfig(num_virtual_tokens=2))


def test_prefix_config_with_target_modules_raises():
    am = AdaptedModel.wrap(build_model(af.small_cfg("llama"), "causal_lm"))
    with pytest.raises(ValueError, match="target_modules"):
        am.add(NAME, PrefixTuningConfig(num_virtual_tokens=2, target_modules=["q_proj"]))


# ---------------------------------------------------------------------------------------------- summary


@pytest.mark.parametrize("arch,task", [("llama", "causal_lm"), ("bert", "base")])
def test_summary_names_hook_path_and_prefix_shapes(arch, task):
    cfg = af.small_cfg(arch)
    frozen = af.abstract_params(cfg, task)
    am = (AdaptedModel.wrap(build_model(cfg, task)).add("direct", PrefixTuningConfig(num_virtual_tokens=3))
          .add("mlp", PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, token_dim=12,
                                         encoder_hidden_size=20)))
    state = jax.eval_shape(lambda f: am.init(jax.random.key(0), f), frozen)
    text = am.summary(state)
    site = am.spec("direct").hooks[0]
    hkv, dh, n = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    expected_path = {"llama": "layers/self_attn/prefix", "bert": "encoder/layer/attention/self/prefix"}[arch]
    assert site.flax_module == expected_path
    assert expected_path.replace("/", ".") in text
    assert f"prefix hook, {hkv}x{dh} per entry" in text
    assert f"prefix_k {(n, 3, hkv, dh)}" in text and f"prefix_v {(n, 3, hkv, dh)}" in text
    assert "shared ['embedding'] (4, 12)" in text
    assert f"shared ['mlp_out']['kernel'] (20, {2 * n * hkv * dh})" in text
