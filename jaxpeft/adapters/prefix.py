"""Prefix tuning (Li & Liang 2021): every attention layer attends to l learned key/value entries before its own.

Imports jax and the adapter method base only. Per layer i: P_K^i, P_V^i (l, H_kv, d_h), stacked on the layer axis
('prefix_k', 'prefix_v' at the hook's path). Optional reparameterisation at training time: P = MLP(E), E (l, d_e),
MLP = Dense(d_e -> m) + tanh + Dense(m -> 2 * L * H_kv * d_h), shared by all layers (adapter state 'shared');
`fold` materialises P and drops E and the MLP for export and inference (as PEFT saves only P).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.errors import AdapterError
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.method import PrefixMethod, merge_paths, register
from jaxpeft.models.attention import Prefix

INITS = ("normal", "zero")


MLP_KEYS = ("embedding", "mlp_in", "mlp_out")
"""The reparameterisation's shared variables (folded away on export)."""

@dataclass(frozen=True)
class PrefixTuningConfig(AdapterConfig):
    """Prefix tuning hyper-parameters (PEFT `PrefixTuningConfig` names where they exist).

    num_virtual_tokens: l, entries per layer.
    prefix_projection: train P through the MLP reparameterisation (folded into plain prefixes on export).
    token_dim: d_e, width of the MLP input embedding E (default H_kv * d_h, as PEFT).
    encoder_hidden_size: m, the MLP's hidden width (default token_dim, as PEFT).
    init_weights: 'normal' (N(0, init_std); PEFT's torch Embedding default is std 1) or 'zero'.
    prefix_dropout: dropout on the whole prefix key/value tensor on every training forward (P-tuning v2).
    position_offset: 'l' shifts the real tokens' positions by l, as Hugging Face does under past_key_values
        (needed for PEFT parity), or 0 to leave positions as without a prefix.
    layers_to_transform: layers that get a prefix (others none). target_modules does not apply.
    """

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    token_dim: int | None = None
    encoder_hidden_size: int | None = None
    init_weights: str = "normal"
    init_std: float = 1.0
    prefix_dropout: float = 0.0
    position_offset: int | str = "l"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "method", "prefix")
        check_prefix_config(self)


def check_prefix_config(cfg: Any) -> None:
    """Field checks shared by the prefix family (messages start with the field, for config errors)."""
    if cfg.num_virtual_tokens < 1:
        raise AdapterError(f"num_virtual_tokens={cfg.num_virtual_tokens}: must be >= 1")
    if cfg.init_weights not in INITS:
        raise AdapterError(f"init_weights={cfg.init_weights!r}: supported {INITS}")
    if not cfg.init_std > 0:
        raise AdapterError(f"init_std={cfg.init_std}: must be > 0")
    if not 0.0 <= cfg.prefix_dropout < 1.0:
        raise AdapterError(f"prefix_dropout={cfg.prefix_dropout}: must be in [0, 1)")
    if cfg.position_offset not in ("l", 0):
        raise AdapterError(f"position_offset={cfg.position_offset!r}: 'l' (shift positions by the prefix length, as "
                         "PEFT) or 0")
    for key in ("token_dim", "encoder_hidden_size"):
        v = getattr(cfg, key)
        if v is not None and v < 1:
            raise AdapterError(f"{key}={v}: must be >= 1")
    if cfg.modules_to_save and not isinstance(cfg.modules_to_save, tuple):
        raise AdapterError("modules_to_save: expected a list of module names")


def _kv_dim(sites: tuple[Any, ...]) -> int:
    dims = {s.num_kv_heads * s.head_dim for s in sites}
    if len(dims) != 1:
        raise AdapterError(f"prefix_projection needs every attention layer to have the same key width; got {sorted(dims)}")
    return dims.pop()


def _uniform(rng: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """PyTorch's nn.Linear default init (weight and bias): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


class PrefixTuning(PrefixMethod):
    """Prefix tuning; also the base of P-tuning v2 and APT (which override `layer_entries` / `prefix`)."""

    name = "prefix"
    config_cls = PrefixTuningConfig

    # ---- sizes --------------------------------------------------------------------------------------
    def num_slots(self, cfg):
        return cfg.num_virtual_tokens

    def position_offset(self, cfg):
        return self.num_slots(cfg) if cfg.position_offset == "l" else 0

    # ---- init ---------------------------------------------------------------------------------------
    def init_prefix(self, cfg, shape: tuple[int, ...], rng: jax.Array) -> jax.Array:
        """A float32 array of `shape`: zeros (init_weights 'zero') or N(0, init_std^2) ('normal')."""
        if cfg.init_weights == "zero":
            return jnp.zeros(shape, jnp.float32)
        return cfg.init_std * jax.random.normal(rng, shape, jnp.float32)

    def init_layer(self, cfg, site, x_btd, rng):
        if cfg.prefix_projection:
            return {}, {}
        shape = (self.num_slots(cfg), site.num_kv_heads, site.head_dim)
        kk, kv = jax.random.split(rng)
        return {"prefix_k": self.init_prefix(cfg, shape, kk), "prefix_v": self.init_prefix(cfg, shape, kv)}, {}

    def init_shared(self, cfg, sites, rng):
        if not cfg.prefix_projection:
            return {}, {}
        d_kv = _kv_dim(sites)
        d_e = cfg.token_dim or d_kv
        m = cfg.encoder_hidden_size or d_e
        out = 2 * sum(s.num_layers for s in sites) * d_kv
        ke, k1, k2, k3, k4 = jax.random.split(rng, 5)
        return {"embedding": self.init_prefix(cfg, (self.num_slots(cfg), d_e), ke),  # MLP_KEYS
                "mlp_in": {"kernel": _uniform(k1, (d_e, m), d_e), "bias": _uniform(k2, (m,), d_e)},
                "mlp_out": {"kernel": _uniform(k3, (m, out), m), "bias": _uniform(k4, (out,), m)}}, {}

    # ---- the reparameterisation -------------------------------------------------------------------------
    def expand(self, cfg, sites, shared, shared_extras):
        """P = MLP(E), split into every site's stacked (L, l, H_kv, d_h) keys and values (slot 2i keys of layer i,
        2i+1 values, PEFT's flat layout)."""
        if not cfg.prefix_projection:
            return {}
        h = jnp.tanh(shared["embedding"] @ shared["mlp_in"]["kernel"] + shared["mlp_in"]["bias"])
        flat = h @ shared["mlp_out"]["kernel"] + shared["mlp_out"]["bias"]  # (l, 2 * sum(L) * d_kv)
        out, start = {}, 0
        for s in sites:
            n = s.num_layers
            part = flat[:, start * 2 * s.num_kv_heads * s.head_dim:(start + n) * 2 * s.num_kv_heads * s.head_dim]
            kv = part.reshape(part.shape[0], n, 2, s.num_kv_heads, s.head_dim).transpose(1, 2, 0, 3, 4)
            k, v = (kv[:, 0], kv[:, 1]) if s.layered else (kv[0, 0], kv[0, 1])
            out[s.flax_module] = {"prefix_k": k, "prefix_v": v}
            start += n
        return out

    def fold(self, cfg, sites, trainable, extras):
        import dataclasses

        if not cfg.prefix_projection:
            return cfg, trainable, extras
        modules = merge_paths(trainable["modules"],
                              self.expand(cfg, sites, trainable["shared"], extras.get("shared", {})))
        # the MLP's own variables go; any other shared entry (a wrapper's, e.g. IMSM's gate) stays
        shared = {k: v for k, v in trainable["shared"].items() if k not in MLP_KEYS}
        return (dataclasses.replace(cfg, prefix_projection=False), dict(trainable, modules=modules, shared=shared),
                dict(extras, shared={}))

    # ---- forward ------------------------------------------------------------------------------------
    def layer_entries(self, cfg, trainable, extras, dropout, batch: int):
        """(P_K, P_V) (B, l, H_kv, d_h) of this layer, dropout drawn per example over the whole prefix."""
        shape = (batch,) + trainable["prefix_k"].shape
        return (dropout(jnp.broadcast_to(trainable["prefix_k"], shape)),
                dropout(jnp.broadcast_to(trainable["prefix_v"], shape)))

    def slot_mask(self, cfg, extras) -> jax.Array:
        """(l,) bool: the real entries of this layer (per-layer lengths pad shorter layers)."""
        if "slot_mask" in extras:
            return extras["slot_mask"] > 0
        return jnp.ones((self.num_slots(cfg),), bool)

    def prefix(self, cfg, site, x_btd, mask_bt, pool_mask_bt, trainable, extras, dropout, sow):
        b = x_btd.shape[0]
        pk, pv = self.layer_entries(cfg, trainable, extras, dropout, b)
        return Prefix(pk, pv, jnp.broadcast_to(self.slot_mask(cfg, extras), (b, pk.shape[1])))

    def count(self, cfg, site, node):
        """Real prefix entries (per-layer lengths skip padded slots) plus any other per-layer leaves."""
        entries = sum(self.real_slots(cfg, site) * site.num_kv_heads * site.head_dim
                      for key in ("prefix_k", "prefix_v") if key in node)
        rest = {k: v for k, v in node.items() if k not in ("prefix_k", "prefix_v")}
        return entries + (super().count(cfg, site, rest) if rest else 0)

    def real_slots(self, cfg, site) -> int:
        """Entries summed over the selected layers (per-layer lengths count only real slots)."""
        return self.num_slots(cfg) * (len(site.layers) if site.layered else 1)


register(PrefixTuning())
