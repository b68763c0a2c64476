"""Task metrics for evaluation: classification, tagging, extractive QA and generation scores.

Host-side only (plain Python lists in, floats out); wraps scikit-learn, seqeval, sacrebleu and rouge-score,
imported lazily inside each metric. Only the SQuAD v1.1 scorer is written here, because no package ships it offline.
"""
from __future__ import annotations

import collections
import inspect
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "METRICS",
    "accuracy",
    "bleu",
    "compute",
    "exact_match",
    "macro_f1",
    "mcc",
    "rouge_l",
    "span_f1",
    "squad_scores",
]


# ----------------------------------------------------------------------------------------------- input checks


def _check_pair(predictions: Any, references: Any, pred_name: str, ref_name: str) -> None:
    """Reject empty inputs and length mismatches, naming both lengths (works for lists and numpy/jax arrays)."""
    n_pred, n_ref = len(predictions), len(references)
    if n_pred != n_ref:
        raise ValueError(f"{pred_name} has {n_pred} items but {ref_name} has {n_ref}; they must be the same length")
    if n_pred == 0:
        raise ValueError(f"{pred_name} and {ref_name} are empty; a metric needs at least one example")


def _as_list(x: Any) -> list:
    """A plain list from a list, tuple, numpy or jax array (sklearn accepts all, but mixed types confuse it)."""
    tolist = getattr(x, "tolist", None)
    return tolist() if callable(tolist) else list(x)


def _reference_lists(references: Sequence[Sequence[str]], name: str = "references") -> list[list[str]]:
    """One list of reference strings per example; a bare string counts as a single reference.

    (Without this, "Paris" would be scored as the five references "P", "a", "r", "i", "s".)
    """
    out = []
    for i, refs in enumerate(references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"{name}[{i}] is empty; every prediction needs at least one reference")
        bad = [r for r in refs if not isinstance(r, str)]
        if bad:
            raise TypeError(f"{name}[{i}] must hold strings, got {type(bad[0]).__name__}")
        out.append(refs)
    return out


def _strings(predictions: Sequence[str], name: str = "predictions") -> list[str]:
    preds = list(predictions)
    for i, p in enumerate(preds):
        if not isinstance(p, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(p).__name__}")
    return preds


# ------------------------------------------------------------------------------------------ classification


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to their label (sklearn.metrics.accuracy_score), in [0, 1]."""
    from sklearn.metrics import accuracy_score

    _check_pair(preds, labels, "preds", "labels")
    return float(accuracy_score(_as_list(labels), _as_list(preds)))


def macro_f1(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes seen in labels or preds (sklearn f1_score, macro), in [0, 1].

    A class with no predicted and no true examples cannot occur; a class whose precision or recall is undefined
    (0/0) scores 0 for that class, without a warning.
    """
    from sklearn.metrics import f1_score

    _check_pair(preds, labels, "preds", "labels")
    return float(f1_score(_as_list(labels), _as_list(preds), average="macro", zero_division=0))


def mcc(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation coefficient (sklearn matthews_corrcoef), in [-1, 1]; the GLUE CoLA metric.

    Multiclass inputs use sklearn's generalised (R_K) form. Constant predictions or labels give 0.
    """
    from sklearn.metrics import matthews_corrcoef

    _check_pair(preds, labels, "preds", "labels")
    return float(matthews_corrcoef(_as_list(labels), _as_list(preds)))


# ---------------------------------------------------------------------------------------- sequence tagging


def span_f1(pred_tags: Sequence[Sequence[str]], gold_tags: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level micro precision/recall/F1 over BIO tag sequences (seqeval), each in [0, 1].

    Uses seqeval's *default* mode, like HF's `seqeval` metric and the CoNLL `conlleval` script: spans are read
    leniently, so an entity that starts with `I-` (no `B-`) still counts as an entity. Strict mode
    (`mode="strict", scheme=IOB2`) would instead drop such ill-formed spans; default mode is the usual number
    reported for CoNLL-2003 and WNUT. An entity counts as correct only when its type and both boundaries match.
    Returns {"precision", "recall", "f1"}; a 0/0 ratio (no predicted or no gold entities) is 0.
    """
    from seqeval.metrics import f1_score, precision_score, recall_score

    _check_pair(pred_tags, gold_tags, "pred_tags", "gold_tags")
    pred = [list(s) for s in pred_tags]
    gold = [list(s) for s in gold_tags]
    for i, (p, g) in enumerate(zip(pred, gold)):
        if len(p) != len(g):
            raise ValueError(f"pred_tags[{i}] has {len(p)} tags but gold_tags[{i}] has {len(g)}")
    return {
        "precision": float(precision_score(gold, pred, zero_division=0)),
        "recall": float(recall_score(gold, pred, zero_division=0)),
        "f1": float(f1_score(gold, pred, zero_division=0)),
    }


# --------------------------------------------------------------------------------------- extractive QA (SQuAD)
# A transcription of the official SQuAD v1.1 evaluation script (evaluate-v1.1.py, Rajpurkar et al. 2016):
#   normalize_answer: lowercase -> drop every string.punctuation character -> replace the words a/an/the
#                     with a space -> collapse whitespace;
#   exact match:      normalized prediction == normalized ground truth;
#   F1:               bag-of-tokens overlap of the normalized texts (Counter intersection), 0 when nothing
#                     overlaps (so two empty answers score F1 0 but EM 1, as in v1.1);
#   each example takes the max over its ground truths; corpus scores are means times 100.
# HF `evaluate.load("squad")` runs this same script, but fetches it from the Hub, so it is not usable offline.


_PUNCT = frozenset(string.punctuation)


def _squad_normalize(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _squad_f1(prediction: str, ground_truth: str) -> float:
    pred_tokens = _squad_normalize(prediction).split()
    gold_tokens = _squad_normalize(ground_truth).split()
    num_same = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """SQuAD v1.1 {"exact_match", "f1"} in percent (0-100), exactly as the official evaluation script.

    `references[i]` holds every accepted answer for example i (a bare string counts as one); each example scores
    its best answer. Answers are normalized (lowercase, no punctuation, no articles a/an/the, single spaces).
    """
    _check_pair(predictions, references, "predictions", "references")
    preds = _strings(predictions)
    refs = _reference_lists(references)
    em = sum(max(float(_squad_normalize(p) == _squad_normalize(g)) for g in gs) for p, gs in zip(preds, refs))
    f1 = sum(max(_squad_f1(p, g) for g in gs) for p, gs in zip(preds, refs))
    return {"exact_match": 100.0 * em / len(preds), "f1": 100.0 * f1 / len(preds)}


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction (0-1) of predictions that equal one of their references after stripping surrounding whitespace.

    No other normalization: meant for short canonical answers (numbers such as "1424", labels, choices) where
    case and punctuation matter. Use `squad_scores` for free-text answers.
    """
    _check_pair(predictions, references, "predictions", "references")
    preds = _strings(predictions)
    refs = _reference_lists(references)
    hits = sum(p.strip() in {g.strip() for g in gs} for p, gs in zip(preds, refs))
    return hits / len(preds)


# ----------------------------------------------------------------------------------------------- generation


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu.corpus_bleu, default 13a tokenization and exp smoothing), 0-100.

    `references[i]` holds the references of prediction i (any number, at least one). sacrebleu wants reference
    *streams* (stream k = the k-th reference of every sentence), so the lists are transposed, and sentences with
    fewer references are padded with None, which sacrebleu skips (an empty string would count as a reference).
    """
    import sacrebleu

    _check_pair(predictions, references, "predictions", "references")
    preds = _strings(predictions)
    refs = _reference_lists(references)
    n_streams = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(n_streams)]
    return float(sacrebleu.corpus_bleu(preds, streams).score)


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-L F-measure (rouge_score, Porter stemming), max over each prediction's references, in [0, 1].

    rouge_score's default tokenizer keeps only ASCII letters and digits, so it suits English text only.
    """
    from rouge_score import rouge_scorer

    _check_pair(predictions, references, "predictions", "references")
    preds = _strings(predictions)
    refs = _reference_lists(references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    total = sum(scorer.score_multi(gs, p)["rougeL"].fmeasure for p, gs in zip(preds, refs))
    return float(total / len(preds))


# ------------------------------------------------------------------------------------------------- registry

METRICS: dict[str, Callable[..., float | dict[str, float]]] = {
    "accuracy": accuracy,
    "macro_f1": macro_f1,
    "mcc": mcc,
    "span_f1": span_f1,
    "exact_match": exact_match,
    "squad": squad_scores,
    "bleu": bleu,
    "rouge_l": rouge_l,
}
"""Metric name (as written in a config's `metrics:` list) -> function."""

# How dict-valued metrics are flattened into compute()'s result.
_FLAT_NAMES: dict[str, dict[str, str]] = {
    "span_f1": {"precision": "span_precision", "recall": "span_recall", "f1": "span_f1"},
    "squad": {"exact_match": "squad_em", "f1": "squad_f1"},
}


def compute(names: Sequence[str], **inputs: Any) -> dict[str, float]:
    """Run the named metrics and return one flat {name: value} dict.

    Each metric takes the keyword inputs named like its function's parameters:
    accuracy/macro_f1/mcc take `preds`, `labels`; span_f1 takes `pred_tags`, `gold_tags`;
    exact_match/squad/bleu/rouge_l take `predictions`, `references`. Inputs a metric does not use are ignored.
    Dict results are flattened: "span_f1" -> span_precision, span_recall, span_f1; "squad" -> squad_em, squad_f1.

    Raises ValueError for an unknown metric name (listing METRICS) or a missing input.
    """
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(map(repr, unknown))}; known metrics: {', '.join(METRICS)}")
    out: dict[str, float] = {}
    for name in names:
        fn = METRICS[name]
        params = list(inspect.signature(fn).parameters)
        missing = [p for p in params if p not in inputs]
        if missing:
            raise ValueError(
                f"metric {name!r} needs inputs {', '.join(params)}; missing {', '.join(missing)} "
                f"(given: {', '.join(inputs) or 'none'})"
            )
        result = fn(**{p: inputs[p] for p in params})
        if isinstance(result, dict):
            rename = _FLAT_NAMES.get(name, {})
            out.update({rename.get(k, f"{name}_{k}"): float(v) for k, v in result.items()})
        else:
            out[name] = float(result)
    return out
