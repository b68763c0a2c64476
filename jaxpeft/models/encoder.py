"""BERT and RoBERTa encoders (post-LN, exact erf GELU, learned positions) with pooler and task heads.

Imports jax/flax and sibling model modules only. Module names mirror HF (`encoder/layer/attention/self/query`
is `bert.encoder.layer.{i}.attention.self.query`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft.models.attention import PrefixHook, attach_prefix, attend, attention_mask
from jaxpeft.models.config import ModelConfig
from jaxpeft.models.decoder import _dtypes
from jaxpeft.models.layers import Dense, Embed, LayerNorm, activation
from jaxpeft.models.outputs import ModelOutput
from jaxpeft.models.stack import layer_stack


class SelfAttention(nn.Module):
    """HF `*SelfAttention`: query/key/value projections, the prefix hook's entries attached, bidirectional
    attention; (B, T, D) -> (B, T, D), before the output projection."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd, ctx, deterministic):
        cfg, dt = self.cfg, _dtypes(self.cfg)
        b, t, d = x_btd.shape
        h, dh = cfg.num_heads, cfg.head_dim
        q, k, v = (Dense(d, True, ("embed", "q_heads"), name=n, **dt)(x_btd).reshape(b, t, h, dh)
                   for n in ("query", "key", "value"))
        k, v, mask, _ = attach_prefix(
            lambda: PrefixHook(h, dh, name="prefix")(x_btd, ctx["mask_bt"], ctx["pool_mask_bt"]), k, v, ctx["mask"])
        rate = 0.0 if deterministic else cfg.attention_dropout
        o = attend(q, k, v, mask, cfg.attn_scale, dropout_rate=rate,
                   dropout_rng=self.make_rng("dropout") if rate else None)
        return o.reshape(b, t, d)


class AddNorm(nn.Module):
    """HF `*Output`: LayerNorm(x + dropout(dense(h)))."""

    cfg: ModelConfig
    axes: tuple[str, str]

    @nn.compact
    def __call__(self, h, x, deterministic):
        cfg, dt = self.cfg, _dtypes(self.cfg)
        y = nn.Dropout(cfg.hidden_dropout)(Dense(cfg.hidden_size, True, self.axes, name="dense", **dt)(h),
                                           deterministic=deterministic)
        return LayerNorm(cfg.norm_eps, name="LayerNorm", **dt)(y + x)


class Attention(nn.Module):
    """HF `*Attention`: SelfAttention ('self') then AddNorm ('output'); (B, T, D) -> (B, T, D)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd, ctx, deterministic):
        o = SelfAttention(self.cfg, name="self")(x_btd, ctx, deterministic)
        return AddNorm(self.cfg, ("q_heads", "embed"), name="output")(o, x_btd, deterministic)


class Intermediate(nn.Module):
    """HF `*Intermediate`: dense to intermediate_size, then the activation; (B, T, D) -> (B, T, I)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd):
        cfg, dt = self.cfg, _dtypes(self.cfg)
        return activation(cfg.hidden_act)(Dense(cfg.intermediate_size, True, ("embed", "mlp"), name="dense", **dt)(x_btd))


class EncoderBlock(nn.Module):
    """One post-LN layer: attention, intermediate, output AddNorm; (B, T, D) -> ((B, T, D), {}) (no per-layer
    outputs)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd, ctx, layer_xs, deterministic: bool = True):
        a = Attention(self.cfg, name="attention")(x_btd, ctx, deterministic)
        m = Intermediate(self.cfg, name="intermediate")(a)
        return AddNorm(self.cfg, ("mlp", "embed"), name="output")(m, a, deterministic), {}


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout: ids, positions, token types (B, T) -> (B, T, D)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, ids_bt, positions_bt, token_types_bt, deterministic):
        cfg, dt = self.cfg, _dtypes(self.cfg)
        x = (Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings", **dt)(ids_bt)
             + Embed(cfg.max_position_embeddings, cfg.hidden_size, ("positions", "embed"),
                     name="position_embeddings", **dt)(positions_bt)
             + Embed(cfg.type_vocab_size, cfg.hidden_size, ("types", "embed"),
                     name="token_type_embeddings", **dt)(token_types_bt))
        x = LayerNorm(cfg.norm_eps, name="LayerNorm", **dt)(x)
        return nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


class Encoder(nn.Module):
    """The stack of cfg.num_layers EncoderBlocks; (B, T, D) -> (B, T, D)."""

    cfg: ModelConfig

    def setup(self) -> None:
        """Creates `layer`: the EncoderBlock stack (scanned or unrolled by cfg.scan_layers, with cfg.remat)."""
        self.layer = layer_stack(EncoderBlock, self.cfg.num_layers, scan=self.cfg.scan_layers, remat=self.cfg.remat)(self.cfg)

    def __call__(self, x_btd, ctx, deterministic):
        return self.layer(x_btd, ctx, {}, deterministic)[0]


class Pooler(nn.Module):
    """BERT's pooler: tanh(dense(h[:, 0])) on the first token's hidden state; (B, T, D) -> (B, D)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_btd):
        dt = _dtypes(self.cfg)
        return jnp.tanh(Dense(self.cfg.hidden_size, True, ("embed", "embed_out"), name="dense", **dt)(h_btd[:, 0]))


class RobertaClassificationHead(nn.Module):
    """RoBERTa's sequence head on <s>: dropout, dense + tanh, dropout, out_proj; (B, T, D) -> (B, C) logits."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_btd, deterministic):
        cfg, dt = self.cfg, _dtypes(self.cfg)
        drop = nn.Dropout(_classifier_dropout(cfg))
        x = drop(h_btd[:, 0], deterministic=deterministic)
        x = jnp.tanh(Dense(cfg.hidden_size, True, ("embed", "embed_out"), name="dense", **dt)(x))
        x = drop(x, deterministic=deterministic)
        return Dense(cfg.num_labels, True, ("embed", "labels"), name="out_proj", **dt)(x)


def _classifier_dropout(cfg: ModelConfig) -> float:
    return cfg.hidden_dropout if cfg.classifier_dropout is None else cfg.classifier_dropout


class EncoderModel(nn.Module):
    """BERT / RoBERTa backbone plus a head: 'seq_cls' (BERT: pooler + classifier; RoBERTa: dense-tanh-out_proj
    on <s>), 'token_cls' (classifier on every token), 'base' (hidden states and pooler output)."""

    cfg: ModelConfig
    task: str = "seq_cls"

    def setup(self) -> None:
        """Creates `embeddings`, `encoder`, the `pooler` when `uses_pooler`, the task's `classifier`
        (RobertaClassificationHead or a Dense for seq_cls, a Dense for token_cls) and `head_dropout`."""
        cfg, dt = self.cfg, _dtypes(self.cfg)
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        if self.uses_pooler:
            self.pooler = Pooler(cfg)
        if self.task == "seq_cls":
            self.classifier = (RobertaClassificationHead(cfg) if cfg.arch == "roberta"
                               else Dense(cfg.num_labels, True, ("embed", "labels"), **dt))
        elif self.task == "token_cls":
            self.classifier = Dense(cfg.num_labels, True, ("embed", "labels"), **dt)
        self.head_dropout = nn.Dropout(_classifier_dropout(cfg))

    @property
    def uses_pooler(self) -> bool:
        """HF builds the pooler for bare models and BERT sequence classification only."""
        return self.cfg.add_pooler and (self.task == "base" or (self.task == "seq_cls" and self.cfg.arch == "bert"))

    def default_positions(self, input_ids_bt: jax.Array, position_offset_b: jax.Array | None = None) -> jax.Array:
        """(B, T) learned-position indices: 0..T-1 for BERT; padding_idx + 1 + count of non-pad ids for RoBERTa.

        position_offset_b (B,): a past length (prefix tuning's l) added as HF adds `past_key_values_length`
        (BERT: to every position; RoBERTa: to the non-pad ones)."""
        b, t = input_ids_bt.shape
        off = jnp.zeros((b, 1), jnp.int32) if position_offset_b is None else jnp.asarray(position_offset_b,
                                                                                          jnp.int32)[:, None]
        if self.cfg.arch == "roberta":
            nonpad = (input_ids_bt != self.cfg.pad_token_id).astype(jnp.int32)
            return (jnp.cumsum(nonpad, axis=1) + off) * nonpad + self.cfg.pad_token_id
        return jnp.broadcast_to(jnp.arange(t), (b, t)) + off

    def __call__(self, input_ids_bt: jax.Array, attention_mask_bt: jax.Array | None = None, *,
                 token_type_ids_bt: jax.Array | None = None, positions_bt: jax.Array | None = None,
                 position_offset_b: jax.Array | None = None, prompt_mask_bt: jax.Array | None = None,
                 deterministic: bool = True) -> ModelOutput:
        """(B, T) ids -> ModelOutput(logits (B, C) or (B, T, C), hidden (B, T, D), pooled (B, D) or None).

        position_offset_b (B,): shift of the default positions (prefix tuning's l); prompt_mask_bt (B, T): the
        tokens prefix hooks may pool over (default every non-pad token: an encoder sees the whole input)."""
        mask_bt = jnp.ones(input_ids_bt.shape, bool) if attention_mask_bt is None else attention_mask_bt.astype(bool)
        if positions_bt is None:
            positions_bt = self.default_positions(input_ids_bt, position_offset_b)
        if token_type_ids_bt is None:
            token_type_ids_bt = jnp.zeros_like(input_ids_bt)
        x = self.embeddings(input_ids_bt, positions_bt, token_type_ids_bt, deterministic)
        t = input_ids_bt.shape[1]
        pool = mask_bt if prompt_mask_bt is None else mask_bt & prompt_mask_bt.astype(bool)
        ctx = {"mask_bt": mask_bt, "pool_mask_bt": pool, "mask": attention_mask(jnp.arange(t), mask_bt, causal=False)}
        hidden = self.encoder(x, ctx, deterministic)
        pooled = self.pooler(hidden) if self.uses_pooler else None
        logits = None
        if self.task == "seq_cls":
            if self.cfg.arch == "roberta":
                logits = self.classifier(hidden, deterministic)
            else:
                logits = self.classifier(self.head_dropout(pooled, deterministic=deterministic))
        elif self.task == "token_cls":
            logits = self.classifier(self.head_dropout(hidden, deterministic=deterministic))
        return ModelOutput(logits=None if logits is None else logits.astype(jnp.float32), hidden=hidden, pooled=pooled)
