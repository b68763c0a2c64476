"""APT, adaptive prefix tuning (Zhang et al., ACL 2023): P-tuning v2 prefixes gated per token and per layer.

Imports jax and the P-tuning v2 method only. Layer i (reconstructed forward; no official code exists):
    alpha_i = sigmoid(pool(h_{i-1}) W_i + c_i)      W_i (D, l), optional bias c_i (l,), alpha_i (B, l)
    K_i = [lambda_i * alpha_i (.) P_K^i ; K_x],  V_i = [lambda_i * alpha_i (.) P_V^i ; V_x]
h_{i-1} is the tensor the layer's prefix hook receives: the normed layer input in pre-norm decoders and GPT-2,
the raw layer input (the previous layer's output) in post-norm BERT/RoBERTa. The pool runs over `pool_mask_bt`:
all non-pad tokens in encoders, the prompt only in decoders (one gate vector per row, computed at prefill and
kept in the KV cache for decoding), so a position never reads later tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxpeft.errors import AdapterError
from jaxpeft.adapters.method import register
from jaxpeft.adapters.ptuning_v2 import PTuningV2, PTuningV2Config
from jaxpeft.models.attention import Prefix

POOLS = ("mean_nonpad", "first", "last")


@dataclass(frozen=True)
class APTConfig(PTuningV2Config):
    """APT: every P-tuning v2 option plus the gates.

    pool: how h_{i-1} is pooled over the pool mask: 'mean_nonpad' (default), 'first' ([CLS] for BERT), 'last'.
    gate_init: 'zeros' (W = 0, alpha = 0.5 at step 0) or 'normal' (N(0, gate_init_std)).
    lambda_init: the layer scale at step 0. gate_bias: add the bias c_i. gate_on: 'kv' gates keys and values,
    'v' values only. token_gate / layer_gate: ablation switches (off = alpha 1 / lambda fixed at 1); with both off
    APT is P-tuning v2 exactly.
    """

    pool: str = "mean_nonpad"
    gate_init: str = "zeros"
    gate_init_std: float = 0.02
    lambda_init: float = 1.0
    gate_bias: bool = False
    gate_on: str = "kv"
    token_gate: bool = True
    layer_gate: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "method", "apt")
        if self.pool not in POOLS:
            raise AdapterError(f"pool={self.pool!r}: supported {POOLS}")
        if self.gate_init not in ("zeros", "normal"):
            raise AdapterError(f"gate_init={self.gate_init!r}: 'zeros' or 'normal'")
        if self.gate_on not in ("kv", "v"):
            raise AdapterError(f"gate_on={self.gate_on!r}: 'kv' or 'v'")
        if not self.gate_init_std > 0:
            raise AdapterError(f"gate_init_std={self.gate_init_std}: must be > 0")


def pool_hidden(x_btd: jax.Array, pool_mask_bt: jax.Array, how: str) -> jax.Array:
    """(B, T, D) -> (B, D) float32 over the tokens of pool_mask_bt: their mean, the first or the last one."""
    x = x_btd.astype(jnp.float32)
    m = pool_mask_bt.astype(bool)
    if how == "mean_nonpad":
        w = m.astype(jnp.float32)[..., None]
        return jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    t = jnp.arange(m.shape[1])[None, :]
    if how == "first":
        idx = jnp.min(jnp.where(m, t, m.shape[1] - 1), axis=1)
    else:
        idx = jnp.max(jnp.where(m, t, 0), axis=1)
    return jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]


class APT(PTuningV2):
    """APT: P-tuning v2 prefixes scaled per layer by lambda () and per row and slot by the gates alpha (B, l) =
    sigmoid(pool(h) W (+ c)), h (B, T, D) the tensor the layer's prefix hook receives."""

    name = "apt"
    config_cls = APTConfig
    has_peft_format = False

    def init_layer(self, cfg, site, x_btd, rng):
        kp, kg = jax.random.split(rng)
        trainable, extras = super().init_layer(cfg, site, x_btd, kp)
        l, d = self.num_slots(cfg), x_btd.shape[-1]
        if cfg.token_gate:
            trainable["gate_w"] = (jnp.zeros((d, l), jnp.float32) if cfg.gate_init == "zeros"
                                   else cfg.gate_init_std * jax.random.normal(kg, (d, l), jnp.float32))
            if cfg.gate_bias:
                trainable["gate_b"] = jnp.zeros((l,), jnp.float32)
        if cfg.layer_gate:
            trainable["lambda"] = jnp.asarray(cfg.lambda_init, jnp.float32)
        return trainable, extras

    def gates(self, cfg, x_btd, pool_mask_bt, trainable) -> tuple[jax.Array, jax.Array]:
        """(alpha (B, l) token gates, lambda () layer scale) of one layer."""
        l = self.num_slots(cfg)
        if cfg.token_gate:
            logits = pool_hidden(x_btd, pool_mask_bt, cfg.pool) @ trainable["gate_w"]
            if cfg.gate_bias:
                logits = logits + trainable["gate_b"]
            alpha = jax.nn.sigmoid(logits)
        else:
            alpha = jnp.ones((x_btd.shape[0], l), jnp.float32)
        lam = trainable["lambda"] if cfg.layer_gate else jnp.ones((), jnp.float32)
        return alpha, lam

    def prefix(self, cfg, site, x_btd, mask_bt, pool_mask_bt, trainable, extras, dropout, sow):
        b = x_btd.shape[0]
        pk, pv = self.layer_entries(cfg, trainable, extras, dropout, b)  # (B, l, H_kv, d_h)
        alpha, lam = self.gates(cfg, x_btd, pool_mask_bt, trainable)
        sow("token_gate", alpha)
        sow("lambda", lam)
        g = (lam * alpha)[:, :, None, None]  # (B, l, 1, 1)
        k = g * pk if cfg.gate_on == "kv" else pk
        v = g * pv
        return Prefix(k, v, jnp.broadcast_to(self.slot_mask(cfg, extras), (b, pk.shape[1])))

    def count(self, cfg, site, node):
        prefix = {k: v for k, v in node.items() if k in ("prefix_k", "prefix_v")}
        total = super().count(cfg, site, prefix) if prefix else 0
        layers = len(site.layers) if site.layered else 1
        if cfg.token_gate:
            total += self.real_slots(cfg, site) * (site.hidden + (1 if cfg.gate_bias else 0))
        if cfg.layer_gate:
            total += layers
        return total


register(APT())
