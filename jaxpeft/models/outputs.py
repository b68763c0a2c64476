"""The output record every backbone returns (imports flax only)."""
from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class ModelOutput:
    """What a forward pass returns.

    logits: (B, T, V) for causal LM, (B, C) sequence classification, (B, T, C) token classification,
        None for a bare backbone (task='base'). Always float32.
    hidden: (B, T, D) final hidden states after the final norm, before any head (IMSM reads these).
    pooled: (B, D) pooler output (BERT 'base' with pooler) or None.
    cache: the updated KVCache when one was passed in, else None.
    """

    logits: jax.Array | None = None
    hidden: jax.Array | None = None
    pooled: jax.Array | None = None
    cache: Any = None
