"""docs/reference.md (the CLI and YAML reference) is exactly what `python -m jaxpeft.reference` generates now, and
every run-config key in it has a meaning."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_committed_reference_is_not_stale():
    from jaxpeft.reference import reference

    assert (ROOT / "docs" / "reference.md").read_text() == reference(), \
        "docs/reference.md is stale: run `python -m jaxpeft.reference > docs/reference.md`"


def test_every_run_config_key_has_a_description():
    from pydantic import BaseModel

    from jaxpeft.train.config import RunConfig

    missing = [name for name, f in RunConfig.model_fields.items() if not f.description]
    for name, f in RunConfig.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            missing += [f"{name}.{k}" for k, sf in f.annotation.model_fields.items() if not sf.description]
    assert not missing, f"config keys without a docstring: {missing}"


def test_reference_covers_every_cli_verb_and_adapter_method():
    from jaxpeft.adapters import METHODS

    text = (ROOT / "docs" / "reference.md").read_text()
    for verb in ("download", "generate", "train", "eval", "export", "merge", "apt-to-pt2"):
        assert f"### `jaxpeft {verb}`" in text
    for method in METHODS:
        assert f"### `method: {method}`" in text
