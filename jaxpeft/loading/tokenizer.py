"""`TextTokenizer`: a `tokenizers.Tokenizer` plus the special ids and chat template a checkpoint carries.

Imports tokenizers/jinja2 only. Built from a HF folder (tokenizer.json + tokenizer_config.json) or from
GGUF metadata (jaxpeft.loading.gguf_tokenizer).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers

from jaxpeft.loading.errors import CheckpointError


@dataclass
class TextTokenizer:
    """Encode/decode text and render chat prompts.

    eos_token_ids: every id that ends generation. pad_token_id falls back to the first eos id.
    """

    tokenizer: tokenizers.Tokenizer
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    chat_template: str | None = None
    special_tokens: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pad_token_id is None and self.eos_token_ids:
            self.pad_token_id = self.eos_token_ids[0]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> token ids (BOS/CLS/SEP added by the tokenizer's post-processor when asked)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Token ids -> text; special tokens are left out unless skip_special_tokens is False."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render messages with the checkpoint's own jinja2 chat template (as transformers does)."""
        if not self.chat_template:
            raise ValueError("this checkpoint has no chat template; use a plain prompt format instead")
        import jinja2
        import jinja2.sandbox

        def raise_exception(msg: str) -> None:
            raise jinja2.exceptions.TemplateError(msg)

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        tokens = {k: v for k, v in self.special_tokens.items() if isinstance(v, str)}
        return env.from_string(self.chat_template).render(messages=messages,
                                                          add_generation_prompt=add_generation_prompt, **tokens)


def tokenizer_from_folder(path: str | os.PathLike, hf_config: dict[str, Any] | None = None) -> TextTokenizer | None:
    """TextTokenizer from tokenizer.json (+ tokenizer_config.json); None when the folder has no tokenizer.json."""
    path = Path(path)
    tok_file = path / "tokenizer.json"
    if not tok_file.exists():
        return None
    try:
        tok = tokenizers.Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"{tok_file}: cannot parse tokenizer ({e})") from e
    tok.no_padding()  # batching and padding are the data pipeline's job, not the tokenizer file's
    tok.no_truncation()
    tcfg: dict[str, Any] = {}
    if (path / "tokenizer_config.json").exists():
        tcfg = json.loads((path / "tokenizer_config.json").read_text())
    hf_config = hf_config or {}

    def token_id(name: str) -> int | None:
        value = tcfg.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        return tok.token_to_id(value) if isinstance(value, str) else None

    eos = hf_config.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    if not eos_ids and token_id("eos_token") is not None:
        eos_ids = (token_id("eos_token"),)
    template = tcfg.get("chat_template")
    if template is None and (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    specials = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in tcfg.items()
                if k.endswith("_token") and isinstance(v, (str, dict))}
    pad = hf_config.get("pad_token_id")
    return TextTokenizer(tok, bos_token_id=hf_config.get("bos_token_id", token_id("bos_token")),
                         eos_token_ids=eos_ids, pad_token_id=pad if pad is not None else token_id("pad_token"),
                         chat_template=template, special_tokens=specials)
