"""Data: loading splits (jsonl/csv/parquet folders, single files), errors that name the row and the fix,
padding/buckets, and the deterministic, resumable Batcher."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from jaxpeft.train.config import DataSection, load_config
from jaxpeft.train.data import Batcher, DataError, bucket_length, collate, eval_batches, load_split
from jaxpeft.train.tasks import encode_rows, make_task


def section(path, **kw) -> DataSection:
    return DataSection(path=str(path), **{"max_length": 32, "buckets": (32,), **kw})


ROWS = [{"prompt": f"q{i}", "response": str(i)} for i in range(7)]


# ------------------------------------------------------------------------------------------------ load_split

def test_load_jsonl_folder(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "validation.jsonl", ROWS[:2])
    assert load_split(section(tmp_path), "train") == ROWS
    assert load_split(section(tmp_path), "validation") == ROWS[:2]
    assert load_split(section(tmp_path), "train", max_rows=3) == ROWS[:3]  # the first rows, in file order
    assert load_split(section(tmp_path), "train", max_rows=100) == ROWS


def test_load_csv_folder(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nhello there,0\n\"a, b\",1\nbye,2\n")
    rows = load_split(section(tmp_path), "train")
    assert rows == [{"text": "hello there", "label": 0}, {"text": "a, b", "label": 1}, {"text": "bye", "label": 2}]


def test_load_parquet_and_single_file(tmp_path, write_jsonl):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "train.parquet")
    assert load_split(section(tmp_path), "train") == ROWS
    single = write_jsonl(tmp_path / "other" / "mine.jsonl", ROWS[:4])
    assert load_split(section(single), "anything") == ROWS[:4]


def test_missing_split_file_names_the_split(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(DataError, match=r"validation"):
        load_split(section(tmp_path), "validation")


def test_no_path_and_unknown_path():
    with pytest.raises(DataError, match=r"data\.path"):
        load_split(DataSection(max_length=32, buckets=(32,)), "train")
    with pytest.raises(DataError, match=r"data\.path='/no/such/folder'"):
        load_split(section("/no/such/folder"), "train")


@pytest.mark.parametrize("name,content", [("train.jsonl", ""), ("train.jsonl", "\n"), ("train.csv", "text,label\n")])
def test_empty_split_is_a_data_error(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match="empty"):
        load_split(section(tmp_path), "train")


# ------------------------------------------------------------------------------------------------ row errors

@pytest.fixture(scope="module")
def char_tok(tiny_llama_dir):
    from jaxpeft.loading.tokenizer import tokenizer_from_folder

    return tokenizer_from_folder(tiny_llama_dir, json.loads((tiny_llama_dir / "config.json").read_text()))


@pytest.fixture(scope="module")
def bert_tok(tiny_bert_dir):
    from jaxpeft.loading.tokenizer import tokenizer_from_folder

    return tokenizer_from_folder(tiny_bert_dir, json.loads((tiny_bert_dir / "config.json").read_text()))


def task_for(tok, task="causal_lm", labels=None, **data):
    cfg = load_config({"model": {"checkpoint": "x", "task": task},
                       "data": {"path": "unused", "max_length": 32, "buckets": [32], **data}})
    return make_task(cfg, tok, labels)


def test_missing_field_names_the_field_and_row(char_tok):
    task = task_for(char_tok)
    with pytest.raises(DataError, match=r"row 1: no field 'response'.*data\.response_field"):
        encode_rows(task, [{"prompt": "a", "response": "b"}, {"prompt": "c", "answer": "d"}])
    with pytest.raises(DataError, match=r"row 0: no field 'question'.*data\.prompt_field"):
        encode_rows(task_for(char_tok, prompt_field="question"), [{"prompt": "a", "response": "b"}])


def test_field_missing_in_some_rows_of_a_file(tmp_path, write_jsonl, char_tok):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c"}])
    rows = load_split(section(tmp_path), "train")
    with pytest.raises(DataError, match=r"row 1.*'response'"):
        encode_rows(task_for(char_tok), rows)


def test_label_out_of_range_and_unknown_label(bert_tok):
    task = task_for(bert_tok, "seq_cls", labels=["neg", "pos"])
    assert encode_rows(task, [{"text": "good", "label": 1}, {"text": "bad", "label": "neg"}])[1]["label"] == 0
    with pytest.raises(DataError, match=r"row 1: label 2 is out of range for 2 labels"):
        encode_rows(task, [{"text": "good", "label": 1}, {"text": "bad", "label": 2}])
    with pytest.raises(DataError, match=r"row 0: label -1 is out of range"):
        encode_rows(task, [{"text": "good", "label": -1}])
    with pytest.raises(DataError, match=r"row 0: label 'meh' is not one of"):
        encode_rows(task, [{"text": "good", "label": "meh"}])
    ner = task_for(bert_tok, "token_cls", labels=["O", "B-PER"])
    with pytest.raises(DataError, match=r"row 0: tag 'B-LOC' is not in the label set"):
        encode_rows(ner, [{"tokens": ["john", "paris"], "tags": ["B-PER", "B-LOC"]}])
    with pytest.raises(DataError, match=r"row 0: 2 tokens but 1 tags"):
        encode_rows(ner, [{"tokens": ["john", "paris"], "tags": ["B-PER"]}])


def test_too_long_rows_error_unless_truncate(char_tok, bert_tok):
    long_row = {"prompt": "x" * 20, "response": "y" * 20}
    with pytest.raises(DataError, match=r"row 1: 42 tokens > data\.max_length=32.*truncate"):
        encode_rows(task_for(char_tok), [{"prompt": "a", "response": "b"}, long_row])
    (ex,) = encode_rows(task_for(char_tok, truncate=True), [long_row])
    assert len(ex["input_ids"]) == 32 and len(ex["loss_mask"]) == 32
    assert ex["loss_mask"][:20] == [0.0] * 20 and ex["loss_mask"][20:] == [1.0] * 12
    # a prompt that alone fills max_length leaves nothing to learn: an error even with truncate
    with pytest.raises(DataError, match=r"row 0"):
        encode_rows(task_for(char_tok, truncate=True), [{"prompt": "x" * 40, "response": "y"}])

    text = {"text": " ".join(["cat"] * 40), "label": 0}
    with pytest.raises(DataError, match=r"row 0: 42 tokens > data\.max_length=32"):
        encode_rows(task_for(bert_tok, "seq_cls", labels=["a", "b"]), [text])
    (ex,) = encode_rows(task_for(bert_tok, "seq_cls", labels=["a", "b"], truncate=True), [text])
    assert len(ex["input_ids"]) == 32


# ------------------------------------------------------------------------------------------------ collate

def ex(n: int, start: int = 10, **extra) -> dict:
    return {"input_ids": list(range(start, start + n)), "loss_mask": [1.0] * n, **extra}


def test_bucket_choice():
    assert bucket_length(1, (8, 16, 32)) == 8
    assert bucket_length(8, (8, 16, 32)) == 8
    assert bucket_length(9, (8, 16, 32)) == 16
    assert bucket_length(32, (8, 16, 32)) == 32
    with pytest.raises(DataError, match="33 tokens"):
        bucket_length(33, (8, 16, 32))
    assert collate([ex(3), ex(5)], (4, 8, 16), pad_id=0)["input_ids"].shape == (2, 8)
    assert collate([ex(3), ex(4)], (4, 8, 16), pad_id=0)["input_ids"].shape == (2, 4)
    assert collate([ex(9)], (4, 8, 16), pad_id=0)["input_ids"].shape == (1, 16)


def test_collate_pads_each_field_with_its_own_value():
    b = collate([ex(2, labels=[3, -100], label=1), ex(4, labels=[1, 2, 0, -100], label=0)], (4, 8), pad_id=7,
                batch_size=3)
    np.testing.assert_array_equal(b["input_ids"], [[10, 11, 7, 7], [10, 11, 12, 13], [7, 7, 7, 7]])
    np.testing.assert_array_equal(b["attention_mask"], [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b["labels"], [[3, -100, -100, -100], [1, 2, 0, -100], [-100] * 4])
    np.testing.assert_array_equal(b["label"], [1, 0, 0])
    np.testing.assert_array_equal(b["example_weight"], [1, 1, 0])
    assert b["input_ids"].dtype == np.int32 and b["loss_mask"].dtype == np.float32


def test_eval_batches_pad_with_weight_zero_rows_to_a_fixed_size():
    examples = [ex(n, start=100 * i) for i, n in enumerate([3, 5, 2, 7, 4, 6, 1])]
    batches = list(eval_batches(examples, batch_size=3, buckets=(4, 8), pad_id=0))
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 3]
    np.testing.assert_array_equal(np.concatenate([b["example_weight"] for b in batches]), [1] * 7 + [0, 0])
    # every example exactly once, in order
    got = [row[mask.astype(bool)].tolist() for b in batches for row, mask, w in
           zip(b["input_ids"], b["attention_mask"], b["example_weight"]) if w > 0]
    assert got == [e["input_ids"] for e in examples]
    assert batches[-1]["attention_mask"][1:].sum() == 0


# ------------------------------------------------------------------------------------------------ Batcher

def numbered(n: int) -> list[dict]:
    """Examples whose first token is their index, of varied lengths (to exercise buckets)."""
    return [{"input_ids": [i] + [1] * (i % 9), "loss_mask": [1.0] * (1 + i % 9)} for i in range(n)]


def ids_of(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def take(it, n):
    return [(e, i, ids_of(b)) for e, i, b in itertools.islice(it, n)]


def test_batcher_same_seed_same_sequence_and_permutations():
    examples = numbered(22)  # 5 batches of 4 per epoch; 2 rows dropped each epoch
    a = take(Batcher(examples, 4, (4, 8, 16), 0, seed=5).iterate(), 17)
    b = take(Batcher(examples, 4, (4, 8, 16), 0, seed=5).iterate(), 17)
    assert a == b
    assert [(e, i) for e, i, _ in a[:7]] == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1)]
    for epoch in range(3):  # epochs 0-2 are complete: 20 distinct rows of 22 (the incomplete batch is dropped)
        seen = [x for e, _, ids in a if e == epoch for x in ids]
        assert len(seen) == 20 and len(set(seen)) == 20
    epoch0 = [x for e, _, ids in a if e == 0 for x in ids]
    epoch1 = [x for e, _, ids in a if e == 1 for x in ids]
    assert epoch0 != epoch1  # a fresh permutation each epoch
    assert epoch0 != list(range(20))  # shuffled


def test_batcher_different_seeds_differ():
    examples = numbered(40)
    a = take(Batcher(examples, 4, (16,), 0, seed=0).iterate(), 10)
    b = take(Batcher(examples, 4, (16,), 0, seed=1).iterate(), 10)
    assert a != b


@pytest.mark.parametrize("stop", [1, 3, 4, 5, 9, 10, 13])
def test_batcher_resume_is_the_exact_continuation(stop):
    """Resuming at the position after batch `stop - 1` (as run.py stores it) continues the same stream."""
    examples = numbered(22)
    full = list(itertools.islice(Batcher(examples, 4, (4, 8, 16), 0, seed=9).iterate(), 16))
    epoch, index, _ = full[stop - 1]
    per_epoch = 22 // 4
    nxt = (epoch, index + 1) if index + 1 < per_epoch else (epoch + 1, 0)
    resumed = list(itertools.islice(Batcher(examples, 4, (4, 8, 16), 0, seed=9).iterate(*nxt), 16 - stop))
    assert len(resumed) == 16 - stop
    for (e1, i1, b1), (e2, i2, b2) in zip(full[stop:], resumed):
        assert (e1, i1) == (e2, i2)
        assert b1.keys() == b2.keys()
        for k in b1:
            np.testing.assert_array_equal(b1[k], b2[k])


def test_batcher_buckets_per_batch_and_too_few_rows():
    examples = [ex(3)] * 4 + [ex(12)] * 4
    shapes = {b["input_ids"].shape for _, _, b in itertools.islice(
        Batcher(examples, 2, (4, 16), 0, seed=0).iterate(), 20)}
    assert shapes <= {(2, 4), (2, 16)} and (2, 16) in shapes
    with pytest.raises(DataError, match="batch_size"):
        Batcher(examples[:3], 4, (16,), 0, seed=0)


# ------------------------------------------------------------------------------------------------ auto buckets

def test_planned_buckets_pad_least_with_few_compiles_and_keep_the_max_length_fallback():
    from jaxpeft.train.data import plan_buckets

    maxima = [21, 23, 25, 25, 25, 24, 22]
    assert plan_buckets(maxima, 32, multiple=1) == (22, 25, 32)  # 2 planned lengths + the fallback
    assert plan_buckets(maxima, 32, multiple=8) == (24, 32)
    assert plan_buckets(maxima, 32, multiple=1, max_buckets=1) == (25, 32)
    assert plan_buckets([], 128) == (128,)
    # padding never exceeds what one bucket at the longest batch would give, and every batch fits a bucket
    wide = [10, 50, 60, 100, 120, 128, 12, 14, 16]
    chosen = plan_buckets(wide, 128, multiple=8)
    pad = sum(min(b for b in chosen if b >= m) - m for m in wide)
    assert pad < sum(128 - m for m in wide) and len(chosen) <= 5


def test_batch_maxima_follow_the_training_order_and_the_evaluation_chunks():
    from jaxpeft.train.data import Batcher, batch_maxima

    examples = [{"input_ids": list(range(n))} for n in (3, 9, 4, 7, 5, 2, 8)]
    batcher = Batcher(examples, 3, (16,), 0, seed=5)
    want = [int(b["attention_mask"].sum(1).max()) for _, (_, _, b) in zip(range(2), batcher.iterate())]
    assert batch_maxima(examples, 3, seed=5) == want  # two full batches; the rest is dropped as in training
    assert batch_maxima(examples, 3) == [9, 7, 8]  # sequential evaluation batches, the last one short


def test_prefetch_yields_the_source_order_at_every_depth():
    from jaxpeft.train.data import Prefetch

    for depth in (0, 1, 3):
        with Prefetch(iter(range(50)), depth) as it:
            assert list(it) == list(range(50))


def test_prefetch_raises_the_source_error_at_its_position():
    from jaxpeft.train.data import Prefetch

    def source():
        yield 1
        yield 2
        raise DataError("row 7: broken")

    it = Prefetch(source(), 2)
    assert [next(it), next(it)] == [1, 2]
    with pytest.raises(DataError, match="row 7"):
        next(it)


def test_prefetch_close_stops_an_endless_source_and_its_thread():
    import itertools

    from jaxpeft.train.data import Prefetch

    it = Prefetch(itertools.count(), 2)
    assert next(it) == 0
    it.close()
    assert not it._thread.is_alive()


def test_batcher_behind_prefetch_is_the_same_sequence():
    from jaxpeft.train.data import Batcher, Prefetch

    examples = [{"input_ids": list(range(3 + i % 5))} for i in range(20)]
    plain = Batcher(examples, 4, (8,), 0, seed=3).iterate(1, 2)
    ahead = Prefetch(Batcher(examples, 4, (8,), 0, seed=3).iterate(1, 2), 2)
    for _ in range(12):
        (e1, i1, b1), (e2, i2, b2) = next(plain), next(ahead)
        assert (e1, i1) == (e2, i2)
        np.testing.assert_array_equal(b1["input_ids"], b2["input_ids"])
    ahead.close()


def test_bundled_paths_resolve_to_the_packaged_folders_and_unknown_names_list_the_bundled_ones():
    from jaxpeft.bundled import dataset_path, names
    from jaxpeft.train.config import DataSection
    from jaxpeft.train.data import data_folder

    assert set(names()) == {"arithmetic", "e2e_nlg", "sentiment", "twitter_ner"}
    assert data_folder("bundled:sentiment") == str(dataset_path("sentiment"))
    assert data_folder("some/folder") == "some/folder"
    rows = load_split(DataSection(path="bundled:arithmetic"), "validation", 3)
    assert len(rows) == 3 and {"prompt", "response"} <= set(rows[0])
    with pytest.raises(DataError, match="bundled:arithmetic"):
        data_folder("bundled:arithmetc")
