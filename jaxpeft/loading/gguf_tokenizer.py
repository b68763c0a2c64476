"""Build a `tokenizers.Tokenizer` (+ special tokens, chat template) from GGUF metadata, ids equal to transformers'.

Imports only tokenizers and jaxpeft.loading (errors, the gguf header reader); never torch or transformers.
"""

from __future__ import annotations

import os
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from jaxpeft.loading.errors import CheckpointError

__all__ = ["gguf_tokenizer"]

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")

# Pre-tokenizer split regexes by `tokenizer.ggml.pre`, as transformers maps them. Types not listed
# (e.g. 'gpt2', 'smollm', 'default') keep the GPT-2 byte-level regex. llama.cpp's 'smollm' also splits
# digits one by one; SmolLM2's vocabulary has no multi-digit or space+digit token, so ids are the same.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}  # fmt: skip


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table used by byte-level BPE vocabularies."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _generate_merges(vocab: dict[str, int], vocab_scores: dict[str, float] | None = None) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary (same order as transformers' `generate_merges`).

    Every split of every token into two in-vocabulary pieces is a merge, ranked by the token's score
    (descending) when scores are given, else by token id (ascending); ties by longer left, then right piece.
    """
    reverse = vocab_scores is not None
    scores = dict(vocab_scores) if reverse else vocab
    merges: list[tuple[str, str, float]] = []
    for token, score in scores.items():
        local = [
            (token[:i], token[i:], score) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab
        ]
        if len(local) > 1:
            local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=reverse)
    return [(a, b) for a, b, _ in merges]


def _file_merges(md: dict) -> list[tuple[str, str]] | None:
    merges = md.get("tokenizer.ggml.merges")
    return None if merges is None else [tuple(m.split(" ")) for m in merges]


def _byte_level(md: dict) -> Tokenizer:
    """GPT-2 style byte-level BPE (`tokenizer.ggml.model` = 'gpt2': SmolLM2, Qwen2, Llama-3)."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    tokens = md["tokenizer.ggml.tokens"]
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    merges = _file_merges(md)
    if merges is None:
        scores = md.get("tokenizer.ggml.scores")
        merges = _generate_merges(vocab, None if scores is None else dict(zip(vocab, scores.tolist())))
    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
            fuse_unk=False)
    )  # fmt: skip
    split = _PRE_TOKENIZER_SPLITS.get(md.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    return tok


def _gemma(md: dict) -> Tokenizer:
    """Gemma SentencePiece vocabulary as a byte-fallback BPE (what transformers' GemmaTokenizer builds).

    Tokens made only of spaces are stored with real spaces and respelled with '▁'. The file has no merges;
    they are rebuilt from the vocabulary ranked by token order (Gemma's scores do not follow merge order).
    No prefix space is added.
    """
    tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in md["tokenizer.ggml.tokens"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _file_merges(md)
    if merges is None:
        merges = _generate_merges(vocab, {t: -i for i, t in enumerate(tokens)})
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>", dropout=None, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def _sentencepiece(md: dict) -> Tokenizer:
    """Llama-2 style SentencePiece vocabulary as a byte-fallback BPE with a '▁' prefix on the first word."""
    tokens = md["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _file_merges(md)
    if merges is None:
        scores = md.get("tokenizer.ggml.scores")
        if scores is None:
            raise CheckpointError("GGUF SentencePiece tokenizer has neither merges nor scores")
        merges = _generate_merges(vocab, dict(zip(tokens, scores.tolist())))
    prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _add_special_tokens(tok: Tokenizer, md: dict, named: list[str]) -> None:
    """Control tokens -> special AddedTokens (kept whole, skipped on decode); user-defined -> plain AddedTokens.

    In a byte-level vocabulary a 'control' token spelled outside the byte alphabet is a llama.cpp mislabel
    and is skipped (as transformers does). `named` (bos/eos/unk/pad strings) are added as special if missing.
    """
    tokens = md["tokenizer.ggml.tokens"]
    types = md.get("tokenizer.ggml.token_type")
    types = [] if types is None else types.tolist()
    alphabet = set(_bytes_to_unicode().values()) if md.get("tokenizer.ggml.model") == "gpt2" else None
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types)
        if ty == _CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    if control:
        tok.add_special_tokens(control)
    vocab = tok.get_vocab(with_added_tokens=True)
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, ty in zip(tokens, types)
        if ty == _USER_DEFINED and t in vocab
    ]
    if user:
        tok.add_tokens(user)
    added = {str(a.content) for a in tok.get_added_tokens_decoder().values()}
    missing = [AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(named) if t and t not in added]
    if missing:
        tok.add_special_tokens(missing)


def _tokenizer_from_metadata(md: dict, source: str = "GGUF") -> tuple[Tokenizer, dict]:
    """Tokenizer + info dict from parsed GGUF metadata (see `gguf_tokenizer`)."""
    kind = md.get("tokenizer.ggml.model")
    arch = md.get("general.architecture")
    if "tokenizer.ggml.tokens" not in md:
        raise CheckpointError(f"{source}: GGUF has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    if kind == "gpt2":
        tok = _byte_level(md)
    elif kind == "llama" and arch in _GEMMA_ARCHS:
        tok = _gemma(md)
    elif kind == "llama":
        tok = _sentencepiece(md)
    else:
        raise CheckpointError(
            f"{source}: GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2' (byte-level BPE), "
            "'llama' (SentencePiece)"
        )
    tokens = md["tokenizer.ggml.tokens"]
    info: dict[str, Any] = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):  # fmt: skip
        idx = md.get(f"tokenizer.ggml.{key}")
        ok = idx is not None and 0 <= int(idx) < len(tokens)
        info[f"{name}_token_id"] = int(idx) if ok else None
        info[f"{name}_token"] = tokens[int(idx)] if ok else None
    _add_special_tokens(tok, md, [info[f"{n}_token"] for n in ("bos", "eos", "unk", "pad")])

    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", kind == "llama")) and info["bos_token"] is not None
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False)) and info["eos_token"] is not None
    info["add_bos_token"], info["add_eos_token"] = add_bos, add_eos
    bos, eos = info["bos_token"], info["eos_token"]
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    specials = ([(bos, tok.token_to_id(bos))] if add_bos else []) + ([(eos, tok.token_to_id(eos))] if add_eos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    info["chat_template"] = md.get("tokenizer.chat_template")
    return tok, info


def gguf_tokenizer(path: str | os.PathLike) -> tuple[Tokenizer, dict]:
    """Build the tokenizer described by a GGUF file's metadata.

    Returns:
        (tokenizer, info): `tokenizer.encode(text).ids` equal transformers' `AutoTokenizer.from_pretrained(
        dir, gguf_file=name)(text).input_ids` (BOS/EOS added per `tokenizer.ggml.add_{bos,eos}_token`; control
        tokens such as `<|im_start|>` encode to one id). `info` holds `{bos,eos,unk,pad}_token_id`,
        `{bos,eos,unk,pad}_token`, `add_bos_token`, `add_eos_token` and `chat_template` (str or None).

    Raises:
        CheckpointError: unreadable GGUF, or a tokenizer model other than 'gpt2' / 'llama'.
    """
    from jaxpeft.loading.gguf import _read_header

    header = _read_header(path)
    return _tokenizer_from_metadata(header.metadata, str(header.path))
