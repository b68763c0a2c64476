"""IMSM (interweaving memories of a siamese model): the frozen base and the adapted model each produce final hidden
states; a query-aware low-rank gate mixes them per position and dimension before the frozen head. It wraps any
other method (the inner adapter), which it carries in its config.

Imports jax and sibling adapter modules only. The gate (docs/methods/imsm.md), in float32:
  g_t = sigmoid(drop(drop([mean_q(h_M); h_M_t; h_M'_t; mean_q(h_M')] W_A) W_B)),  W_A (4d, r_g), W_B (r_g, d),
  h_t = g_t * h_M_t + (1 - g_t) * h_M'_t,
with M the base stream (W0, no adapter, no dropout, no gradient) and M' the inner adapter's stream; mean_q is the
mean over the prompt's tokens (prompt AND non-pad). Ablations: use_query=False drops the two query terms
(W_A (2d, r_g)); use_gate=False mixes with a fixed 0.5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxpeft.errors import AdapterError
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.method import METHODS, Method, register

GATE_KEY = "imsm_gate"
"""Where the gate's parameters live in the adapter state: trainable[name]['shared'][GATE_KEY] = {'w_a', 'w_b'}."""


@dataclass(frozen=True)
class IMSMConfig(AdapterConfig):
    """inner: the wrapped method's config (any registered method but IMSM; in YAML a nested mapping with its own
    `method`); targeting and modules_to_save belong to it, not to IMSM.

    gate_rank: r_g. gate_dropout: p of both dropouts. use_query / use_gate: the ablation switches; without a gate
    the mix uses the constant fixed_gate (0.5: the paper's "w/o gate"; 1.0 gives the base model, 0.0 the inner
    adapter's).
    gate_lr: the gate's peak learning rate (the official code leaves the gate at torch's default 1e-3 while the
    adapter uses the configured lr); None: the run's optim.lr. The schedule's shape is shared.
    """

    inner: Any = None
    gate_rank: int = 8
    gate_dropout: float = 0.1
    use_query: bool = True
    use_gate: bool = True
    fixed_gate: float = 0.5
    gate_lr: float | None = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "method", "imsm")
        inner = self.inner
        if isinstance(inner, dict):
            inner = _inner_config(inner)
            object.__setattr__(self, "inner", inner)
        if not isinstance(inner, AdapterConfig):
            raise AdapterError("inner: the wrapped method's config is needed (e.g. inner: {method: lora, r: 8})")
        if inner.method in ("imsm", "full"):
            raise AdapterError(f"inner: IMSM cannot wrap {inner.method!r}; wrap a PEFT method (lora, kasa, apt, ...)")
        for f in fields(AdapterConfig):
            if f.init and getattr(self, f.name) != f.default:
                raise AdapterError(f"{f.name}: set it on the inner method (inner: {{{f.name}: ...}}), not on IMSM")
        if self.gate_rank < 1:
            raise AdapterError(f"gate_rank={self.gate_rank}: must be >= 1")
        if not 0.0 <= self.gate_dropout < 1.0:
            raise AdapterError(f"gate_dropout={self.gate_dropout}: must be in [0, 1)")
        if not 0.0 <= self.fixed_gate <= 1.0:
            raise AdapterError(f"fixed_gate={self.fixed_gate}: must be in [0, 1]")
        if self.gate_lr is not None and self.gate_lr <= 0:
            raise AdapterError(f"gate_lr={self.gate_lr}: must be > 0 (or null: the run's optim.lr)")


def _inner_config(raw: dict[str, Any]) -> AdapterConfig:
    """The inner method's config from a mapping with its own 'method' (AdapterError naming `inner.<key>`)."""
    import difflib

    raw = dict(raw)
    name = raw.pop("method", None)
    if not isinstance(name, str) or name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1) if isinstance(name, str) else []
        raise AdapterError(f"inner.method={name!r}: a mapping with 'method' (one of {sorted(METHODS)}) is needed"
                           + (f" (did you mean {close[0]!r}?)" if close else ""))
    if name in ("imsm", "full"):
        raise AdapterError(f"inner: IMSM cannot wrap {name!r}; wrap a PEFT method (lora, kasa, apt, ...)")
    cls = METHODS[name].config_cls
    known = [f.name for f in fields(cls) if f.init]
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            raise AdapterError(f"inner.{key}: not a {name} option" + (f" (did you mean {close[0]!r}?)" if close else "")
                               + f"; options: {sorted(known)}")
    try:
        return cls(**raw)
    except AdapterError as e:  # the method's messages start with the field: 'r=0: ...'
        raise AdapterError(f"inner.{e}") from None


def init_gate(cfg: IMSMConfig, d: int, rng: jax.Array) -> dict[str, jax.Array]:
    """{'w_a' (4d or 2d, r_g), 'w_b' (r_g, d)} float32, PyTorch Linear's default U(+-1/sqrt(fan_in)) (g ~ 0.5);
    {} without a gate."""
    if not cfg.use_gate:
        return {}
    n_in = (4 if cfg.use_query else 2) * d
    ka, kb = jax.random.split(rng)
    ba, bb = 1.0 / math.sqrt(n_in), 1.0 / math.sqrt(cfg.gate_rank)
    return {"w_a": jax.random.uniform(ka, (n_in, cfg.gate_rank), jnp.float32, -ba, ba),
            "w_b": jax.random.uniform(kb, (cfg.gate_rank, d), jnp.float32, -bb, bb)}


def query_mean(h_btd: jax.Array, query_mask_bt: jax.Array) -> jax.Array:
    """(B, D) float32 mean of h over the query positions (prompt AND non-pad); 0 for a row without any."""
    m = query_mask_bt.astype(jnp.float32)[..., None]
    return jnp.sum(h_btd.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def gate_values(cfg: IMSMConfig, gate: dict[str, jax.Array], h_base_btd: jax.Array, h_tuned_btd: jax.Array,
                q_base_bd: jax.Array | None, q_tuned_bd: jax.Array | None, dropout) -> jax.Array:
    """g (B, T, D) float32 in (0, 1); fixed_gate everywhere without a gate. q_*: the query means (B, D) (unused without
    query terms). dropout(z) applies the gate dropout (identity when deterministic)."""
    hb, ht = h_base_btd.astype(jnp.float32), h_tuned_btd.astype(jnp.float32)
    if not cfg.use_gate:
        return jnp.full(hb.shape, cfg.fixed_gate, jnp.float32)
    parts = [hb, ht]
    if cfg.use_query:  # the order of METHODS section 14: [mean_q(h_M); h_M_t; h_M'_t; mean_q(h_M')]
        parts = [jnp.broadcast_to(q_base_bd[:, None], hb.shape), hb, ht, jnp.broadcast_to(q_tuned_bd[:, None], ht.shape)]
    z = jnp.concatenate(parts, axis=-1)
    return jax.nn.sigmoid(dropout(dropout(z @ gate["w_a"]) @ gate["w_b"]))


def mix(gate_btd: jax.Array, h_base_btd: jax.Array, h_tuned_btd: jax.Array) -> jax.Array:
    """h = g h_M + (1 - g) h_M', in float32."""
    return gate_btd * h_base_btd.astype(jnp.float32) + (1.0 - gate_btd) * h_tuned_btd.astype(jnp.float32)


class Imsm(Method):
    """A wrapper: `AdaptedModel.add` registers the inner method's interceptions under the IMSM adapter's name and
    keeps this config as the spec's `wrapper`; `AdaptedModel.apply` runs the two streams and the gate."""

    name = "imsm"
    config_cls = IMSMConfig
    kind = "wrapper"
    has_peft_format = False

    def gate_count(self, cfg: IMSMConfig, d: int) -> int:
        """5 d r_g (3 d r_g without query terms, 0 without a gate)."""
        return 0 if not cfg.use_gate else ((4 if cfg.use_query else 2) * d + d) * cfg.gate_rank


register(Imsm())


class IMSMCache(NamedTuple):
    """The decode state of an IMSM model: each stream's KV cache and the two query means, computed at prefill from
    the prompt and reused for every generated token (q_valid (B,) marks rows whose means are set)."""

    base: Any
    tuned: Any
    q_base_bd: jax.Array
    q_tuned_bd: jax.Array
    q_valid_b: jax.Array


def gate_dropout(cfg: IMSMConfig, deterministic: bool, rng: jax.Array | None):
    """The gate's dropout as a function z -> z (fresh mask per call), identity when deterministic."""
    if deterministic or not cfg.gate_dropout:
        return lambda z: z
    if rng is None:
        raise AdapterError("IMSM gate dropout needs rngs={'dropout': key} when deterministic=False")
    calls = [0]

    def drop(z):
        calls[0] += 1
        keep = jax.random.bernoulli(jax.random.fold_in(rng, calls[0]), 1.0 - cfg.gate_dropout, z.shape)
        return jnp.where(keep, z / (1.0 - cfg.gate_dropout), 0.0)

    return drop
