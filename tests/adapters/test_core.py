"""AdaptedModel core: the jit-cache trap, per-example adapter index, the adapter set, summary, any linen model.

The trap: flax's `nn.intercept_methods` is Python state read while *tracing*. Entered outside a jitted function
it is invisible to jit's cache key, so a cached trace silently keeps (or ignores) an interception. AdaptedModel
enters it inside `apply`, i.e. inside the traced function, with `active` a static argument and
`adapter_index` an array: every call gets the right adapters without recompiling for the index.
References are built by hand, independently of the library's merge: the effective kernels
W + (lora_alpha / r) * A @ B per layer in numpy, run through the plain backbone (no interception at all).
"""
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import adapter_fixtures as af  # noqa: E402
from jaxpeft.errors import AdapterError
from jaxpeft.adapters import ALL, AdaptedModel, LoraConfig, drop_adapter  # noqa: E402
from jaxpeft.adapters.merge import merge  # noqa: E402
from jaxpeft.adapters.partition import count_parameters  # noqa: E402
from jaxpeft.models import build_model  # noqa: E402
from jaxpeft.models.layers import Dense  # noqa: E402
from parity import assert_close  # noqa: E402

B, T = 4, 9


@pytest.fixture(scope="module")
def two():
    """Small llama (hidden 32, 2 layers) with adapters 'a' (q, v; r 4, scale 2) and 'b' (k, down; r 2, scale 3),
    both non-zero; `refs` are hand-built (see _hand_merged), not the library's merge."""
    cfg = af.small_cfg()
    params = af.random_params(cfg, "causal_lm", seed=3)
    am = (AdaptedModel.wrap(build_model(cfg))
          .add("a", LoraConfig(r=4, lora_alpha=8.0, target_modules=("q_proj", "v_proj"), init_lora_weights=False))
          .add("b", LoraConfig(r=2, lora_alpha=6.0, target_modules=("k_proj", "down_proj"), init_lora_weights=False)))
    state = am.init(jax.random.key(3), params)
    ids = jnp.asarray(np.random.RandomState(3).randint(3, cfg.vocab_size, (B, T)), jnp.int32)
    mask = jnp.ones_like(ids)
    base = np.asarray(af.jitted_base(cfg, "causal_lm")(params, ids, mask, {}))
    # references without any interception and without the library's merge: hand-built kernels, plain backbone
    refs = {}
    for key in ("a", "b", ("a", "b")):
        hand = _hand_merged(params, state, (key,) if isinstance(key, str) else key)
        refs[key] = np.asarray(af.jitted_base(cfg, "causal_lm")(hand, ids, mask, {}))
    return dict(cfg=cfg, params=params, am=am, state=state, ids=ids, mask=mask, base=base, refs=refs)


# adapter -> (LoRA scale lora_alpha / r, the (group, module) kernels it adapts in every layer of `two`)
_HAND = {"a": (8.0 / 4, (("self_attn", "q_proj"), ("self_attn", "v_proj"))),
         "b": (6.0 / 2, (("self_attn", "k_proj"), ("mlp", "down_proj")))}


def _hand_merged(params, state, names):
    """The base params with W + (lora_alpha / r) * A @ B added by hand in float64 numpy for every adapter in
    `names` and every layer (A (L, in, r), B (L, r, out) read from the state), cast back to float32."""
    out = jax.tree.map(lambda x: np.array(x, np.float64), params)
    for n in names:
        scale, mods = _HAND[n]
        for group, mod in mods:
            fac = state["trainable"][n]["modules"]["layers"][group][mod]
            a, b = np.asarray(fac["lora_A"], np.float64), np.asarray(fac["lora_B"], np.float64)
            delta = scale * np.einsum("lir,lro->lio", a, b)
            assert np.abs(delta).max() > 1e-2, f"{n} {mod}: a zero delta would make the reference vacuous"
            out["layers"][group][mod]["kernel"] = out["layers"][group][mod]["kernel"] + delta
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), out)


@pytest.fixture(scope="module")
def by_active(two):
    """ONE jitted function, `active` static; a Python counter records every trace."""
    am = two["am"]
    traces = []

    def f(frozen, state, ids, active):
        traces.append(active)
        return am.apply(frozen, state, ids, active=active).logits

    return jax.jit(f, static_argnames=("active",)), traces


def test_static_active_switches_between_adapters(two, by_active):
    f, traces = by_active
    p, s, ids = two["params"], two["state"], two["ids"]
    out = {}
    for active in ("a", "b", None, ("a", "b"), "a", None):
        y = np.asarray(f(p, s, ids, active=active))
        if active is None:
            assert np.array_equal(y, two["base"]), "active=None must be the exact (jitted) base model"
        else:
            assert_close(y, two["refs"][active], max_abs=1e-4, rel=1e-5, what=f"active={active}")
        if active in out:  # second call: cache hit, same result
            assert np.array_equal(y, out[active])
        out[active] = y
    assert sorted(map(str, traces)) == sorted(map(str, ["a", "b", None, ("a", "b")])), traces
    assert f._cache_size() == 4
    # the adapters differ from each other and from the base: a stale trace could not pass the checks above
    for x, y in (("a", "b"), ("a", None), ("b", None)):
        assert np.abs(out[x] - out[y]).max() > 1e-2


def test_all_uses_every_adapter_in_the_state(two, by_active):
    f, _ = by_active
    y = np.asarray(f(two["params"], two["state"], two["ids"], active=ALL))
    assert_close(y, two["refs"][("a", "b")], max_abs=1e-4, rel=1e-5, what="ALL")
    only_a = drop_adapter(two["state"], "b")  # ALL = the adapters present in the state
    y = np.asarray(f(two["params"], only_a, two["ids"], active=ALL))
    assert_close(y, two["refs"]["a"], max_abs=1e-4, rel=1e-5, what="ALL with b dropped")


def test_adapter_index_is_an_array_not_a_recompile(two):
    am, p, s, ids = two["am"], two["params"], two["state"], two["ids"]
    traces = []

    def g(frozen, state, ids, idx):
        traces.append(1)
        return am.apply(frozen, state, ids, active=("a", "b"), adapter_index=idx).logits

    g = jax.jit(g)
    for idx in ([-1, 0, 1, 0], [1, -1, 0, 1], [-1, -1, -1, -1]):
        y = np.asarray(g(p, s, ids, jnp.asarray(idx, jnp.int32)))
        for row, k in enumerate(idx):
            if k == -1:
                assert np.array_equal(y[row], two["base"][row]), f"row {row} (index -1) must be the base bitwise"
            else:
                ref = two["refs"]["ab"[k]][row]
                assert_close(y[row], ref, max_abs=1e-4, rel=1e-5, what=f"row {row} adapter {'ab'[k]}")
    assert len(traces) == 1 and g._cache_size() == 1


class _DoubleQ:
    """A hand-written interceptor: doubles every q_proj output."""

    def __call__(self, next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.name == "q_proj":
            return 2 * y
        return y


def test_naive_intercept_outside_jit_reuses_the_stale_trace(two):
    """The trap: intercept_methods entered around an already-traced function changes nothing (cache hit, even
    through a new jax.jit wrapper of the same Python function), and a function first traced inside the context
    keeps the interception outside it. AdaptedModel.apply enters it inside the trace
    (test_static_active_switches_between_adapters shows it switching correctly)."""
    cfg, p, ids = two["cfg"], two["params"], two["ids"]
    module = build_model(cfg)

    def naive(params, ids):
        return module.apply({"params": params}, ids).logits

    def naive_too(params, ids):  # same body, a different function object (a different cache entry)
        return module.apply({"params": params}, ids).logits

    plain = jax.jit(naive)
    base = np.asarray(plain(p, ids))
    inside = jax.jit(naive_too)
    with nn.intercept_methods(_DoubleQ()):
        stale = np.asarray(plain(p, ids))  # cached trace: the interceptor is silently ignored
        rewrapped = np.asarray(jax.jit(naive)(p, ids))  # a new jit wrapper shares the function's cache
        doubled = np.asarray(inside(p, ids))  # first traced here: intercepted
    after = np.asarray(inside(p, ids))  # outside the context, still intercepted (stale the other way)
    assert np.array_equal(stale, base) and np.array_equal(rewrapped, base)
    assert np.abs(doubled - base).max() > 1e-2, "the interceptor acts when the function is traced inside it"
    assert np.array_equal(after, doubled)


# ---------------------------------------------------------------------------------------------- adapter set


def test_add_delete_and_errors(two):
    am = two["am"]
    assert am.names == ("a", "b")
    with pytest.raises(ValueError, match="exists already"):
        am.add("a", LoraConfig())
    for bad in ("", "x/y", "x:y"):
        with pytest.raises(ValueError, match="adapter name"):
            am.add(bad, LoraConfig())
    without_b = am.delete("b")
    assert without_b.names == ("a",) and am.names == ("a", "b"), "delete returns a copy"
    with pytest.raises(KeyError, match="zzz"):
        am.delete("zzz")
    # immutable and hashable: a changed adapter set is a different static argument
    assert without_b != am and hash(without_b.add("b", am.spec("b").config)) == hash(am)
    assert without_b.add("b", am.spec("b").config) == am
    c = am.add("c", LoraConfig(r=3, target_modules=("o_proj",)))
    assert c.names == ("a", "b", "c") and am.names == ("a", "b")


def test_drop_adapter_and_unknown_active(two):
    am, s, p, ids = two["am"], two["state"], two["params"], two["ids"]
    dropped = drop_adapter(s, "b")
    assert set(dropped["trainable"]) == {"a"} and set(dropped["extras"]) == {"a"}
    assert set(s["trainable"]) == {"a", "b"}, "drop_adapter returns a copy"
    assert dropped["trainable"]["a"] is s["trainable"]["a"]
    with pytest.raises(KeyError, match="zzz"):
        am.apply(p, s, ids, active="zzz")
    with pytest.raises(KeyError, match="no weights"):
        am.apply(p, dropped, ids, active="b")
    with pytest.raises(ValueError, match="no adapter to initialise"):
        AdaptedModel.wrap(am.module).init(jax.random.key(0), p)


def test_init_selected_names_only(two):
    cfg, p = two["cfg"], two["params"]
    am = two["am"].add("c", LoraConfig(r=2, target_modules=("o_proj",)))
    st = jax.eval_shape(lambda fr: am.init(jax.random.key(0), fr, names=["c"]), p)
    assert set(st["trainable"]) == {"c"}
    assert set(af.get(st["trainable"]["c"]["modules"], "layers/self_attn")) == {"o_proj"}


def test_modules_to_save_checks(two):
    p = two["params"]
    am = two["am"].add("h", LoraConfig(r=2, target_modules=("q_proj",), modules_to_save=("lm_head",)))
    st = jax.eval_shape(lambda fr: am.init(jax.random.key(0), fr, names=["h"]), p)
    assert set(st["trainable"]["h"]["saved"]) == {"lm_head"}
    with pytest.raises(AdapterError, match=r"adapter\(s\) \['h'\] train their own copy of \['lm_head'\].*"
                                           r"per-example adapter_index.*active=NAME"):
        am.apply(p, st, two["ids"], active="h", adapter_index=jnp.zeros((B,), jnp.int32))
    bad = two["am"].add("h", LoraConfig(r=2, target_modules=("q_proj",), modules_to_save=("classifier",)))
    with pytest.raises(AdapterError, match="'classifier' is not a top-level module.*name one of those"):
        jax.eval_shape(lambda fr: bad.init(jax.random.key(0), fr, names=["h"]), p)


def test_summary_lists_every_adapted_module_with_shapes(two):
    am, s = two["am"], two["state"]
    text = am.summary(s)
    for name in ("a", "b"):
        assert f"adapter '{name}'" in text
        for t in am.spec(name).targets:
            node = af.get(s["trainable"][name]["modules"], t.flax_module)
            line = next(l for l in text.splitlines() if t.hf_module in l)
            assert f"[{t.n_in}->{t.n_out}; layers 0,1]" in line
            for leaf, v in node.items():
                assert f"{leaf} {tuple(v.shape)}" in line
    assert len([l for l in text.splitlines() if l.startswith("  ")]) == 4
    assert "model.layers.{i}.self_attn.q_proj" in text and "model.layers.{i}.mlp.down_proj" in text


# ---------------------------------------------------------------------------------------------- any linen model


class _Block(nn.Module):
    """One scanned block mixing flax's nn.Dense (fc1, with bias) and jaxpeft's Dense (fc2)."""

    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(24, name="fc1")(x)
        return x + Dense(8, name="fc2")(jax.nn.gelu(h)), None


class _MLP(nn.Module):
    """A 2-block residual MLP on float inputs (no ModelConfig, no name map), plus a plain head."""

    @nn.compact
    def __call__(self, x):
        blocks = nn.scan(_Block, variable_axes={True: 0}, split_rngs={True: True}, length=2,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = blocks(name="blocks")(x, None)
        return nn.Dense(3, name="head")(x)


@pytest.fixture(scope="module")
def mlp():
    net = _MLP()
    x = jnp.asarray(np.random.RandomState(0).randn(5, 8), jnp.float32)
    params = nn.meta.unbox(net.init(jax.random.key(0), x)["params"])
    return net, x, params


def test_any_linen_model_targets_flax_paths(mlp):
    net, x, params = mlp
    am = AdaptedModel.wrap_any(net, x)
    names = {m.hf_module for m in am.modules}
    assert names == {"blocks.{i}.fc1", "blocks.{i}.fc2", "head"}
    one = am.add("one", LoraConfig(target_modules=r"blocks\.1\.fc1"))
    (t,) = one.spec("one").targets
    assert (t.flax_module, t.layers, t.n_in, t.n_out) == ("blocks/fc1", (1,), 8, 24)
    with pytest.raises(ValueError, match="fc3.*close candidates: .*fc"):
        am.add("x", LoraConfig(target_modules=("fc3",)))
    with pytest.raises(ValueError, match="no default"):
        am.add("x", LoraConfig())


def test_any_linen_model_adapts_merges_and_counts(mlp):
    net, x, params = mlp
    am = AdaptedModel.wrap_any(net, x).add("a", LoraConfig(r=2, target_modules=("fc1", "fc2", "head"),
                                                           init_lora_weights=False))
    st = am.init(jax.random.key(1), params)
    base = np.asarray(net.apply({"params": params}, x))
    y = np.asarray(am.apply(params, st, x))
    assert np.array_equal(np.asarray(am.apply(params, st, x, active=None)), base)
    assert np.abs(y - base).max() > 1e-2
    merged, _ = merge(am, params, st, "a")
    assert_close(net.apply({"params": merged}, x), y, max_abs=1e-5, rel=1e-5, what="custom MLP merged")
    # (8+24)*2 + (24+8)*2 per block, 2 blocks, + head (8+3)*2
    assert count_parameters(am, st, params)[0] == 2 * (64 + 64) + 22
    text = am.summary(st)
    assert "blocks.{i}.fc1  [8->24; layers 0,1]  lora_A (2, 8, 2), lora_B (2, 2, 24)" in text
    assert "head  [8->3; no layer axis]  lora_A (8, 2), lora_B (2, 3)" in text


def test_a_prefix_method_on_a_model_without_prefix_hooks_is_refused_with_the_fix(mlp):
    from jaxpeft.adapters import PrefixTuningConfig

    net, x, _ = mlp
    with pytest.raises(AdapterError, match="this model has no prefix hook: prefix methods"):
        AdaptedModel.wrap_any(net, x).add("p", PrefixTuningConfig(num_virtual_tokens=4))
