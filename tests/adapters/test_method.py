"""jaxpeft.adapters.method's matmul helpers: adapter products run in the compute dtype with float32
accumulation (a bf16 run never upcasts its activations to f32), and are exact for float32."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.adapters.method import low_rank, mm

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(2, 5, 16)), jnp.float32)
A = jnp.asarray(RNG.normal(size=(16, 4)) / 4, jnp.float32)
B = jnp.asarray(RNG.normal(size=(4, 8)) / 2, jnp.float32)
S = jnp.asarray(RNG.normal(size=(4,)), jnp.float32)


def test_float32_is_the_plain_product():
    np.testing.assert_allclose(low_rank(X, A, B, S), ((X @ A) * S) @ B, rtol=1e-6, atol=1e-6)
    assert mm(X, A).dtype == jnp.float32


def test_bf16_activations_stay_bf16_with_float32_accumulation():
    xb = X.astype(jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda x: low_rank(x, A, B))(xb)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 2
    for e in dots:
        assert all(v.aval.dtype == jnp.bfloat16 for v in e.invars)  # operands in the compute dtype
        assert e.outvars[0].aval.dtype == jnp.float32  # accumulated and returned in float32
    converts = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "convert_element_type"
                and e.invars[0].aval.shape == xb.shape]
    assert converts == []  # x itself is never upcast
    np.testing.assert_allclose(low_rank(xb, A, B), (X @ A) @ B, rtol=0.05, atol=0.05)
