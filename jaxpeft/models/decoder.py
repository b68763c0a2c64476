"""Decoder-only family (llama / SmolLM2, qwen2, gemma3 text) with causal-LM, classification and bare heads.

Imports jax/flax and sibling model modules only. Module names mirror Hugging Face module paths, so a
flax path like `layers/self_attn/q_proj` is `model.layers.{i}.self_attn.q_proj` in HF.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft.models.attention import (PrefixHook, apply_rope, attach_prefix, attend, attention_mask, no_prefix_in_cache,
                                      rope_tables)
from jaxpeft.models.cache import KVCache, layer_prefix_state, step_inputs, write_kv
from jaxpeft.models.config import ModelConfig
from jaxpeft.models.heads import last_token_pool
from jaxpeft.models.layers import Dense, Embed, RMSNorm, activation, jnp_dtype
from jaxpeft.models.outputs import ModelOutput
from jaxpeft.models.stack import layer_stack


def _dtypes(cfg: ModelConfig) -> dict[str, Any]:
    return dict(dtype=jnp_dtype(cfg.dtype), param_dtype=jnp_dtype(cfg.param_dtype))


class DecoderAttention(nn.Module):
    """Self-attention with GQA, optional q/k/v bias, QK-norm, RoPE, KV cache and prefix entries."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd, ctx, layer_xs, deterministic):
        cfg, dt = self.cfg, _dtypes(self.cfg)
        b, t, _ = x_btd.shape
        h, hkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = Dense(h * dh, cfg.qkv_bias, ("embed", "q_heads"), name="q_proj", **dt)(x_btd).reshape(b, t, h, dh)
        k = Dense(hkv * dh, cfg.qkv_bias, ("embed", "kv_heads"), name="k_proj", **dt)(x_btd).reshape(b, t, hkv, dh)
        v = Dense(hkv * dh, cfg.qkv_bias, ("embed", "kv_heads"), name="v_proj", **dt)(x_btd).reshape(b, t, hkv, dh)
        if cfg.qk_norm:
            q = RMSNorm(cfg.norm_eps, cfg.norm_offset, "head_dim", name="q_norm", **dt)(q)
            k = RMSNorm(cfg.norm_eps, cfg.norm_offset, "head_dim", name="k_norm", **dt)(k)
        cos, sin = ctx["rope"]
        mask = ctx["mask"]
        is_sliding, kv_cache = layer_xs["is_sliding"], layer_xs.get("kv")
        if "rope_local" in ctx:  # gemma3: per-layer choice between sliding and full attention
            cos = jnp.where(is_sliding, ctx["rope_local"][0], cos)
            sin = jnp.where(is_sliding, ctx["rope_local"][1], sin)
            mask = jnp.where(is_sliding, ctx["mask_local"], mask)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = None

        def hook():
            return PrefixHook(hkv, dh, name="prefix")(x_btd, ctx["mask_bt"], ctx["pool_mask_bt"])

        state = layer_prefix_state(layer_xs)
        if kv_cache is not None:
            k, v = write_kv(kv_cache[0], kv_cache[1], k, v, ctx["index"])
            if state is None:
                no_prefix_in_cache(hook())
        if kv_cache is None or state is not None:
            k, v, mask, valid = attach_prefix(hook, k, v, mask, state, sliding=is_sliding if any(cfg.sliding_layers)
                                              else None, window=cfg.sliding_window,
                                              token_index_bt=ctx.get("token_index_bt"))
        if kv_cache is not None:
            new_kv = {"kv": (k, v)} if state is None else {"kv": (k, v), "prefix_valid": valid}
        rate = 0.0 if deterministic else cfg.attention_dropout
        rng = self.make_rng("dropout") if rate else None
        o = attend(q, k, v, mask, cfg.attn_scale, dropout_rate=rate, dropout_rng=rng)
        out = Dense(cfg.hidden_size, cfg.o_bias, ("q_heads", "embed"), name="o_proj", **dt)(o.reshape(b, t, h * dh))
        return out, new_kv


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (silu) or GeGLU (gelu_tanh)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd):
        cfg, dt = self.cfg, _dtypes(self.cfg)
        gate = Dense(cfg.intermediate_size, cfg.mlp_bias, ("embed", "mlp"), name="gate_proj", **dt)(x_btd)
        up = Dense(cfg.intermediate_size, cfg.mlp_bias, ("embed", "mlp"), name="up_proj", **dt)(x_btd)
        return Dense(cfg.hidden_size, cfg.mlp_bias, ("mlp", "embed"), name="down_proj", **dt)(
            activation(cfg.hidden_act)(gate) * up)


class DecoderBlock(nn.Module):
    """Pre-norm block; gemma3 adds post-attention and post-feedforward norms (sandwich)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd, ctx, layer_xs, deterministic: bool = True):
        cfg, dt = self.cfg, _dtypes(self.cfg)

        def norm(name):
            return RMSNorm(cfg.norm_eps, cfg.norm_offset, name=name, **dt)

        a, new_kv = DecoderAttention(cfg, name="self_attn")(norm("input_layernorm")(x_btd), ctx, layer_xs, deterministic)
        if cfg.sandwich_norm:
            a = norm("post_attention_layernorm")(a)
        x_btd = x_btd + a
        m = GatedMLP(cfg, name="mlp")(norm("pre_feedforward_layernorm" if cfg.sandwich_norm
                                           else "post_attention_layernorm")(x_btd))
        if cfg.sandwich_norm:
            m = norm("post_feedforward_layernorm")(m)
        return x_btd + m, new_kv or {}


class DecoderModel(nn.Module):
    """A decoder backbone plus one task head.

    task: 'causal_lm' (tied or untied `lm_head`), 'seq_cls' (`score` on the last non-pad token by the
    attention mask), 'token_cls' (`score` on every token), 'base' (hidden states only).
    """

    cfg: ModelConfig
    task: str = "causal_lm"

    def setup(self) -> None:
        """Creates `embed_tokens`, the block stack `layers` (scanned or unrolled, with cfg.remat), the final `norm`,
        and the head: `lm_head` (causal_lm with untied embeddings) or `score` (seq_cls, token_cls)."""
        cfg, dt = self.cfg, _dtypes(self.cfg)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, **dt)
        self.norm = RMSNorm(cfg.norm_eps, cfg.norm_offset, **dt)
        if self.task == "causal_lm" and not cfg.tie_word_embeddings:
            self.lm_head = Dense(cfg.vocab_size, False, ("embed", "vocab"), **dt)
        if self.task in ("seq_cls", "token_cls"):  # HF: seq_cls score has no bias, token_cls score has one
            self.score = Dense(cfg.num_labels, self.task == "token_cls", ("embed", "labels"), **dt)
        if self.task == "token_cls":  # HF GenericForTokenClassification: dropout before `score`
            self.score_drop = nn.Dropout(classifier_dropout_rate(cfg))
        self.layers = layer_stack(DecoderBlock, cfg.num_layers, scan=cfg.scan_layers, remat=cfg.remat)(cfg)

    def __call__(self, input_ids_bt: jax.Array, attention_mask_bt: jax.Array | None = None, *,
                 positions_bt: jax.Array | None = None, cache: KVCache | None = None,
                 position_offset_b: jax.Array | None = None, prompt_mask_bt: jax.Array | None = None,
                 deterministic: bool = True) -> ModelOutput:
        """input_ids_bt (B, T) int; attention_mask_bt (B, T), 1 for real tokens (default all ones);
        positions_bt (B, T) overrides the default (count of non-pad tokens before each token);
        cache: a KVCache to read and extend (decoding);
        position_offset_b (B,) int: added to the default positions without a cache (prefix tuning's l);
        prompt_mask_bt (B, T): the prompt tokens prefix hooks may pool over (default: every non-pad token,
        right for prompts alone; give it when responses follow, or a gate would read the future).
        Returns ModelOutput (see its docstring)."""
        hidden, new_cache = self.hidden_states(input_ids_bt, attention_mask_bt, positions_bt=positions_bt,
                                               cache=cache, position_offset_b=position_offset_b,
                                               prompt_mask_bt=prompt_mask_bt, deterministic=deterministic)
        mask = jnp.ones(input_ids_bt.shape, bool) if attention_mask_bt is None else attention_mask_bt
        return ModelOutput(logits=self.head(hidden, mask, deterministic=deterministic), hidden=hidden,
                           cache=new_cache)

    def hidden_states(self, input_ids_bt, attention_mask_bt=None, *, positions_bt=None, cache=None,
                      position_offset_b=None, prompt_mask_bt=None, deterministic=True):
        """(B, T) ids -> ((B, T, D) final hidden states after the final norm, updated cache or None)."""
        cfg = self.cfg
        mask_bt = jnp.ones(input_ids_bt.shape, bool) if attention_mask_bt is None else attention_mask_bt.astype(bool)
        q_slots, key_valid, positions_bt, cache_fields = step_inputs(cache, mask_bt, positions_bt, position_offset_b)
        x = self.embed_tokens(input_ids_bt)
        if cfg.embed_scale:
            x = x * jnp.asarray(cfg.hidden_size ** 0.5, x.dtype)
        pool = mask_bt if prompt_mask_bt is None else mask_bt & prompt_mask_bt.astype(bool)
        ctx = {"mask_bt": mask_bt, "pool_mask_bt": pool, "mask": attention_mask(q_slots, key_valid, causal=True),
               "rope": rope_tables(positions_bt, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)}
        if any(cfg.sliding_layers):
            ctx["mask_local"] = attention_mask(q_slots, key_valid, causal=True, window=cfg.sliding_window)
            # each token's index among its row's real tokens (cached ones included): prefix windows ignore pads
            seen = 0 if cache is None else jnp.sum(cache.key_valid, axis=1) - cache.prefix_slots
            ctx["token_index_bt"] = jnp.cumsum(mask_bt.astype(jnp.int32), axis=1) - 1 + jnp.reshape(seen, (-1, 1))
            ctx["rope_local"] = rope_tables(positions_bt, cfg.head_dim, cfg.rope_local_theta or cfg.rope_theta)
        layer_xs = {"is_sliding": jnp.asarray(cfg.sliding_layers)}
        if cache is not None:
            ctx["index"] = cache.index
            layer_xs.update(cache.layer_inputs())
        x, ys = self.layers(x, ctx, layer_xs, deterministic)
        new_cache = None if cache is None else cache.updated(ys, cache_fields)
        return self.norm(x), new_cache

    def head(self, hidden_btd: jax.Array, attention_mask_bt: jax.Array | None = None, *,
             deterministic: bool = True) -> jax.Array | None:
        """Task head on final hidden states: (B, T, D) -> float32 logits (None for task='base'). token_cls applies
        HF's classifier dropout (`classifier_dropout_rate`) to the hidden states first when not deterministic."""
        if self.task == "causal_lm":
            if self.cfg.tie_word_embeddings:
                return self.embed_tokens.attend(hidden_btd).astype(jnp.float32)
            return self.lm_head(hidden_btd).astype(jnp.float32)
        if self.task == "seq_cls":
            return self.score(last_token_pool(hidden_btd, attention_mask_bt)).astype(jnp.float32)
        if self.task == "token_cls":
            return self.score(self.score_drop(hidden_btd, deterministic=deterministic)).astype(jnp.float32)
        return None


def classifier_dropout_rate(cfg: ModelConfig) -> float:
    """The token_cls head's dropout rate, as HF's GPT2ForTokenClassification and GenericForTokenClassification
    (llama, qwen2, gemma3): cfg.classifier_dropout (from_hf fills it from HF's `classifier_dropout`, else
    `hidden_dropout`), else HF's default 0.1 (never resid_pdrop)."""
    return 0.1 if cfg.classifier_dropout is None else cfg.classifier_dropout
