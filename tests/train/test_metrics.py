"""jaxpeft.train.metrics: hand-checkable numbers and cross-checks against the libraries it wraps."""
import math

import numpy as np
import pytest

from jaxpeft.train import metrics as M


# ------------------------------------------------------------------------------------------ classification


def test_accuracy_hand_example():
    assert M.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == pytest.approx(0.75)
    assert M.accuracy(np.array([2, 2]), np.array([2, 2])) == 1.0  # arrays work too


def test_macro_f1_hand_example():
    # class 0: TP=2 FP=0 FN=1 -> P=1, R=2/3, F1=0.8; class 1: TP=1 FP=1 FN=0 -> P=1/2, R=1, F1=2/3
    assert M.macro_f1([0, 1, 1, 0], [0, 1, 0, 0]) == pytest.approx((0.8 + 2 / 3) / 2)


def test_macro_f1_undefined_class_scores_zero_without_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # class 2 is never predicted: its precision is 0/0 -> 0
        assert M.macro_f1([0, 0, 1], [0, 2, 1]) == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_mcc_known_confusion_matrix():
    # TP=6, TN=3, FP=1, FN=2: MCC = (6*3 - 1*2) / sqrt(7 * 8 * 4 * 5) = 16 / sqrt(1120)
    labels = [1] * 6 + [0] * 3 + [0] * 1 + [1] * 2
    preds = [1] * 6 + [0] * 3 + [1] * 1 + [0] * 2
    assert M.mcc(preds, labels) == pytest.approx(16 / math.sqrt(1120))
    assert M.mcc([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert M.mcc([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert M.mcc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0  # constant predictions


@pytest.mark.parametrize("fn", [M.accuracy, M.macro_f1, M.mcc])
def test_classification_errors(fn):
    with pytest.raises(ValueError, match=r"preds has 3 items but labels has 2"):
        fn([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])


# ---------------------------------------------------------------------------------------- sequence tagging


def test_span_f1_seqeval_readme_example():
    # seqeval README: one of two gold entities found (MISC has a wrong start), one of two predicted correct
    y_true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    y_pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    assert M.span_f1(y_pred, y_true) == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})


def test_span_f1_default_mode_is_lenient_not_strict():
    from seqeval.metrics import f1_score
    from seqeval.scheme import IOB2

    gold = [["B-PER", "I-PER", "O"]]
    pred = [["I-PER", "I-PER", "O"]]  # ill-formed start: an entity in default (conlleval) mode
    assert M.span_f1(pred, gold)["f1"] == pytest.approx(1.0)
    assert f1_score(gold, pred, mode="strict", scheme=IOB2) == 0.0  # what strict mode would report instead


def test_span_f1_type_must_match_and_no_entities():
    assert M.span_f1([["B-LOC", "O"]], [["B-PER", "O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert M.span_f1([["O", "O"]], [["O", "O"]])["f1"] == 0.0  # 0/0 -> 0, no exception


def test_span_f1_errors():
    with pytest.raises(ValueError, match=r"pred_tags has 1 items but gold_tags has 2"):
        M.span_f1([["O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match=r"pred_tags\[0\] has 1 tags but gold_tags\[0\] has 2"):
        M.span_f1([["O"]], [["O", "B-PER"]])
    with pytest.raises(ValueError, match="empty"):
        M.span_f1([], [])


# --------------------------------------------------------------------------------------------------- SQuAD


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("The Cat!", "cat"),
        ("an apple a day", "apple day"),
        ("  Hello,   World. ", "hello world"),
        ("theatre", "theatre"),  # articles only as whole words
        ("A", ""),
        ("U.S.-based", "usbased"),  # punctuation is deleted, not replaced by a space
    ],
)
def test_squad_normalization(raw, norm):
    assert M._squad_normalize(raw) == norm


def test_squad_scores_hand_example():
    preds = ["Denver Broncos", "the big cat", "blue"]
    refs = [["denver broncos.", "Broncos"], ["a cat"], ["red"]]
    # EM: 1, 0, 0. F1: 1; tokens [big, cat] vs [cat] -> P=1/2, R=1 -> 2/3; 0
    s = M.squad_scores(preds, refs)
    assert s["exact_match"] == pytest.approx(100 / 3)
    assert s["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)


def test_squad_max_over_references_and_bare_string_reference():
    assert M.squad_scores(["Broncos"], [["Denver Broncos", "broncos"]]) == {"exact_match": 100.0, "f1": 100.0}
    # a bare string is one reference, not a list of characters
    assert M.squad_scores(["Paris"], ["Paris"]) == {"exact_match": 100.0, "f1": 100.0}


def test_squad_errors():
    with pytest.raises(ValueError, match=r"predictions has 2 items but references has 1"):
        M.squad_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[0\] is empty"):
        M.squad_scores(["a"], [[]])
    with pytest.raises(ValueError, match="empty"):
        M.squad_scores([], [])


# --------------------------------------------------------------------------------------------- exact match


def test_exact_match_strips_only():
    preds = ["1424", " 7", "8", "Yes"]
    refs = [["1424"], ["7 \n"], ["9", "10"], ["yes"]]  # case matters
    assert M.exact_match(preds, refs) == pytest.approx(2 / 4)
    assert M.exact_match(["42"], ["42"]) == 1.0


# ---------------------------------------------------------------------------------------------- generation


def test_bleu_identical_is_100():
    sents = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog"]
    assert M.bleu(sents, [[s] for s in sents]) == pytest.approx(100.0)


def test_bleu_hand_computed():
    # 1..4-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths so no brevity penalty
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25  # 53.73
    assert M.bleu(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx(expected, abs=0.01)


def test_bleu_multi_reference_ragged():
    import sacrebleu

    preds = ["the cat sat on the mat", "a dog ran in the big park today"]
    refs = [["the cat sat on the mat"], ["some other sentence here", "a dog ran in the big park today", "x"]]
    assert M.bleu(preds, refs) == pytest.approx(100.0)  # each prediction matches one of its own references

    preds = ["the cat is on the mat", "a dog runs in a park"]
    refs = [["there is a cat on the mat", "a cat is on the mat"], ["the dog ran in the park"]]
    streams = [[refs[0][0], refs[1][0]], [refs[0][1], None]]  # sacrebleu's layout, written out by hand
    assert M.bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score)
    assert 0 < M.bleu(preds, refs) < 100


def test_rouge_l():
    assert M.rouge_l(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(1.0)
    # LCS("the cat sat", "the cat ran") = 2 -> P = R = F = 2/3
    assert M.rouge_l(["the cat sat"], [["the cat ran"]]) == pytest.approx(2 / 3)
    # stemming: cats/cat, running/run
    assert M.rouge_l(["cats running"], [["cat run"]]) == pytest.approx(1.0)
    # max over references, mean over predictions
    assert M.rouge_l(["the cat sat", "hello"], [["xyz", "the cat sat"], ["goodbye"]]) == pytest.approx(0.5)


@pytest.mark.parametrize("fn", [M.bleu, M.rouge_l, M.exact_match])
def test_generation_errors(fn):
    with pytest.raises(ValueError, match=r"predictions has 1 items but references has 2"):
        fn(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(TypeError, match=r"predictions\[0\] must be a string"):
        fn([3], [["3"]])


# ------------------------------------------------------------------------------------------------ registry


def test_registry_names():
    assert set(M.METRICS) == {"accuracy", "macro_f1", "mcc", "span_f1", "exact_match", "squad", "bleu", "rouge_l"}


def test_compute_flattens_and_routes_inputs():
    out = M.compute(["accuracy", "mcc"], preds=[0, 1, 1, 0], labels=[0, 1, 0, 0])
    assert out == pytest.approx({"accuracy": 0.75, "mcc": M.mcc([0, 1, 1, 0], [0, 1, 0, 0])})

    tags = [["B-PER", "I-PER", "O"]]
    assert M.compute(["span_f1"], pred_tags=tags, gold_tags=tags) == {
        "span_precision": 1.0,
        "span_recall": 1.0,
        "span_f1": 1.0,
    }

    out = M.compute(["squad", "exact_match", "bleu", "rouge_l"], predictions=["Broncos"], references=[["broncos"]])
    assert out == pytest.approx(
        {"squad_em": 100.0, "squad_f1": 100.0, "exact_match": 0.0, "bleu": M.bleu(["Broncos"], [["broncos"]]),
         "rouge_l": 1.0}
    )
    assert all(type(v) is float for v in out.values())


def test_compute_errors():
    with pytest.raises(ValueError, match=r"unknown metric\(s\) 'f1'.*accuracy, macro_f1, mcc, span_f1"):
        M.compute(["f1"], preds=[1], labels=[1])
    with pytest.raises(ValueError, match=r"metric 'bleu' needs inputs predictions, references; missing references"):
        M.compute(["bleu"], predictions=["a"])
