"""P-tuning v2: prefix tuning with per-layer prefix lengths (padded to the longest, hidden by a frozen slot mask),
prefix dropout (default 0.1) and the jaxpeft save format (PEFT cannot hold it).

The model is a small jaxpeft-only BERT (3 layers, hidden 32, 4 heads of 8, no hidden/attention dropout, so prefix
dropout is the only randomness) with random weights; references are the same adapter with other values in the
padding, a model whose excluded layer comes from layers_to_transform, and the eval forward.
"""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.errors import InvalidRngError

sys.path.insert(0, os.path.dirname(__file__))
import adapter_fixtures as af  # noqa: E402
from jaxpeft.adapters import AdaptedModel, APTConfig, PrefixTuningConfig, PTuningV2Config  # noqa: E402
from jaxpeft.adapters.native_io import CONFIG_FILE, WEIGHTS_FILE, save_any  # noqa: E402
from jaxpeft.adapters.partition import count_parameters  # noqa: E402
from jaxpeft.adapters.peft_io import peft_unsupported_reason  # noqa: E402
from jaxpeft.models import build_model  # noqa: E402

NAME = af.NAME
TASK = "seq_cls"
CFG = af.small_cfg("bert", num_layers=3)
D_KV = CFG.num_kv_heads * CFG.head_dim  # 32
LENGTHS = (3, 0, 2)
PER_LAYER = PTuningV2Config(prefix_lengths=LENGTHS, prefix_dropout=0.0)
# layer 1 excluded by layers_to_transform instead of by a length of 0 (its length here is never used)
EXCLUDED = PTuningV2Config(prefix_lengths=(3, 3, 2), layers_to_transform=(0, 2), prefix_dropout=0.0)


@functools.lru_cache(maxsize=None)
def params():
    return af.random_params(CFG, TASK, seed=0)


def model(config, cfg=CFG, task=TASK):
    return AdaptedModel.wrap(build_model(cfg, task)).add(NAME, config)


@functools.lru_cache(maxsize=None)
def _init(config):
    return model(config).init(jax.random.key(0), params())


def adapted(config):
    """(AdaptedModel, state), initialised once per config (read-only: `with_prefix` returns a changed copy)."""
    return model(config), _init(config)


def abstract_state(am, frozen):
    """The adapter state as ShapeDtypeStructs (nothing computed)."""
    return jax.eval_shape(lambda p: am.init(jax.random.key(0), p), frozen)


def zeros_state(am, frozen):
    """A concrete all-zero state of the right layout, without compiling an init (for writing folders)."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_state(am, frozen))


def hook(am, state, group="trainable"):
    return af.get(state[group][NAME]["modules"], am.spec(NAME).hooks[0].flax_module)


def with_prefix(am, state, k, v):
    new = jax.tree.map(lambda x: x, state)
    hook(am, new).update(prefix_k=jnp.asarray(k, jnp.float32), prefix_v=jnp.asarray(v, jnp.float32))
    return new


def random_prefix(seed, shape):
    rs = np.random.RandomState(seed)
    return 2.0 * rs.randn(*shape), 2.0 * rs.randn(*shape)


@functools.lru_cache(maxsize=None)
def batch():
    """(ids, mask, kwargs): 4 rows of 9 tokens, rows 1 and 3 padded, random token types."""
    rs = np.random.RandomState(1)
    ids = rs.randint(3, CFG.vocab_size, (4, 9))
    mask = np.ones_like(ids)
    mask[1, 6:], mask[3, 4:] = 0, 0
    ids[mask == 0] = 0
    return ids, mask, {"token_type_ids_bt": (rs.randint(0, 2, ids.shape) * mask)}


@functools.lru_cache(maxsize=None)
def _jitted(am, deterministic):
    def f(frozen, state, ids, mask, kw, rngs):
        return am.apply(frozen, state, ids, mask, deterministic=deterministic, rngs=rngs, **kw).logits

    return jax.jit(f)


def logits(am, state, deterministic=True, rngs=None):
    """(B, C) logits on `batch()` under jax.jit (compiled once per adapter set and mode)."""
    ids, mask, kw = batch()
    return np.asarray(_jitted(am, deterministic)(params(), state, ids, mask, kw, rngs))


# ---------------------------------------------------------------------------------------------- per-layer lengths


def test_slot_mask_marks_the_real_slots_per_layer():
    am, st = adapted(PER_LAYER)
    assert am.prefix_slots(st) == 3 and am.max_position_shift() == 3
    assert hook(am, st)["prefix_k"].shape == (3, 3, CFG.num_kv_heads, CFG.head_dim)
    np.testing.assert_array_equal(np.asarray(hook(am, st, "extras")["slot_mask"]),
                                  [[1, 1, 1], [0, 0, 0], [1, 1, 0]])
    np.testing.assert_array_equal(np.asarray(hook(am, st, "extras")["layer_mask"]), [1, 1, 1])


def test_values_in_padded_slots_do_not_change_outputs():
    am, st = adapted(PER_LAYER)
    shape = hook(am, st)["prefix_k"].shape
    k, v = random_prefix(2, shape)
    y = logits(am, with_prefix(am, st, k, v))
    k2, v2 = k.copy(), v.copy()
    pad_k, pad_v = random_prefix(3, shape)
    padded = np.asarray(hook(am, st, "extras")["slot_mask"]) == 0  # (L, l)
    k2[padded], v2[padded] = 50.0 * pad_k[padded], 50.0 * pad_v[padded]
    np.testing.assert_array_equal(logits(am, with_prefix(am, st, k2, v2)), y)
    k3 = k.copy()
    k3[2, 1] += 3.0  # a real slot of the partly padded layer
    assert np.abs(logits(am, with_prefix(am, st, k3, v)) - y).max() > 1e-3, "real slots must matter"


def test_length_zero_layer_equals_a_layer_without_prefix():
    am, st = adapted(PER_LAYER)
    am_x, st_x = adapted(EXCLUDED)
    np.testing.assert_array_equal(np.asarray(hook(am_x, st_x, "extras")["layer_mask"]), [1, 0, 1])
    k, v = random_prefix(4, hook(am, st)["prefix_k"].shape)
    y = logits(am, with_prefix(am, st, k, v))
    y_x = logits(am_x, with_prefix(am_x, st_x, k, v))
    np.testing.assert_allclose(y, y_x, rtol=0, atol=1e-6)
    # and a prefix in layer 1 would have changed the output: give it the full length
    am_all, st_all = adapted(PTuningV2Config(prefix_lengths=(3, 3, 2), prefix_dropout=0.0))
    assert np.abs(logits(am_all, with_prefix(am_all, st_all, k, v)) - y).max() > 1e-3


def test_count_parameters_counts_real_slots_and_the_head():
    frozen = params()
    head = int(np.prod(frozen["classifier"]["kernel"].shape) + np.prod(frozen["classifier"]["bias"].shape))
    assert head == 32 * 2 + 2
    base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))
    for config, slots in ((PER_LAYER, 5), (EXCLUDED, 5), (PTuningV2Config(num_virtual_tokens=4), 12),
                          (PTuningV2Config(prefix_lengths=(3, 3, 2)), 8)):
        am = model(config)
        trainable, total = count_parameters(am, abstract_state(am, frozen), frozen)
        assert trainable == slots * 2 * D_KV, config
        assert total == base + trainable
        with_head = model(PTuningV2Config(prefix_lengths=config.prefix_lengths, num_virtual_tokens=4,
                                          layers_to_transform=config.layers_to_transform,
                                          modules_to_save=("classifier",)))
        trainable, total = count_parameters(with_head, abstract_state(with_head, frozen), frozen)
        assert trainable == slots * 2 * D_KV + head, config
        assert total == base + trainable


# ---------------------------------------------------------------------------------------------- dropout

DROPOUT = PTuningV2Config(num_virtual_tokens=4)
NO_DROPOUT = PTuningV2Config(num_virtual_tokens=4, prefix_dropout=0.0)


def test_prefix_dropout_is_on_by_default_only_in_training_and_follows_the_rng():
    assert DROPOUT.prefix_dropout == 0.1 and DROPOUT.init_std == 0.02
    am, st = adapted(DROPOUT)
    am0 = model(NO_DROPOUT)  # same state layout: the same values without dropout
    k, v = random_prefix(5, hook(am, st)["prefix_k"].shape)
    st = with_prefix(am, st, k, v)
    evaluation = logits(am, st)
    np.testing.assert_array_equal(evaluation, logits(am0, st))
    r1 = logits(am, st, deterministic=False, rngs={"dropout": jax.random.key(1)})
    r1_again = logits(am, st, deterministic=False, rngs={"dropout": jax.random.key(1)})
    r2 = logits(am, st, deterministic=False, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(r1, r1_again)
    assert np.abs(r1 - evaluation).max() > 1e-3, "training forward must drop prefix entries"
    assert np.abs(r1 - r2).max() > 1e-3, "another dropout key must drop other entries"
    # the backbone has no dropout of its own: with prefix_dropout 0 training equals evaluation
    np.testing.assert_allclose(logits(am0, st, deterministic=False, rngs={"dropout": jax.random.key(1)}),
                               evaluation, rtol=0, atol=1e-6)


def test_prefix_dropout_draws_a_mask_per_example():
    """As the P-tuning v2 recipe, which drops the batch-expanded past_key_values: identical rows of one training
    batch get different prefix entries dropped, so their outputs differ (a mask shared by the batch would not)."""
    am, st = adapted(DROPOUT)
    st = with_prefix(am, st, *random_prefix(5, hook(am, st)["prefix_k"].shape))
    ids, mask, kw = batch()
    same = (np.repeat(ids[:1], len(ids), 0), np.repeat(mask[:1], len(ids), 0),
            {k: np.repeat(v[:1], len(ids), 0) for k, v in kw.items()})
    y = np.asarray(_jitted(am, False)(params(), st, *same, {"dropout": jax.random.key(1)}))
    y_eval = np.asarray(_jitted(am, True)(params(), st, *same, None))
    np.testing.assert_allclose(y_eval, np.repeat(y_eval[:1], len(ids), 0), rtol=0, atol=1e-6)
    assert np.abs(y - y_eval).max() > 1e-3, "training forward must drop prefix entries"
    spread = np.abs(y - y[:1]).max()
    assert spread > 1e-4, f"identical rows got identical dropout masks (max row difference {spread})"


def test_training_forward_without_a_dropout_rng_raises():
    am, st = adapted(DROPOUT)
    ids, mask, kw = batch()
    with pytest.raises(InvalidRngError, match='PRNG for "dropout"'):
        am.apply(params(), st, ids, mask, deterministic=False, **kw)


# ---------------------------------------------------------------------------------------------- config errors


def test_wrong_number_of_prefix_lengths_fails_at_init():
    am = model(PTuningV2Config(prefix_lengths=(3, 2)))
    with pytest.raises(ValueError, match=r"prefix_lengths has 2 entries but the model has 3 layers"):
        am.init(jax.random.key(0), params())
    am = model(APTConfig(prefix_lengths=(1, 2, 3, 4)))
    with pytest.raises(ValueError, match=r"prefix_lengths has 4 entries"):
        abstract_state(am, params())


@pytest.mark.parametrize("cls", [PTuningV2Config, APTConfig])
def test_invalid_prefix_lengths_configs_raise(cls):
    for bad in ((3, -1, 2), (0, 0, 0), (), (2.0, 1, 1)):
        with pytest.raises(ValueError, match="prefix_lengths"):
            cls(prefix_lengths=bad)
    with pytest.raises(ValueError, match="prefix_projection"):
        cls(prefix_lengths=(3, 0, 2), prefix_projection=True)
    assert cls(prefix_lengths=[3, 0, 2]).prefix_lengths == (3, 0, 2), "lists (from YAML/JSON) become tuples"
    with pytest.raises(ValueError, match="prefix_dropout"):
        cls(prefix_dropout=1.0)
    with pytest.raises(ValueError, match="position_offset"):
        cls(position_offset=5)
    with pytest.raises(ValueError, match="layers_to_transform"):
        model(cls(target_modules=("query",)))


# ---------------------------------------------------------------------------------------------- saving


def test_save_any_writes_the_jaxpeft_format_for_ptuning_v2_and_apt(tmp_path):
    frozen = params()
    for config in (PER_LAYER, APTConfig(prefix_lengths=LENGTHS, gate_bias=True)):
        am = model(config)
        reason = peft_unsupported_reason(am, NAME)
        assert reason == f"method {config.method!r} has no Hugging Face PEFT format"
        out, fmt = save_any(am, zeros_state(am, frozen), NAME, tmp_path / config.method)
        assert fmt == "jaxpeft"
        assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, "README.md"])
        assert not (out / "adapter_config.json").exists()


@pytest.mark.parametrize("kw,why", [(dict(position_offset=0), "position_offset=0"),
                                    (dict(layers_to_transform=(0, 2)), "layers_to_transform")])
def test_prefix_tuning_without_a_peft_form_saves_the_jaxpeft_format(tmp_path, kw, why):
    frozen = params()
    am = model(PrefixTuningConfig(num_virtual_tokens=4, **kw))
    reason = peft_unsupported_reason(am, NAME)
    assert reason is not None and reason.startswith(why)
    out, fmt = save_any(am, zeros_state(am, frozen), NAME, tmp_path / "a")
    assert fmt == "jaxpeft" and (out / CONFIG_FILE).exists() and not (out / "adapter_config.json").exists()
    # the default prefix tuning has a PEFT form and is written as PEFT
    plain = model(PrefixTuningConfig(num_virtual_tokens=4))
    assert peft_unsupported_reason(plain, NAME) is None
    out, fmt = save_any(plain, zeros_state(plain, frozen), NAME, tmp_path / "b")
    assert fmt == "peft" and (out / "adapter_config.json").exists() and not (out / CONFIG_FILE).exists()
