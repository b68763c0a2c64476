"""Probes of trained adapters: APT's gates as a diagnostic (per-layer statistics, a heatmap) and as a guide
(per-layer prefix lengths for P-tuning v2, the paper's PT-2*); IMSM's gate (histograms on prompt and response).

Imports jax/numpy, jaxpeft.adapters and sibling train modules; matplotlib only when drawing (Agg canvas).
Gate values come from the model's own forward (`AdaptedModel.apply(capture=True)`: the method records them
where it computes them, under scan, one row per layer).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxpeft.adapters import AdaptedModel
from jaxpeft.adapters.method import method_for

GATES_JSON, GATES_PNG = "gates.json", "gates.png"


def has_gates(model: AdaptedModel) -> bool:
    """Whether an adapter of the model has gates to probe (APT)."""
    return any(hasattr(method_for(s.config), "gates") for s in model.adapters)


def _find(tree: Any, suffix: str) -> list[np.ndarray]:
    out = []
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            if isinstance(k, str) and k.endswith(suffix):
                out.extend(np.asarray(x) for x in (v if isinstance(v, tuple) else (v,)))
            else:
                out.extend(_find(v, suffix))
    return out


def gate_statistics(model: AdaptedModel, frozen: Any, state: Any, batches: Iterable[dict[str, np.ndarray]],
                    model_inputs: Any = None, name: str = "default") -> dict[str, Any]:
    """Mean token gate per layer and prefix slot over the rows of `batches` (rows with example_weight 0 are
    skipped), and lambda per layer.

    Returns {"mean_token_gate": (L, l) list, "lambda": (L,) list, "effective": (L,) lambda * mean gate over the
    layer's real slots (0 for layers without a prefix), "layers_used": selected layers, "rows": n}.
    """
    def probe(state, batch):
        extra = model_inputs(batch) if model_inputs is not None else {}
        _, captured = model.apply(frozen, state, batch["input_ids"], batch["attention_mask"], active=name,
                                  capture=True, **extra)
        return captured

    fn = jax.jit(probe)
    total, rows, lam = None, 0, None
    for batch in batches:
        captured = fn(state, batch)
        alpha = _find(captured, f"{name}:token_gate")
        lams = _find(captured, f"{name}:lambda")
        keep = np.asarray(batch.get("example_weight", np.ones(batch["input_ids"].shape[0]))) > 0
        if alpha:
            a = alpha[0]  # (L, B, l)
            part = a[:, keep].sum(axis=1)
            total = part if total is None else total + part
        if lams:
            lam = np.asarray(lams[0]).reshape(-1)
        rows += int(keep.sum())
    spec = model.spec(name)
    cfg = spec.config
    site = spec.hooks[0]
    method = method_for(cfg)
    lengths = method.layer_lengths(cfg, site) if hasattr(method, "layer_lengths") else (method.num_slots(cfg),)
    n_layers, l = site.num_layers, method.num_slots(cfg)
    mean = (total / max(rows, 1)) if total is not None else np.ones((n_layers, l))
    lam = lam if lam is not None else np.ones((n_layers,))
    slot_mask = np.arange(l)[None, :] < np.asarray(lengths)[:, None]
    per_layer = np.where(slot_mask, mean, 0).sum(1) / np.maximum(slot_mask.sum(1), 1)
    used = np.zeros((n_layers,), bool)
    used[list(site.layers) if site.layered else slice(None)] = True
    per_layer = np.where(used, per_layer, 0.0)  # a layer without a prefix has no effective gate
    return {"mean_token_gate": mean.tolist(), "lambda": lam.tolist(), "effective": (lam * per_layer).tolist(),
            "layers_used": list(site.layers), "prefix_lengths": list(lengths), "rows": rows}


def write_gate_report(stats: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """gates.json and gates.png (heatmap of lambda * token gate per layer and slot, and lambda per layer)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / GATES_JSON).write_text(json.dumps(dict(stats), indent=2) + "\n")
    mean = np.asarray(stats["mean_token_gate"])
    lam = np.asarray(stats["lambda"])
    fig = Figure(figsize=(8, 0.35 * mean.shape[0] + 2))
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [4, 1]})
    im = ax.imshow(lam[:, None] * mean, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xlabel("prefix slot")
    ax.set_ylabel("layer")
    ax.set_title("APT: lambda x mean token gate")
    fig.colorbar(im, ax=ax)
    bx.barh(np.arange(len(lam)), lam)
    bx.set_ylim(-0.5, len(lam) - 0.5)
    bx.set_title("lambda")
    fig.tight_layout()
    fig.savefig(out / GATES_PNG, dpi=100)
    return {"json": out / GATES_JSON, "png": out / GATES_PNG}


def _eval_inputs(ctx: Any, trainable: Any) -> tuple[dict[str, Any], Iterable[dict[str, np.ndarray]]]:
    """(adapter state, evaluation batches) of a run context, for the probes."""
    from jaxpeft.train.data import eval_batches

    pad = ctx.pretrained.tokenizer.pad_token_id or 0
    state = {"trainable": trainable, "extras": ctx.state["extras"]}
    return state, eval_batches(ctx.eval_examples, ctx.cfg.train.eval_batch_size, ctx.buckets, pad)


def gate_report(ctx: Any, trainable: Any, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Gate statistics of a run's adapter on its evaluation split, written into the run directory."""
    state, batches = _eval_inputs(ctx, trainable)
    name = next(s.name for s in ctx.model.adapters if hasattr(method_for(s.config), "gates"))
    stats = gate_statistics(ctx.model, ctx.pretrained.params, state, batches, ctx.task.model_inputs, name)
    return write_gate_report(stats, out_dir)


def prefix_lengths_from_gates(stats: Mapping[str, Any], max_length: int | None = None, min_length: int = 1
                              ) -> tuple[int, ...]:
    """Per-layer prefix lengths for P-tuning v2 from learned gates (PT-2*): the layer with the largest effective
    gate (lambda x mean token gate) keeps `max_length` (default: the APT run's longest prefix), every other layer
    a proportional share, rounded, at least `min_length`."""
    eff = np.abs(np.asarray(stats["effective"], np.float64))
    top = max_length or max(stats.get("prefix_lengths") or [len(stats["mean_token_gate"][0])])
    if eff.max() <= 0:
        return (top,) * len(eff)
    return tuple(int(max(min_length, round(top * e / eff.max()))) for e in eff)


# ---------------------------------------------------------------------------------------------- IMSM's gate

SIAMESE_JSON, SIAMESE_PNG = "imsm_gates.json", "imsm_gates.png"
_BINS = np.linspace(0.0, 1.0, 51)


def has_siamese_gate(model: AdaptedModel) -> bool:
    """Whether an adapter mixes two streams with a learned gate (IMSM with use_gate)."""
    return any(s.wrapper is not None and getattr(s.wrapper, "use_gate", False) for s in model.adapters)


def siamese_gate_statistics(model: AdaptedModel, frozen: Any, state: Any, batches: Iterable[dict[str, np.ndarray]],
                            model_inputs: Any = None, name: str = "default") -> dict[str, Any]:
    """Histograms (50 bins on [0, 1]) of the gate g (the base stream's weight, per position and dimension) over
    the real tokens of `batches`, apart for prompt and response positions (teacher forcing), with mean and std."""
    def probe(state, batch):
        extra = model_inputs(batch) if model_inputs is not None else {}
        _, captured = model.apply(frozen, state, batch["input_ids"], batch["attention_mask"], active=name,
                                  capture=True, **extra)
        return captured["probes"][f"{name}:gate"], extra.get("prompt_mask_bt")

    fn = jax.jit(probe)
    acc = {part: {"counts": np.zeros(len(_BINS) - 1, np.int64), "sum": 0.0, "sq": 0.0, "n": 0}
           for part in ("prompt", "response")}
    for batch in batches:
        g, prompt = fn(state, batch)
        g = np.asarray(g, np.float64)  # (B, T, D)
        real = np.asarray(batch["attention_mask"]) > 0
        real &= (np.asarray(batch.get("example_weight", np.ones(real.shape[0]))) > 0)[:, None]
        prompt = np.zeros_like(real) if prompt is None else np.asarray(prompt, bool)
        for part, where in (("prompt", real & prompt), ("response", real & ~prompt)):
            vals = g[where].reshape(-1)
            a = acc[part]
            a["counts"] += np.histogram(vals, _BINS)[0]
            a["sum"] += float(vals.sum())
            a["sq"] += float((vals ** 2).sum())
            a["n"] += vals.size
    out: dict[str, Any] = {"bins": _BINS.tolist()}
    for part, a in acc.items():
        mean = a["sum"] / max(a["n"], 1)
        out[part] = {"counts": a["counts"].tolist(), "values": a["n"], "mean": mean,
                     "std": float(np.sqrt(max(a["sq"] / max(a["n"], 1) - mean ** 2, 0.0)))}
    return out


def write_siamese_gate_report(stats: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """imsm_gates.json and imsm_gates.png (the gate's histogram on prompt and on response positions)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SIAMESE_JSON).write_text(json.dumps(dict(stats), indent=2) + "\n")
    fig = Figure(figsize=(7, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    bins = np.asarray(stats["bins"])
    for part in ("prompt", "response"):
        counts = np.asarray(stats[part]["counts"], np.float64)
        if counts.sum():
            ax.stairs(counts / counts.sum(), bins, label=f"{part} (mean {stats[part]['mean']:.3f})")
    ax.set_xlabel("gate g (weight of the base model's hidden state)")
    ax.set_ylabel("fraction of values")
    ax.set_title("IMSM gate on the evaluation split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / SIAMESE_PNG, dpi=100)
    return {"json": out / SIAMESE_JSON, "png": out / SIAMESE_PNG}


def siamese_gate_report(ctx: Any, trainable: Any, out_dir: str | os.PathLike) -> dict[str, Path]:
    """IMSM gate statistics of a run's adapter on its evaluation split, written into the run directory."""
    state, batches = _eval_inputs(ctx, trainable)
    name = next(s.name for s in ctx.model.adapters if s.wrapper is not None)
    stats = siamese_gate_statistics(ctx.model, ctx.pretrained.params, state, batches, ctx.task.model_inputs, name)
    return write_siamese_gate_report(stats, out_dir)
