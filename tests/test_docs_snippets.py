"""The code in README.md and docs/ runs: every ```python block of a page is executed in order in one namespace,
and every YAML config in docs/tasks.md trains two steps and evaluates on the JSONL rows shown above it (written
to a temporary folder), so the pages cannot rot. A block whose first line is `# not run: <why>` is skipped."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)
PAGES_WITH_PYTHON = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
                     if any(k == "python" for k, _ in FENCE.findall(p.read_text()))]


def _blocks(page: Path, kind: str) -> list[str]:
    return [code for k, code in FENCE.findall(page.read_text()) if k == kind and not code.startswith("# not run:")]


@pytest.mark.real_weights
@pytest.mark.parametrize("page", PAGES_WITH_PYTHON, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_of_the_page_run_in_order(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a snippet writes lands in a temporary folder
    namespace: dict = {"__name__": "__snippet__"}
    for i, code in enumerate(_blocks(page, "python")):
        try:
            exec(compile(code, f"{page.name}[python block {i}]", "exec"), namespace)
        except Exception as e:  # noqa: BLE001 - name the block that broke
            raise AssertionError(f"{page.relative_to(ROOT)}, python block {i} failed: {type(e).__name__}: {e}\n"
                                 f"{code}") from e


def _task_examples() -> list[tuple[str, list[dict], dict]]:
    """(task, JSONL rows, YAML config) for each section of docs/tasks.md: the json block right before a yaml one."""
    out, rows = [], None
    for kind, code in FENCE.findall((ROOT / "docs" / "tasks.md").read_text()):
        if kind == "json":
            rows = [json.loads(line) for line in code.splitlines() if line.strip()]
        elif kind == "yaml":
            cfg = yaml.safe_load(code)
            assert rows, "each YAML config in docs/tasks.md follows its JSONL rows"
            out.append((cfg["model"]["task"], rows, cfg))
            rows = None
    return out


EXPECTED_METRIC = {"causal_lm": "exact_match", "seq_cls": "accuracy", "token_cls": "span_f1",
                   "multiple_choice": "accuracy"}


def test_tasks_page_shows_every_task_including_text_pairs_and_multiple_choice():
    examples = _task_examples()
    assert {t for t, _, _ in examples} == set(EXPECTED_METRIC)
    assert any(cfg["data"].get("text_pair_field") for _, _, cfg in examples)


@pytest.mark.slow
@pytest.mark.real_weights
@pytest.mark.parametrize("example", _task_examples(), ids=lambda e: e[0])
def test_task_config_snippet_trains_and_evaluates_on_its_rows(example, tmp_path):
    from jaxpeft.train import run

    task, rows, cfg = example
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = json.loads(json.dumps(cfg))
    cfg["data"]["path"] = str(data)
    cfg["train"].update(steps=2, eval_every=2, checkpoint_every=2, output_dir=str(tmp_path / "run"))
    result = run(cfg, verbose=False)
    assert EXPECTED_METRIC[task] in result.metrics_after, result.metrics_after
    assert (result.adapter_dir / "adapter_config.json").exists()
