"""GPT-2: learned positions, pre-LN blocks, fused `c_attn`, tied LM head; causal LM / classification heads.

Imports jax/flax and sibling model modules only. Module names mirror HF (`h/attn/c_attn` is
`transformer.h.{i}.attn.c_attn`); HF stores these Conv1D kernels (n_in, n_out), as flax does.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft.models.attention import PrefixHook, attach_prefix, attend, attention_mask, no_prefix_in_cache
from jaxpeft.models.cache import KVCache, layer_prefix_state, step_inputs, write_kv
from jaxpeft.models.config import ModelConfig
from jaxpeft.models.decoder import _dtypes, classifier_dropout_rate
from jaxpeft.models.heads import last_token_pool
from jaxpeft.models.layers import Dense, Embed, LayerNorm, activation
from jaxpeft.models.outputs import ModelOutput
from jaxpeft.models.stack import layer_stack


class GPT2Attention(nn.Module):
    """GPT-2 attention: fused c_attn -> q, k, v, KV-cache write and prefix-hook entries, causal attention, c_proj,
    dropout; (B, T, D) -> ((B, T, D), the layer's new cache entries or None)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd, ctx, layer_xs, deterministic):
        cfg, dt = self.cfg, _dtypes(self.cfg)
        b, t, d = x_btd.shape
        h, dh = cfg.num_heads, cfg.head_dim
        qkv = Dense(3 * d, True, ("embed", "qkv"), name="c_attn", **dt)(x_btd)
        q, k, v = (z.reshape(b, t, h, dh) for z in jnp.split(qkv, 3, axis=-1))
        new_kv, mask, kv_cache = None, ctx["mask"], layer_xs.get("kv")

        def hook():
            return PrefixHook(h, dh, name="prefix")(x_btd, ctx["mask_bt"], ctx["pool_mask_bt"])

        state = layer_prefix_state(layer_xs)
        if kv_cache is not None:
            k, v = write_kv(kv_cache[0], kv_cache[1], k, v, ctx["index"])
            if state is None:
                no_prefix_in_cache(hook())
        if kv_cache is None or state is not None:
            k, v, mask, valid = attach_prefix(hook, k, v, mask, state)
        if kv_cache is not None:
            new_kv = {"kv": (k, v)} if state is None else {"kv": (k, v), "prefix_valid": valid}
        rate = 0.0 if deterministic else cfg.attention_dropout
        o = attend(q, k, v, mask, cfg.attn_scale, dropout_rate=rate,
                   dropout_rng=self.make_rng("dropout") if rate else None)
        o = Dense(d, True, ("q_heads", "embed"), name="c_proj", **dt)(o.reshape(b, t, d))
        return nn.Dropout(cfg.hidden_dropout)(o, deterministic=deterministic), new_kv


class GPT2Block(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then + mlp(ln_2(x)); (B, T, D) -> ((B, T, D), new cache entries or {})."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd, ctx, layer_xs, deterministic: bool = True):
        cfg, dt = self.cfg, _dtypes(self.cfg)
        a, new_kv = GPT2Attention(cfg, name="attn")(LayerNorm(cfg.norm_eps, name="ln_1", **dt)(x_btd), ctx,
                                                    layer_xs, deterministic)
        x_btd = x_btd + a
        hmid = LayerNorm(cfg.norm_eps, name="ln_2", **dt)(x_btd)
        hmid = GPT2MLP(cfg, name="mlp")(hmid, deterministic)
        return x_btd + hmid, new_kv or {}


class GPT2MLP(nn.Module):
    """c_fc (D -> I), activation, c_proj (I -> D), dropout; (B, T, D) -> (B, T, D)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd, deterministic):
        cfg, dt = self.cfg, _dtypes(self.cfg)
        hmid = activation(cfg.hidden_act)(Dense(cfg.intermediate_size, True, ("embed", "mlp"), name="c_fc", **dt)(x_btd))
        out = Dense(cfg.hidden_size, True, ("mlp", "embed"), name="c_proj", **dt)(hmid)
        return nn.Dropout(cfg.hidden_dropout)(out, deterministic=deterministic)


class GPT2Model(nn.Module):
    """GPT-2 backbone plus a task head ('causal_lm' tied to `wte` or untied, 'seq_cls', 'token_cls', 'base')."""

    cfg: ModelConfig
    task: str = "causal_lm"

    def setup(self) -> None:
        """Creates `wte`, `wpe`, `drop`, the block stack `h`, the final `ln_f`, and the head: `lm_head` (causal_lm
        with untied embeddings), `score` (seq_cls) or `classifier` (token_cls)."""
        cfg, dt = self.cfg, _dtypes(self.cfg)
        self.wte = Embed(cfg.vocab_size, cfg.hidden_size, **dt)
        self.wpe = Embed(cfg.max_position_embeddings, cfg.hidden_size, ("positions", "embed"), **dt)
        self.ln_f = LayerNorm(cfg.norm_eps, **dt)
        self.drop = nn.Dropout(cfg.hidden_dropout)
        self.h = layer_stack(GPT2Block, cfg.num_layers, scan=cfg.scan_layers, remat=cfg.remat)(cfg)
        if self.task == "causal_lm" and not cfg.tie_word_embeddings:
            self.lm_head = Dense(cfg.vocab_size, False, ("embed", "vocab"), **dt)
        if self.task == "seq_cls":
            self.score = Dense(cfg.num_labels, False, ("embed", "labels"), **dt)
        if self.task == "token_cls":  # HF GPT2ForTokenClassification: `classifier` with bias, after dropout
            self.classifier_drop = nn.Dropout(classifier_dropout_rate(cfg))
            self.classifier = Dense(cfg.num_labels, True, ("embed", "labels"), **dt)

    def __call__(self, input_ids_bt: jax.Array, attention_mask_bt: jax.Array | None = None, *,
                 positions_bt: jax.Array | None = None, cache: KVCache | None = None,
                 position_offset_b: jax.Array | None = None, prompt_mask_bt: jax.Array | None = None,
                 deterministic: bool = True) -> ModelOutput:
        """Same contract as DecoderModel.__call__: (B, T) ids -> ModelOutput."""
        hidden, new_cache = self.hidden_states(input_ids_bt, attention_mask_bt, positions_bt=positions_bt,
                                               cache=cache, position_offset_b=position_offset_b,
                                               prompt_mask_bt=prompt_mask_bt, deterministic=deterministic)
        mask = jnp.ones(input_ids_bt.shape, bool) if attention_mask_bt is None else attention_mask_bt
        return ModelOutput(logits=self.head(hidden, mask, deterministic=deterministic), hidden=hidden,
                           cache=new_cache)

    def hidden_states(self, input_ids_bt, attention_mask_bt=None, *, positions_bt=None, cache=None,
                      position_offset_b=None, prompt_mask_bt=None, deterministic=True):
        """(B, T) ids -> ((B, T, D) hidden states after ln_f, updated cache or None)."""
        mask_bt = jnp.ones(input_ids_bt.shape, bool) if attention_mask_bt is None else attention_mask_bt.astype(bool)
        q_slots, key_valid, positions_bt, cache_fields = step_inputs(cache, mask_bt, positions_bt, position_offset_b)
        x = self.drop(self.wte(input_ids_bt) + self.wpe(positions_bt), deterministic=deterministic)
        pool = mask_bt if prompt_mask_bt is None else mask_bt & prompt_mask_bt.astype(bool)
        ctx = {"mask_bt": mask_bt, "pool_mask_bt": pool, "mask": attention_mask(q_slots, key_valid, causal=True)}
        layer_xs = {}
        if cache is not None:
            ctx["index"] = cache.index
            layer_xs.update(cache.layer_inputs())
        x, ys = self.h(x, ctx, layer_xs, deterministic)
        new_cache = None if cache is None else cache.updated(ys, cache_fields)
        return self.ln_f(x), new_cache

    def head(self, hidden_btd: jax.Array, attention_mask_bt: jax.Array | None = None, *,
             deterministic: bool = True) -> jax.Array | None:
        """Task head on final hidden states -> float32 logits (None for task='base'). token_cls applies HF's
        classifier dropout (`classifier_dropout_rate`) to the hidden states first when not deterministic."""
        if self.task == "causal_lm":
            if self.cfg.tie_word_embeddings:
                return self.wte.attend(hidden_btd).astype(jnp.float32)
            return self.lm_head(hidden_btd).astype(jnp.float32)
        if self.task == "seq_cls":
            return self.score(last_token_pool(hidden_btd, attention_mask_bt)).astype(jnp.float32)
        if self.task == "token_cls":
            return self.classifier(self.classifier_drop(hidden_btd, deterministic=deterministic)).astype(jnp.float32)
        return None

