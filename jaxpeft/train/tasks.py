"""Tasks: how a row becomes model inputs, the training loss, and the task's own evaluation (its metrics from the
evaluation pass's per-row outputs, generation or choice scoring), as big_vision's evaluators do.

Imports jax/numpy and sibling train modules (config, data, losses, metrics). Causal-LM supervised fine-tuning puts
the loss on the response tokens and the EOS that ends them; the mask comes from the response span, never
from pad ids (SmolLM2's pad token is its EOS, and that EOS target must be learned).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.train.config import RunConfig
from jaxpeft.train.data import DataError, Example
from jaxpeft.train import metrics as M
from jaxpeft.train.losses import chunked_row_nll, weighted_nll

MODEL_TASK = {"causal_lm": "causal_lm", "seq_cls": "seq_cls", "token_cls": "token_cls", "multiple_choice": "causal_lm"}
DEFAULT_METRICS = {"causal_lm": ("exact_match",), "seq_cls": ("accuracy", "macro_f1", "mcc"),
                   "token_cls": ("span_f1",), "multiple_choice": ("accuracy",)}


def _check_len(n: int, cfg: RunConfig, row_index: int) -> None:
    if n > cfg.data.max_length:
        raise DataError(f"row {row_index}: {n} tokens > data.max_length={cfg.data.max_length}; raise max_length "
                        "(and the largest bucket) or set data.truncate: true")


def _field(row: dict[str, Any], name: str, row_index: int, key: str) -> Any:
    """row[name]; missing or None (what `datasets` fills in for rows lacking a column) is a DataError."""
    if row.get(name) is None:
        present = sorted(k for k, v in row.items() if v is not None)
        raise DataError(f"row {row_index}: no field {name!r} (set data.{key}; the row has {present})")
    return row[name]


def _text(row: dict[str, Any], name: str, row_index: int, key: str) -> str:
    """row[name] as a text (DataError naming the field when it is missing or not a string)."""
    value = _field(row, name, row_index, key)
    if not isinstance(value, str):
        raise DataError(f"row {row_index}: field {name!r} holds {_short(value)} ({type(value).__name__}), not a "
                        f"text: make it a string in the data, or set data.{key} to the field that holds the text")
    return value


def _words(row: dict[str, Any], name: str, row_index: int, key: str) -> list[Any]:
    """row[name] as a list (DataError naming the field when it is missing or not a list)."""
    value = _field(row, name, row_index, key)
    if not isinstance(value, (list, tuple)):
        raise DataError(f"row {row_index}: field {name!r} holds {_short(value)} ({type(value).__name__}), not a "
                        f"list: token classification reads one list entry per word (e.g. [\"John\", \"lives\"]); "
                        f"fix the data, or set data.{key}")
    return list(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


Scored = tuple[float, float, dict[str, np.ndarray], dict[str, np.ndarray]]
"""One evaluation batch: (loss sum, weight, per-row outputs as numpy, the host batch)."""


@dataclass(frozen=True)
class EvalTools:
    """What a task's evaluation may run, built by the caller around its model and weights.

    score(examples): the jitted evaluation pass (dropout off) over padded, fixed-size batches of the examples,
    one `Scored` per batch; outputs are `Task.eval_outputs` (or {'row_nll'} (B,) for a gathered causal-LM head).
    generate(rows): greedy/sampled continuations of the rows' prompts, decoded text.
    """

    score: Callable[[Sequence[Example]], Iterable[Scored]]
    generate: Callable[[Sequence[dict[str, Any]]], list[str]]


@dataclass
class Task:
    """Base: subclasses implement encode, loss and their evaluation (`eval_items`, `eval_metrics`)."""

    cfg: RunConfig
    tokenizer: Any
    labels: tuple[str, ...] | None = None
    metrics: tuple[str, ...] = field(default=())

    def encode(self, row: dict[str, Any], index: int) -> Example:
        """One data row -> an Example: its token ids plus the task's targets (`index`: the row's position, for
        error messages)."""
        raise NotImplementedError

    def loss(self, out: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """(sum of per-item losses, number of items) for a batch; the mean is their ratio."""
        raise NotImplementedError

    def eval_outputs(self, out: Any, batch: dict[str, Any]) -> dict[str, jax.Array]:
        """The small per-row arrays evaluation reads back (e.g. predicted labels), never full logits."""
        return {"pred": jnp.argmax(out.logits, axis=-1).astype(jnp.int32)}

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Model keyword inputs beyond ids and mask, from a batch: token_type_ids_bt (B, T) when it has them."""
        extra = {}
        if "token_type_ids" in batch:
            extra["token_type_ids_bt"] = batch["token_type_ids"]
        return extra

    def evaluate(self, rows: Sequence[dict[str, Any]], examples: Sequence[Example], tools: EvalTools
                 ) -> dict[str, float]:
        """{'eval_loss': weighted mean loss over the examples, **this task's metrics}: one pass of tools.score,
        each batch's real rows (weight > 0) handed to `eval_items`, then `eval_metrics` on all items."""
        total = count = 0.0
        items: list[Any] = []
        for s, n, outputs, batch in tools.score(examples):
            total, count = total + s, count + n
            items += self.eval_items(outputs, batch, np.nonzero(batch["example_weight"] > 0)[0])
        return {"eval_loss": total / max(count, 1.0), **self.eval_metrics(items, rows, tools)}

    def eval_items(self, outputs: dict[str, np.ndarray], batch: dict[str, np.ndarray], rows_kept: np.ndarray
                   ) -> list[Any]:
        """What the metrics need from one evaluation batch, one item per kept row (default: nothing)."""
        return []

    def eval_metrics(self, items: list[Any], rows: Sequence[dict[str, Any]], tools: EvalTools) -> dict[str, float]:
        """The task's metrics from all batches' items (default: none beyond the loss)."""
        return {}


class CausalLMTask(Task):
    """Supervised fine-tuning: prompt (+ chat template) then ' ' + response + EOS; loss on response and EOS."""

    def prompt_text(self, row: dict[str, Any], index: int) -> str:
        """The row's prompt, inside the tokenizer's chat template when data.prompt_format is 'chat'."""
        prompt = _text(row, self.cfg.data.prompt_field, index, "prompt_field")
        if self.cfg.data.prompt_format == "chat":
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return prompt

    def prompt_ids(self, row: dict[str, Any], index: int) -> list[int]:
        """Token ids of `prompt_text`, the tokenizer's special tokens included."""
        return self.tokenizer.encode(self.prompt_text(row, index))

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Also the prompt span (tokens before the first scored one): prefix hooks that pool (APT's gate) read
        only the prompt, so no position sees the response it is trained to predict."""
        extra = super().model_inputs(batch)
        if "loss_mask" in batch:
            prompt = jnp.cumsum(jnp.asarray(batch["loss_mask"]), axis=1) == 0
            extra["prompt_mask_bt"] = prompt & (jnp.asarray(batch["attention_mask"]) > 0)
        return extra

    def encode(self, row, index):
        p = self.prompt_ids(row, index)
        response = str(_field(row, self.cfg.data.response_field, index, "response_field"))
        sep = "" if self.cfg.data.prompt_format == "chat" else " "
        eos = self.tokenizer.eos_token_ids[0]
        a = self.tokenizer.encode(sep + response, add_special_tokens=False) + [eos]
        ids = p + a
        if len(ids) > self.cfg.data.max_length:
            if not self.cfg.data.truncate or len(p) >= self.cfg.data.max_length:
                _check_len(len(ids), self.cfg, index)
            ids = ids[: self.cfg.data.max_length]
        return {"input_ids": ids, "loss_mask": [0.0] * len(p) + [1.0] * (len(ids) - len(p))}

    def loss(self, out, batch):
        mask = batch["loss_mask"][:, 1:] * batch["example_weight"][:, None]
        return weighted_nll(out.logits[:, :-1], batch["input_ids"][:, 1:], mask)

    def scored_positions(self, batch: dict[str, Any], k: int) -> jax.Array:
        """(B, K) positions whose logits the loss needs (position p predicts token p + 1), scored ones first in
        order; rows with fewer than K fill up with unscored positions (weight 0 in `gathered_loss`)."""
        scored = jnp.asarray(batch["loss_mask"])[:, 1:] > 0
        order = jnp.argsort(~scored, axis=1, stable=True)  # scored positions first, each group in position order
        return order[:, :k].astype(jnp.int32)

    def _gathered(self, batch: dict[str, Any], positions_bk: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(targets (B, K), weights (B, K)) at positions_bk: loss mask times example weight."""
        targets = jnp.take_along_axis(jnp.asarray(batch["input_ids"])[:, 1:], positions_bk, axis=1)
        weights = jnp.take_along_axis(jnp.asarray(batch["loss_mask"])[:, 1:], positions_bk, axis=1)
        return targets, weights * jnp.asarray(batch["example_weight"])[:, None]

    def gathered_loss(self, out, batch: dict[str, Any], positions_bk: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`loss` from logits (B, K, V) computed only at positions_bk (see AdaptedModel.apply head_positions_bk);
        equal to the full loss when every scored position is among them."""
        return weighted_nll(out.logits, *self._gathered(batch, positions_bk))

    def chunked_row_loss(self, hidden_bkd: jax.Array, head: Any, batch: dict[str, Any], positions_bk: jax.Array,
                         chunk: int) -> tuple[jax.Array, jax.Array]:
        """(per-row weighted nll sums (B,), total weight): `gathered_loss` with the head run `chunk` positions at
        a time (`losses.chunked_row_nll`); hidden_bkd (B, K, D) are the final states at positions_bk and
        head(h (B, C, D)) -> (B, C, V) logits."""
        targets, weights = self._gathered(batch, positions_bk)
        return chunked_row_nll(hidden_bkd, head, targets, weights, chunk), jnp.sum(weights)

    def chunked_loss(self, hidden_bkd: jax.Array, head: Any, batch: dict[str, Any], positions_bk: jax.Array,
                     chunk: int) -> tuple[jax.Array, jax.Array]:
        """(loss sum, count) of `chunked_row_loss`."""
        rows, count = self.chunked_row_loss(hidden_bkd, head, batch, positions_bk, chunk)
        return jnp.sum(rows), count

    def references(self, row: dict[str, Any]) -> list[str]:
        """The row's reference texts for generation metrics: its 'references' list, else its response."""
        refs = row.get("references") or [row[self.cfg.data.response_field]]
        return [str(r) for r in refs]

    def eval_metrics(self, items, rows, tools):
        """Generation metrics (exact match, BLEU, ROUGE, ...) on the rows' continuations when
        generation.eval_generate is on."""
        if not self.cfg.generation.eval_generate:
            return {}
        texts = tools.generate(rows)
        return M.compute(self.metrics, predictions=texts, references=[self.references(r) for r in rows])


class MultipleChoiceTask(CausalLMTask):
    """Trained as causal LM on the correct response; evaluated by the summed log-probability of each choice."""

    def encode(self, row, index):
        """The correct choice as the response (the row's response_field when it has one)."""
        if row.get(self.cfg.data.response_field) is None:
            choices = _field(row, self.cfg.data.choices_field, index, "choices_field")
            row = {**row, self.cfg.data.response_field: choices[self.answer(row, index)]}
        return super().encode(row, index)

    def choice_examples(self, row: dict[str, Any], index: int) -> list[Example]:
        """One causal-LM Example per choice of the row: the prompt with that choice as the response."""
        choices = _field(row, self.cfg.data.choices_field, index, "choices_field")
        return [self.encode({**row, self.cfg.data.response_field: c}, index) for c in choices]

    def eval_metrics(self, items, rows, tools):
        """Accuracy: the choice with the highest summed log-probability of its tokens (scored on device; only
        each row's nll comes back) is the predicted answer."""
        flat, owner = [], []
        for i, row in enumerate(rows):
            for c, ex in enumerate(self.choice_examples(row, i)):
                flat.append(ex)
                owner.append((i, c))
        scores: list[float] = []
        for _, _, outputs, batch in tools.score(flat):
            scores += (-outputs["row_nll"])[batch["example_weight"] > 0].tolist()
        best: dict[int, tuple[float, int]] = {}
        for (i, c), score in zip(owner, scores):
            if i not in best or score > best[i][0]:
                best[i] = (score, c)
        return {"accuracy": float(np.mean([best[i][1] == self.answer(r, i) for i, r in enumerate(rows)]))}

    def answer(self, row: dict[str, Any], index: int) -> int:
        """The index of the row's correct choice (DataError when it is out of range)."""
        ans = _field(row, self.cfg.data.answer_field, index, "answer_field")
        if isinstance(ans, str) and ans.strip().isdigit() or isinstance(ans, float) and ans.is_integer():
            ans = int(ans)
        if isinstance(ans, bool) or not isinstance(ans, (int, np.integer)):
            raise DataError(f"row {index}: answer index {_short(ans)} ({type(ans).__name__}) is not an integer: "
                            f"make {self.cfg.data.answer_field!r} the 0-based index of the correct choice")
        n = len(_words(row, self.cfg.data.choices_field, index, "choices_field"))
        if not 0 <= ans < n:
            raise DataError(f"row {index}: answer index {ans} is out of range for {n} choices: use the 0-based "
                            "index of the correct choice, or fix the row's choices")
        return ans


class SeqClsTask(Task):
    """Sequence (pair) classification; decoders pool the last non-pad token, encoders use their head."""

    def encode(self, row, index):
        text = _text(row, self.cfg.data.text_field, index, "text_field")
        pair = row.get(self.cfg.data.text_pair_field) if self.cfg.data.text_pair_field else None
        if pair is not None:
            pair = _text(row, self.cfg.data.text_pair_field, index, "text_pair_field")
        enc = self.tokenizer.tokenizer.encode(text, pair) if pair is not None else self.tokenizer.tokenizer.encode(text)
        ids, types = enc.ids, enc.type_ids
        if len(ids) > self.cfg.data.max_length:
            if not self.cfg.data.truncate:
                _check_len(len(ids), self.cfg, index)
            ids, types = ids[: self.cfg.data.max_length], types[: self.cfg.data.max_length]
        label = _field(row, self.cfg.data.label_field, index, "label_field")
        if isinstance(label, str):
            if label not in (self.labels or ()):
                raise DataError(f"row {index}: label {label!r} is not one of {self.labels}: add it to data.labels "
                                "(or labels.json), or fix the row")
            label = self.labels.index(label)
        if isinstance(label, float) and label.is_integer():
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise DataError(f"row {index}: label {_short(label)} ({type(label).__name__}) is neither a label name nor "
                            f"an index; a label is a name from data.labels {self.labels} or its index: fix the row, "
                            "or set data.label_field")
        n = len(self.labels) if self.labels else None
        if n is not None and not 0 <= int(label) < n:
            raise DataError(f"row {index}: label {label} is out of range for {n} labels {self.labels}: labels are "
                            f"indices 0..{n - 1} into data.labels (or labels.json); add the missing label names, or "
                            "fix the row")
        ex: Example = {"input_ids": ids, "label": int(label)}
        if any(types):
            ex["token_type_ids"] = types
        return ex

    def loss(self, out, batch):
        return weighted_nll(out.logits, batch["label"], batch["example_weight"])

    def eval_items(self, outputs, batch, rows_kept):
        return list(zip(outputs["pred"][rows_kept].tolist(), batch["label"][rows_kept].tolist()))

    def eval_metrics(self, items, rows, tools):
        preds, gold = [p for p, _ in items], [g for _, g in items]
        return M.compute(self.metrics, preds=preds, labels=gold)


class TokenClsTask(Task):
    """BIO NER: the label of each word sits on its first sub-token; other sub-tokens are ignored (-100)."""

    def encode(self, row, index):
        words = _words(row, self.cfg.data.tokens_field, index, "tokens_field")
        tags = _words(row, self.cfg.data.tags_field, index, "tags_field")
        if not all(isinstance(w, str) for w in words):
            raise DataError(f"row {index}: field {self.cfg.data.tokens_field!r} holds non-text entries "
                            f"({_short(words)}): every word must be a string; fix the row")
        if len(words) != len(tags):
            raise DataError(f"row {index}: {len(words)} tokens but {len(tags)} tags: give one tag per word; fix the "
                            "row")
        enc = self.tokenizer.tokenizer.encode(words, is_pretokenized=True)
        labels, seen = [], set()
        for wid in enc.word_ids:
            if wid is None or wid in seen:
                labels.append(-100)
            else:
                seen.add(wid)
                tag = tags[wid]
                if tag not in self.labels:
                    raise DataError(f"row {index}: tag {tag!r} is not in the label set {self.labels}: add it to "
                                    "data.labels (or labels.json), or fix the row")
                labels.append(self.labels.index(tag))
        ids = enc.ids
        if len(ids) > self.cfg.data.max_length:
            if not self.cfg.data.truncate:
                _check_len(len(ids), self.cfg, index)
            ids, labels = ids[: self.cfg.data.max_length], labels[: self.cfg.data.max_length]
        return {"input_ids": ids, "labels": labels, "num_words": len(words)}

    def loss(self, out, batch):
        labels = batch["labels"]
        valid = (labels >= 0) * batch["example_weight"][:, None]
        return weighted_nll(out.logits, jnp.maximum(labels, 0), valid)

    def word_tags(self, labels_t: np.ndarray, pred_t: np.ndarray) -> tuple[list[str], list[str]]:
        """(predicted tags, gold tags) of one row's words, read at the positions with a label >= 0 (T,)."""
        keep = labels_t >= 0
        return ([self.labels[i] for i in pred_t[keep]], [self.labels[i] for i in labels_t[keep]])

    def eval_items(self, outputs, batch, rows_kept):
        return [self.word_tags(batch["labels"][i], outputs["pred"][i]) for i in rows_kept]

    def eval_metrics(self, items, rows, tools):
        return M.compute(self.metrics, pred_tags=[p for p, _ in items], gold_tags=[g for _, g in items])


TASKS = {"causal_lm": CausalLMTask, "seq_cls": SeqClsTask, "token_cls": TokenClsTask,
         "multiple_choice": MultipleChoiceTask}


def make_task(cfg: RunConfig, tokenizer: Any, labels: Sequence[str] | None) -> Task:
    """The Task for cfg.model.task, with the label names and cfg.metrics (default: the task's own metrics)."""
    metrics = cfg.metrics or DEFAULT_METRICS[cfg.model.task]
    return TASKS[cfg.model.task](cfg, tokenizer, tuple(labels) if labels else None, tuple(metrics))


def encode_rows(task: Task, rows: Sequence[dict[str, Any]]) -> list[Example]:
    """task.encode of every row, in order."""
    return [task.encode(r, i) for i, r in enumerate(rows)]
