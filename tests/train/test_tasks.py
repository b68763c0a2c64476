"""Tasks: how rows become model inputs and losses (causal LM, chat, sequence / token classification, multiple
choice), checked on the tiny real-format checkpoints; plus short in-process classification runs."""
from __future__ import annotations

import json
import random
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft
from jaxpeft.train.config import load_config
from jaxpeft.train.data import collate
from jaxpeft.train.tasks import encode_rows, make_task


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return jaxpeft.load_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def bert_tok(tiny_bert_dir):
    from jaxpeft.loading.tokenizer import tokenizer_from_folder

    return tokenizer_from_folder(tiny_bert_dir, json.loads((tiny_bert_dir / "config.json").read_text()))


def task_for(tok, task="causal_lm", labels=None, **data):
    cfg = load_config({"model": {"checkpoint": "x", "task": task},
                       "data": {"path": "unused", "max_length": 64, "buckets": [16, 64], **data}})
    return make_task(cfg, tok, labels)


def test_tiny_checkpoints_load(llama, tiny_bert_dir):
    tok = llama.tokenizer
    assert llama.config.arch == "llama" and llama.config.num_layers == 2 and llama.config.attention_dropout == 0.1
    assert tok.eos_token_ids == (1,) and tok.pad_token_id == 1  # pad == eos, as SmolLM2
    ids = tok.encode("What is 2 plus 3?\nA: 5")
    assert len(ids) == len("What is 2 plus 3?\nA: 5")  # one token per character, no BOS
    assert tok.decode(ids + [1, 1]) == "What is 2 plus 3?\nA: 5"  # specials are skipped
    assert tok.decode(ids + [1], skip_special_tokens=False).endswith("<eos>")
    assert tok.encode("<eos>") == [1]
    bert = jaxpeft.load_pretrained(tiny_bert_dir, task="seq_cls", num_labels=3)
    assert bert.config.arch == "bert" and bert.newly_initialised == ["classifier/bias", "classifier/kernel"]
    enc = bert.tokenizer.tokenizer.encode("the cat", "was good")
    assert enc.tokens == ["[CLS]", "the", "cat", "[SEP]", "was", "good", "[SEP]"]


# ------------------------------------------------------------------------------------------------ causal LM

def manual_loss(logits, batch):
    """Sum and count of -log p(next token) over positions whose target is in the loss mask."""
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            w = batch["loss_mask"][b, t + 1] * batch["example_weight"][b]
            if w:
                total += -float(logp[b, t, batch["input_ids"][b, t + 1]])
                count += 1
    return total, count


def test_causal_lm_loss_mask_is_response_and_eos_even_when_pad_is_eos(llama):
    tok = llama.tokenizer
    eos = tok.eos_token_ids[0]
    assert tok.pad_token_id == eos
    task = task_for(tok)
    rows = [{"prompt": "What is 2 plus 3?\nA:", "response": "5"},
            {"prompt": "Hi", "response": 123}]  # non-string responses are used as text
    a, b = encode_rows(task, rows)
    p = tok.encode("What is 2 plus 3?\nA:")
    r = tok.encode(" 5", add_special_tokens=False)
    assert a["input_ids"] == p + r + [eos]
    assert a["loss_mask"] == [0.0] * len(p) + [1.0] * (len(r) + 1)
    assert b["input_ids"] == tok.encode("Hi") + tok.encode(" 123", add_special_tokens=False) + [eos]
    assert sum(b["loss_mask"]) == 5

    batch = collate([a, b], (16, 64), pad_id=tok.pad_token_id, batch_size=3)
    assert batch["input_ids"].shape == (3, 64)
    ids, mask = batch["input_ids"], batch["loss_mask"]
    # padding uses the EOS id, yet only the real EOS (the last real token) carries loss
    assert (ids[0, len(a["input_ids"]):] == eos).all() and (mask[0, len(a["input_ids"]):] == 0).all()
    assert ids[0, len(a["input_ids"]) - 1] == eos and mask[0, len(a["input_ids"]) - 1] == 1
    assert (ids == eos).sum() > 3 * 40
    assert mask.sum() == len(r) + 1 + 5

    logits = jax.random.normal(jax.random.key(0), (3, 64, llama.config.vocab_size))
    s, n = task.loss(SimpleNamespace(logits=logits), {k: jnp.asarray(v) for k, v in batch.items()})
    ms, mn = manual_loss(np.asarray(logits), batch)
    assert float(n) == mn == len(r) + 1 + 5
    np.testing.assert_allclose(float(s), ms, rtol=1e-5)

    # the model's own forward: a weight-0 row changes neither the sum nor the count
    out = llama.module.apply({"params": llama.params}, jnp.asarray(ids), jnp.asarray(batch["attention_mask"]))
    s1, n1 = task.loss(out, {k: jnp.asarray(v) for k, v in batch.items()})
    batch2 = dict(batch, input_ids=batch["input_ids"].copy())
    batch2["input_ids"][2, :10] = 42
    batch2["attention_mask"] = batch["attention_mask"].copy()
    batch2["attention_mask"][2, :10] = 1
    out2 = llama.module.apply({"params": llama.params}, jnp.asarray(batch2["input_ids"]),
                              jnp.asarray(batch2["attention_mask"]))
    s2, n2 = task.loss(out2, {k: jnp.asarray(v) for k, v in batch2.items()})
    assert float(n1) == float(n2) and abs(float(s1) - float(s2)) < 1e-4


def test_truncated_response_keeps_its_mask_aligned(llama):
    tok = llama.tokenizer
    task = task_for(tok, max_length=16, buckets=[16], truncate=True)
    (e,) = encode_rows(task, [{"prompt": "0123456789", "response": "abcdefghij"}])
    assert len(e["input_ids"]) == 16 and tok.decode(e["input_ids"]) == "0123456789 abcde"
    assert e["loss_mask"] == [0.0] * 10 + [1.0] * 6


def test_chat_prompt_format_uses_the_template(llama):
    tok = llama.tokenizer
    task = task_for(tok, prompt_format="chat")
    (e,) = encode_rows(task, [{"prompt": "What is 1 plus 1?", "response": "2"}])
    rendered = "<|user|>What is 1 plus 1?\n<|assistant|>"
    assert tok.apply_chat_template([{"role": "user", "content": "What is 1 plus 1?"}]) == rendered
    p = tok.encode(rendered)
    assert e["input_ids"] == p + tok.encode("2", add_special_tokens=False) + [tok.eos_token_ids[0]]
    assert e["loss_mask"] == [0.0] * len(p) + [1.0, 1.0]  # no ' ' separator after a chat prompt
    assert task.prompt_ids({"prompt": "What is 1 plus 1?"}, 0) == p
    plain = task_for(tok)
    assert plain.prompt_ids({"prompt": "What is 1 plus 1?"}, 0) == tok.encode("What is 1 plus 1?")


# ------------------------------------------------------------------------------------------------ classification

def test_seq_cls_encoding(bert_tok):
    v = bert_tok.tokenizer.token_to_id
    task = task_for(bert_tok, "seq_cls", labels=["neg", "pos"])
    e1, e2 = encode_rows(task, [{"text": "The cat", "label": 1}, {"text": "a dog", "label": "neg"}])
    assert e1 == {"input_ids": [v("[CLS]"), v("the"), v("cat"), v("[SEP]")], "label": 1}
    assert e2["label"] == 0 and "token_type_ids" not in e2
    pair = task_for(bert_tok, "seq_cls", labels=["entail", "neutral", "contra"], text_pair_field="hypothesis")
    (e,) = encode_rows(pair, [{"text": "the cat sat", "hypothesis": "it was good", "label": 2}])
    assert e["input_ids"] == [v(t) for t in ["[CLS]", "the", "cat", "sat", "[SEP]", "it", "was", "good", "[SEP]"]]
    assert e["token_type_ids"] == [0] * 5 + [1] * 4
    assert pair.model_inputs(collate([e], (16,), 0))["token_type_ids_bt"].tolist() == [[0] * 5 + [1] * 4 + [0] * 7]
    logits = jnp.asarray([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    batch = {"label": jnp.asarray([0, 2, 1]), "example_weight": jnp.asarray([1.0, 1.0, 0.0])}
    s, n = pair.loss(SimpleNamespace(logits=logits), batch)
    expected = -(jax.nn.log_softmax(logits[0])[0] + jax.nn.log_softmax(logits[1])[2])
    np.testing.assert_allclose(float(s), float(expected), rtol=1e-6)
    assert float(n) == 2.0


def test_token_cls_labels_the_first_sub_token_only(bert_tok):
    v = bert_tok.tokenizer.token_to_id
    labels = ["O", "B-PER", "I-PER", "B-LOC"]
    task = task_for(bert_tok, "token_cls", labels=labels)
    (e,) = encode_rows(task, [{"tokens": ["John", "Smith", "likes", "Paris"],
                               "tags": ["B-PER", "I-PER", "O", "B-LOC"]}])
    # likes -> l ##i ##k ##e ##s (not in the vocab): one label, four ignored sub-tokens
    assert e["input_ids"] == [v(t) for t in ["[CLS]", "john", "smith", "l", "##i", "##k", "##e", "##s", "paris",
                                             "[SEP]"]]
    assert e["labels"] == [-100, 1, 2, 0, -100, -100, -100, -100, 3, -100]
    assert e["num_words"] == 4
    preds = np.asarray([0, 1, 1, 3, 2, 2, 2, 2, 0, 1])
    assert task.word_tags(np.asarray(e["labels"]), preds) == (["B-PER", "B-PER", "B-LOC", "O"],
                                                              ["B-PER", "I-PER", "O", "B-LOC"])
    batch = collate([e], (16,), 0, batch_size=2)
    logits = jax.random.normal(jax.random.key(1), (2, 16, 4))
    s, n = task.loss(SimpleNamespace(logits=logits), {k: jnp.asarray(x) for k, x in batch.items()})
    assert float(n) == 4.0
    lp = jax.nn.log_softmax(logits[0], -1)
    expected = -sum(float(lp[t, lab]) for t, lab in enumerate(e["labels"]) if lab >= 0)
    np.testing.assert_allclose(float(s), expected, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ multiple choice

def test_multiple_choice_picks_the_most_likely_choice(llama, tiny_llama_dir, tmp_path, write_jsonl):
    """Scores are summed log-probabilities of choice + EOS: long choices lose by a wide margin on a random
    model. Answers are set so that exactly 2 of 3 rows are right."""
    from jaxpeft.adapters import AdaptedModel, LoraConfig
    from jaxpeft.adapters.peft_io import export_peft
    from jaxpeft.train import evaluate

    tok = llama.tokenizer
    rows = [
        {"prompt": "Pick one:\nA:", "choices": ["5", "55555555"], "answer_index": 0},           # argmax 0: right
        {"prompt": "Pick two:\nA:", "choices": ["66666666666", "6"], "answer_index": 0},        # argmax 1: wrong
        {"prompt": "Pick three:\nA:", "choices": ["abcdefghij", "x", "yyyyyyyy"], "answer_index": 1},  # right
    ]
    for r in rows:
        r["response"] = r["choices"][r["answer_index"]]
    write_jsonl(tmp_path / "data" / "validation.jsonl", rows)

    # independent scores from the base model
    task = task_for(tok, "multiple_choice")
    for i, r in enumerate(rows):
        exs = task.choice_examples(r, i)
        batch = collate(exs, (64,), tok.pad_token_id)
        out = llama.module.apply({"params": llama.params}, jnp.asarray(batch["input_ids"]),
                                 jnp.asarray(batch["attention_mask"]))
        logp = np.asarray(jax.nn.log_softmax(out.logits.astype(jnp.float32), -1))
        scores = [sum(logp[c, t, batch["input_ids"][c, t + 1]] for t in range(63) if batch["loss_mask"][c, t + 1])
                  for c in range(len(exs))]
        r["_best"] = int(np.argmax(scores))
        assert sorted(scores)[-1] - sorted(scores)[-2] > 5.0  # a clear winner: the shortest choice
    assert [r["_best"] for r in rows] == [0, 1, 1]

    # a zero LoRA adapter = the base model, evaluated through the public `evaluate`
    model = AdaptedModel.wrap(llama.module).add("default", LoraConfig(r=2, target_modules=("q_proj",)))
    export_peft(model, model.init(jax.random.key(0), llama.params), "default", tmp_path / "zero-adapter")
    cfg = load_config({"model": {"checkpoint": str(tiny_llama_dir), "task": "multiple_choice"},
                       "data": {"path": str(tmp_path / "data"), "max_length": 64, "buckets": [64]},
                       "train": {"eval_batch_size": 4}})
    metrics = evaluate(cfg, adapter=str(tmp_path / "zero-adapter"))
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert np.isfinite(metrics["eval_loss"])


def test_multiple_choice_answer_out_of_range(llama):
    from jaxpeft.train.data import DataError

    task = task_for(llama.tokenizer, "multiple_choice")
    with pytest.raises(DataError, match=r"row 4: answer index 2 is out of range for 2 choices"):
        task.answer({"prompt": "p", "choices": ["a", "b"], "answer_index": 2}, 4)


# ------------------------------------------------------------------------------------------------ short runs

WORDS_POS = ["good", "great"]
WORDS_NEG = ["bad", "awful"]
FILLER = ["the", "movie", "film", "was", "very", "it", "is", "a"]


def _cls_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.sample(FILLER, 3) + [rng.choice(WORDS_POS if label else WORDS_NEG)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def _ner_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name = rng.choice([["John", "Smith"], ["Mary"]])
        place = rng.choice(["Paris", "London"])
        tokens = name + ["lives", "in", place]
        tags = ["B-PER"] + ["I-PER"] * (len(name) - 1) + ["O", "O", "B-LOC"]
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def _run_cfg(tiny_bert_dir, data_dir, out_dir, task):
    return {"model": {"checkpoint": str(tiny_bert_dir), "task": task},
            "adapter": {"method": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                        "modules_to_save": ["classifier"]},
            "data": {"path": str(data_dir), "max_length": 16, "buckets": [16]},
            "optim": {"lr": 5e-3, "warmup_steps": 1},
            "train": {"steps": 4, "batch_size": 8, "grad_accum": 2, "eval_every": 4, "checkpoint_every": 4,
                      "eval_batch_size": 8, "log_every": 2, "output_dir": str(out_dir), "eval_before_training": True}}


def test_seq_cls_run_on_tiny_bert(tiny_bert_dir, tmp_path, write_jsonl):
    from jaxpeft.train.logging import read_metrics
    from jaxpeft.train import evaluate, run

    write_jsonl(tmp_path / "data" / "train.jsonl", _cls_rows(32, 0))
    write_jsonl(tmp_path / "data" / "validation.jsonl", _cls_rows(12, 1))
    (tmp_path / "data" / "labels.json").write_text(json.dumps(["negative", "positive"]))
    cfg = _run_cfg(tiny_bert_dir, tmp_path / "data", tmp_path / "run", "seq_cls")
    result = run(cfg, verbose=False)
    assert set(result.metrics_after) == {"eval_loss", "accuracy", "macro_f1", "mcc"}
    assert set(result.metrics_before) == set(result.metrics_after)
    assert 0.0 <= result.metrics_after["accuracy"] <= 1.0 and -1.0 <= result.metrics_after["mcc"] <= 1.0
    assert [s for s, _ in result.train_losses] == [1, 2, 3, 4]
    assert all(np.isfinite(v) for _, v in result.train_losses)
    assert result.metrics_after != result.metrics_before  # the adapter (and the saved classifier) trained
    logged = read_metrics(result.output_dir)
    assert [r["step"] for r in logged if r["split"] == "train"] == [2, 4]
    assert [r["step"] for r in logged if r["split"] == "eval"] == [0, 4]
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and "classifier" in saved["modules_to_save"]
    # the exported PEFT folder (LoRA + the trained classifier) reproduces the final evaluation
    again = evaluate(cfg, adapter=str(result.adapter_dir))
    assert again.keys() == result.metrics_after.keys()
    for k, v in again.items():
        assert v == pytest.approx(result.metrics_after[k], abs=1e-6), k


def test_token_cls_run_on_tiny_bert_learns_beyond_the_label_prior(tiny_bert_dir, tmp_path, write_jsonl):
    """8 steps at lr 2e-2 (same compile cost as 4): validation loss falls to well under the entropy of the
    validation tag distribution (the best loss of any input-blind predictor, i.e. the majority/prior baseline;
    measured 1.563 -> 0.658, prior 1.25), and span F1 rises far above its step-0 value and the all-'O' majority
    baseline's 0 (measured 0.217 -> 0.737)."""
    from jaxpeft.train import run

    write_jsonl(tmp_path / "data" / "train.jsonl", _ner_rows(32, 0))
    val = _ner_rows(10, 1)
    write_jsonl(tmp_path / "data" / "validation.jsonl", val)
    (tmp_path / "data" / "labels.json").write_text(json.dumps(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]))
    cfg = _run_cfg(tiny_bert_dir, tmp_path / "data", tmp_path / "run", "token_cls")
    cfg["optim"]["lr"] = 2e-2
    cfg["train"].update(steps=8, eval_every=8, checkpoint_every=8)
    result = run(cfg, verbose=False)
    before, after = result.metrics_before, result.metrics_after
    assert {"eval_loss", "span_f1", "span_precision", "span_recall"} <= set(after)
    assert all(np.isfinite(v) for _, v in result.train_losses)
    tags = [t for r in val for t in r["tags"]]
    freq = np.array([tags.count(t) for t in set(tags)], np.float64) / len(tags)
    prior_entropy = float(-(freq * np.log(freq)).sum())
    assert before["eval_loss"] > prior_entropy  # a random head starts no better than the prior
    assert after["eval_loss"] <= 0.6 * before["eval_loss"], (before, after)
    assert after["eval_loss"] <= 0.8 * prior_entropy, (after, prior_entropy)
    assert after["span_f1"] >= 0.5 and after["span_f1"] >= before["span_f1"] + 0.25, (before, after)
    assert (result.adapter_dir / "adapter_model.safetensors").exists()


def test_seq_cls_evaluates_itself_from_scored_batches_skipping_padding_rows(bert_tok):
    """Task.evaluate: loss = total / weight over batches; metrics from real rows only (weight-0 rows dropped)."""
    from jaxpeft.train.tasks import EvalTools

    task = task_for(bert_tok, "seq_cls", labels=("neg", "pos"))
    task.metrics = ("accuracy",)
    batches = [  # (loss sum, weight, outputs, batch): the second batch's last row is padding with a wrong pred
        (3.0, 2.0, {"pred": np.array([1, 0])}, {"label": np.array([1, 1]), "example_weight": np.array([1.0, 1.0])}),
        (1.0, 1.0, {"pred": np.array([0, 1])}, {"label": np.array([0, 0]), "example_weight": np.array([1.0, 0.0])}),
    ]
    seen = []
    tools = EvalTools(score=lambda ex: (seen.append(list(ex)), iter(batches))[1],
                      generate=lambda rows: pytest.fail("classification must not generate"))
    result = task.evaluate([{}] * 3, ["e0", "e1", "e2"], tools)
    assert seen == [["e0", "e1", "e2"]]
    assert result == pytest.approx({"eval_loss": 4.0 / 3.0, "accuracy": 2 / 3})


def test_causal_lm_generates_only_when_eval_generate_is_on(llama):
    from jaxpeft.train.tasks import EvalTools

    rows = [{"prompt": "2+2=", "response": "4"}, {"prompt": "3+3=", "response": "6"}]
    batches = [(2.0, 4.0, {"row_nll": np.array([1.0, 1.0])}, {"example_weight": np.array([1.0, 1.0])})]
    asked = []
    tools = EvalTools(score=lambda ex: iter(batches), generate=lambda rs: asked.append(rs) or ["4", "7"])
    on = task_for(llama.tokenizer).evaluate(rows, [], tools)
    assert asked == [rows] and on == pytest.approx({"eval_loss": 0.5, "exact_match": 0.5})
    off = task_for(llama.tokenizer)
    off.cfg = off.cfg.model_copy(update={"generation": off.cfg.generation.model_copy(update={"eval_generate": False})})
    assert off.evaluate(rows, [], tools) == {"eval_loss": 0.5} and len(asked) == 1


def test_multiple_choice_trains_on_the_answer_choice_when_the_row_has_no_response(llama):
    task = task_for(llama.tokenizer, "multiple_choice")
    row = {"prompt": "Pick:", "choices": ["red", "blue"], "answer_index": 1}
    got = task.encode(row, 0)
    assert got == task.encode({**row, "response": "blue"}, 0)
    assert got != task.encode({**row, "response": "red"}, 0)
