"""`build_model(cfg, task)`: the flax module for a ModelConfig and task (imports sibling model modules only)."""
from __future__ import annotations

import flax.linen as nn

from jaxpeft.errors import ModelConfigError
from jaxpeft.models.config import DECODER_ARCHS, ENCODER_ARCHS, ModelConfig

TASKS = ("causal_lm", "seq_cls", "token_cls", "base")


def build_model(cfg: ModelConfig, task: str = "causal_lm") -> nn.Module:
    """The linen module for `cfg` with a `task` head ('causal_lm', 'seq_cls', 'token_cls', 'base').

    Every module's `__call__(input_ids_bt, attention_mask_bt=None, *, positions_bt=None, ...)` returns a
    ModelOutput; decoders also take `cache=` and expose `hidden_states` and `head` methods.
    """
    if task not in TASKS:
        raise ModelConfigError(f"task={task!r} is not supported; choose one of {TASKS}")
    if cfg.arch in DECODER_ARCHS:
        from jaxpeft.models.decoder import DecoderModel
        return DecoderModel(cfg, task)
    if cfg.arch == "gpt2":
        from jaxpeft.models.gpt2 import GPT2Model
        return GPT2Model(cfg, task)
    if cfg.arch in ENCODER_ARCHS:
        if task == "causal_lm":
            raise ModelConfigError(f"{cfg.arch} is an encoder: use task 'seq_cls', 'token_cls' or 'base', not 'causal_lm'")
        from jaxpeft.models.encoder import EncoderModel
        return EncoderModel(cfg, task)
    raise ModelConfigError(f"unsupported arch {cfg.arch!r}")
