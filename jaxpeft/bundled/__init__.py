"""The small datasets that ship inside the package, one folder each with its README.md (source, license) and
info.json (provenance): `dataset_path(name)` gives the folder; a run config says `data.path: bundled:NAME`.

Imports the standard library only.
"""
from __future__ import annotations

from pathlib import Path

PREFIX = "bundled:"
_HERE = Path(__file__).resolve().parent


def names() -> tuple[str, ...]:
    """The bundled datasets' names (e.g. 'arithmetic', 'sentiment', 'twitter_ner', 'e2e_nlg')."""
    return tuple(sorted(p.name for p in _HERE.iterdir() if (p / "info.json").exists()))


def dataset_path(name: str) -> Path:
    """The folder of a bundled dataset (its `<split>.jsonl` files, labels.json for classification)."""
    folder = _HERE / name
    if not (folder / "info.json").exists():
        raise KeyError(f"no bundled dataset {name!r}; bundled: {', '.join(names())}")
    return folder


def resolve(path: str) -> str:
    """`bundled:NAME` -> that dataset's folder; any other data path unchanged."""
    return str(dataset_path(path[len(PREFIX):])) if path.startswith(PREFIX) else path


__all__ = ["PREFIX", "names", "dataset_path", "resolve"]
