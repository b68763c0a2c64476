"""Tests for jaxpeft.loading.gguf_tokenizer: `tokenizers` tokenizer from GGUF metadata vs transformers' conversion.

transformers (torch) is the reference here only; the library builds the tokenizer without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from jaxpeft.loading.errors import CheckpointError
from jaxpeft.loading.gguf_tokenizer import gguf_tokenizer

TEXTS = [
    "Hello, world!",
    "The capital of France is Paris.",
    "",
    " ",
    "   leading spaces and trailing spaces   ",
    "multiple    spaces\tand\ttabs\t\tdouble",
    "line1\nline2\n\n\nline5\r\nwindows\r\n",
    "Ünïcödé ñ café naïve résumé",
    "日本語のテキスト、中文，한국어",
    "ΑΒΓ αβγ кириллица עברית العربية हिन्दी",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "digits 1234567890 3.14159 1e-5 0x1F 2024-01-31 1,000,000",
    "def f(x):\n    return x**2  # square\n\nclass A:\n\tpass\n",
    '{"json": [1, 2, {"k": null}], "s": "a\\"b"}',
    "don't won't it's I'm we'll they've DON'T",
    "camelCaseIdentifier snake_case_name SCREAMING_CASE kebab-case",
    "URL https://example.com/path?q=1&b=2#frag <a href='x'>link</a>",
    "math: ∑_{i=1}^{n} x_i² ≤ ∞ ≠ √2 ½",
    "zero\u200bwidth \ufeffbom \u00a0nbsp \ue000private",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<bos>text<eos> <start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
    "a  b   c    d     e",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?  Answer:\n\n- one line 🙂"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "Thanks!"},
]


def _assert_same_ids(mine, ref, texts) -> None:
    for text in texts:
        for special in (True, False):
            want = ref(text, add_special_tokens=special).input_ids
            got = mine.encode(text, add_special_tokens=special).ids
            assert got == want, (text, special, got, want)


def _assert_decode(mine, ref, texts, exact_roundtrip: bool) -> None:
    for text in texts:
        ids = mine.encode(text).ids
        for skip in (False, True):
            assert mine.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
        plain = mine.encode(text, add_special_tokens=False).ids
        if exact_roundtrip:
            assert mine.decode(plain, skip_special_tokens=False) == text


def _reference(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _assert_same_json(mine, ref) -> None:
    """Model (vocab, merges, flags), added tokens, normalizer, pre-tokenizer, post-processor, decoder."""
    a, b = json.loads(mine.to_str()), json.loads(ref.backend_tokenizer.to_str())
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens"):
        assert a[key] == b[key], key
    assert a["model"] == b["model"]


# ------------------------------------------------------------------------------------------ SmolLM2 (real)


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_gguf):
    return gguf_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_ref(smollm2_gguf):
    pytest.importorskip("torch")
    return _reference(Path(smollm2_gguf))


@pytest.mark.real_weights
def test_smollm2_ids_match_transformers(smollm2_tok, smollm2_ref):
    tok, _ = smollm2_tok
    chat = smollm2_ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert chat.count("<|im_start|>") == 5
    _assert_same_ids(tok, smollm2_ref, TEXTS + [chat])
    _assert_decode(tok, smollm2_ref, TEXTS + [chat], exact_roundtrip=True)
    _assert_same_json(tok, smollm2_ref)


@pytest.mark.real_weights
def test_smollm2_special_tokens_and_template(smollm2_tok):
    tok, info = smollm2_tok
    assert tok.encode("<|im_start|>").ids == [1] and tok.encode("<|im_end|>").ids == [2]
    assert tok.encode("Hi").ids == tok.encode("Hi", add_special_tokens=False).ids  # no BOS for SmolLM2
    assert tok.get_vocab_size() == 49152
    assert info["add_bos_token"] is False and info["bos_token_id"] == 1 and info["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in info["chat_template"]
    # special tokens are skipped on decode, ordinary text is kept
    assert tok.decode(tok.encode("<|im_start|>user\nhey<|im_end|>").ids) == "user\nhey"


@pytest.mark.real_weights
def test_smollm2_chat_template_renders_like_transformers(smollm2_tok, smollm2_ref):
    jinja2 = pytest.importorskip("jinja2")
    _, info = smollm2_tok
    ours = jinja2.Environment().from_string(info["chat_template"]).render(messages=MESSAGES, add_generation_prompt=True)
    assert ours == smollm2_ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------------------------------ Gemma-3 (real)


@pytest.fixture(scope="module")
def gemma3_tok(gemma3_gguf):
    return gguf_tokenizer(gemma3_gguf)


@pytest.fixture(scope="module")
def gemma3_ref(gemma3_gguf):
    pytest.importorskip("torch")
    return _reference(Path(gemma3_gguf))


@pytest.mark.slow
@pytest.mark.real_weights
def test_gemma3_ids_match_transformers(gemma3_tok, gemma3_ref):
    tok, _ = gemma3_tok
    chat = "".join(
        f"<start_of_turn>{'model' if m['role'] == 'assistant' else 'user'}\n{m['content']}<end_of_turn>\n"
        for m in MESSAGES
    ) + "<start_of_turn>model\n"
    _assert_same_ids(tok, gemma3_ref, TEXTS + [chat])
    # '▁' in the text itself cannot round-trip (the normalizer writes spaces as '▁'); none of TEXTS has one
    _assert_decode(tok, gemma3_ref, TEXTS + [chat], exact_roundtrip=True)
    _assert_same_json(tok, gemma3_ref)


@pytest.mark.real_weights
def test_gemma3_special_tokens(gemma3_tok):
    tok, info = gemma3_tok
    assert info["add_bos_token"] is True and info["chat_template"] is None
    assert (info["bos_token_id"], info["eos_token_id"], info["pad_token_id"], info["unk_token_id"]) == (2, 1, 0, 3)
    ids = tok.encode("Hello world").ids
    assert ids[0] == 2 and 2 not in tok.encode("Hello world", add_special_tokens=False).ids
    assert len(tok.encode("<start_of_turn>", add_special_tokens=False).ids) == 1
    # runs of spaces use the respelled '▁▁' tokens; newlines are user-defined tokens kept whole
    assert tok.encode("a  b", add_special_tokens=False).tokens == ["a", "▁▁", "b"]
    assert tok.encode("\n\n", add_special_tokens=False).tokens == ["\n\n"]
    # byte fallback for characters outside the vocabulary
    assert tok.decode(tok.encode("\ue000").ids) == "\ue000"


# ------------------------------------------------------------------------------------------ synthetic GGUFs


def _write_tokenizer_gguf(path: Path, tok_md: dict, arch: str = "llama") -> Path:
    """A tensor-less GGUF with just enough `arch` metadata for transformers' AutoConfig, plus `tok_md`."""
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in {"block_count": 1, "context_length": 64, "embedding_length": 32, "feed_forward_length": 64,
                 "attention.head_count": 2, "attention.head_count_kv": 2}.items():  # fmt: skip
        w.add_uint32(f"{arch}.{k}", v)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    for k, v in tok_md.items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_array(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _byte_level_md(pre: str, add_bos: bool) -> dict:
    from jaxpeft.loading.gguf_tokenizer import _bytes_to_unicode

    b2u = _bytes_to_unicode()
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "1 2", "Ċ Ċ", "Ġ Ġ", "ĠĠ ĠĠ"]
    # '<|endoftext|>' must be in the vocabulary: transformers builds byte-level GGUF tokenizers through
    # GPT2Tokenizer, whose default unk/bos/eos '<|endoftext|>' is otherwise appended as an extra token past the
    # model's vocabulary (Llama-3 files get id 128256). jaxpeft does not copy that quirk.
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|endoftext|>"]
    tokens = specials + [b2u[b] for b in range(256)] + [m.replace(" ", "") for m in merges] + ["<think>"]
    types = [3] * 4 + [1] * (len(tokens) - 5) + [4]
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": add_bos,
    }  # fmt: skip


SYNTH_TEXTS = [t for t in TEXTS if "<|im_start|>" not in t] + [
    "<|begin_of_text|>the thin <think>in</think> 12345 6789\n\n\n x",
    "<|eot_id|>  a\r\n\r\n 99 bottles",
]


@pytest.mark.parametrize("pre,add_bos", [("qwen2", False), ("llama-bpe", True), ("smollm", False), ("gpt-4o", True)])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path, pre, add_bos):
    pytest.importorskip("torch")
    path = _write_tokenizer_gguf(tmp_path / f"bl-{pre}.gguf", _byte_level_md(pre, add_bos))
    tok, info = gguf_tokenizer(path)
    ref = _reference(path)
    _assert_same_ids(tok, ref, SYNTH_TEXTS)
    _assert_decode(tok, ref, SYNTH_TEXTS, exact_roundtrip=True)
    _assert_same_json(tok, ref)
    assert info["add_bos_token"] is add_bos
    assert (tok.encode("x").ids[0] == 0) is add_bos
    # the user-defined token stays whole and is not special (kept when decoding with skip_special_tokens)
    ids = tok.encode("a<think>b", add_special_tokens=False).ids
    assert tok.token_to_id("<think>") in ids and "<think>" in tok.decode(ids, skip_special_tokens=True)


def _sentencepiece_md(add_bos: bool | None) -> dict:
    pieces = ["▁", "t", "h", "e", "a", "i", "n", "s", "o", "r", "▁t", "he", "▁the", "▁a", "in", "▁in", "is",
              "▁is", "or", "▁or", "▁▁", "▁▁▁▁", "er", "▁her", "the", "▁there"]  # fmt: skip
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|user|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [3]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))] + [0.0]
    md = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
    }  # fmt: skip
    if add_bos is not None:
        md["tokenizer.ggml.add_bos_token"] = add_bos
    return md


@pytest.mark.parametrize("add_bos", [None, False])
def test_sentencepiece_llama_matches_transformers(tmp_path, add_bos):
    """Llama-2 style vocabulary (scores, byte tokens, no merges): merges rebuilt from scores, '▁' prefix."""
    pytest.importorskip("torch")
    path = _write_tokenizer_gguf(tmp_path / "spm.gguf", _sentencepiece_md(add_bos))
    tok, info = gguf_tokenizer(path)
    ref = _reference(path)
    texts = SYNTH_TEXTS + ["the theirs in  is or there", "<|user|>hi<s></s>", " there", "\u00e9\u4e2d"]
    _assert_same_ids(tok, ref, texts)
    _assert_decode(tok, ref, texts, exact_roundtrip=False)
    _assert_same_json(tok, ref)
    assert info["add_bos_token"] is (add_bos is None)  # llama.cpp's default for SentencePiece is BOS on
    assert tok.encode("the", add_special_tokens=False).tokens == ["▁the"]


def test_gemma_style_merges_follow_token_order():
    """Gemma rebuilds merges ranked by token position, not by score."""
    from jaxpeft.loading.gguf_tokenizer import _generate_merges

    vocab = {"a": 0, "b": 1, "c": 2, "bc": 3, "ab": 4, "abc": 5}
    by_order = _generate_merges(vocab, {t: -i for t, i in vocab.items()})
    assert by_order == [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]
    by_score = _generate_merges(vocab, {"a": 0, "b": 0, "c": 0, "bc": -5, "ab": -1, "abc": -2})
    assert by_score[:2] == [("a", "b"), ("ab", "c")]


def test_unsupported_tokenizer_model(tmp_path):
    path = _write_tokenizer_gguf(tmp_path / "bert.gguf", {"tokenizer.ggml.model": "bert",
                                                          "tokenizer.ggml.tokens": ["[PAD]", "a"]})  # fmt: skip
    with pytest.raises(CheckpointError, match=r"'bert'.*'gpt2'.*'llama'"):
        gguf_tokenizer(path)
    path = _write_tokenizer_gguf(tmp_path / "none.gguf", {"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(CheckpointError, match="no tokenizer vocabulary"):
        gguf_tokenizer(path)
