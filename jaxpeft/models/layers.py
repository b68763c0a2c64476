"""Leaf layers shared by all backbones: Dense (the adapter interception point), norms, embeddings, activations.

Imports jax/flax only. Every parameter carries logical axis names for sharding.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
_INIT = nn.initializers.normal(stddev=0.02)


class Dense(nn.Module):
    """y = x @ kernel (+ bias); kernel (n_in, n_out) stored in `param_dtype`, computed in `dtype`.

    This is the one dense projection of every backbone: LoRA-family and SVD-family adapters intercept its
    `__call__` (flax `nn.intercept_methods`) and read `kernel`/`bias` from its variables.
    """

    features: int
    use_bias: bool = False
    axes: tuple[str, str] = ("embed", "mlp")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bnd: jax.Array) -> jax.Array:
        """(..., n_in) -> (..., n_out)."""
        kernel = self.param("kernel", nn.with_logical_partitioning(_INIT, self.axes),
                            (x_bnd.shape[-1], self.features), self.param_dtype)
        y = jnp.dot(x_bnd.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class Embed(nn.Module):
    """Token / position embedding table `embedding` (V, D); `attend` is the tied LM head."""

    num_embeddings: int
    features: int
    axes: tuple[str, str] = ("vocab", "embed")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        """Creates the `embedding` param (num_embeddings, features) in param_dtype, initialised N(0, 0.02^2)."""
        self.embedding = self.param("embedding", nn.with_logical_partitioning(_INIT, self.axes),
                                    (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, ids_bt: jax.Array) -> jax.Array:
        """(B, T) int -> (B, T, D)."""
        return jnp.take(self.embedding, ids_bt, axis=0).astype(self.dtype)

    def attend(self, h_btd: jax.Array) -> jax.Array:
        """(B, T, D) -> (B, T, V) logits against the table (tied head)."""
        return jnp.dot(h_btd.astype(self.dtype), self.embedding.astype(self.dtype).T)


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + scale), computed in float32 (offset 1 for gemma's (1 + w))."""

    eps: float = 1e-6
    offset: float = 0.0
    axis_name: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", nn.with_logical_partitioning(init, (self.axis_name,)), (x.shape[-1],),
                           self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * (self.offset + scale.astype(jnp.float32))).astype(self.dtype)


class LayerNorm(nn.Module):
    """Standard LayerNorm with `scale` and `bias`, computed in float32."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (d,),
                           self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (d,),
                          self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def activation(name: str):
    """The activation function for a ModelConfig.hidden_act name ('gelu' is exact erf GELU)."""
    return {
        "silu": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
    }[name]


def jnp_dtype(name: str) -> Dtype:
    """'float32' | 'bfloat16' | 'float16' -> jnp dtype."""
    return jnp.dtype(name)
