"""A smoke-sized run of configs/quickstart.yaml on the real SmolLM2 weights and the bundled data."""
import json
from pathlib import Path

import pytest

from jaxpeft.train import load_config, run

pytestmark = pytest.mark.real_weights
ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_config_smoke_run_trains_evaluates_and_exports_peft(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config's data path is relative to the repo root, as in the README
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        "train.steps=4", "train.eval_every=4", "train.checkpoint_every=2", "data.max_eval_rows=16",
        "data.max_train_rows=64", "train.eval_batch_size=16", f"train.output_dir={tmp_path / 'run'}",
        "generation.show_examples=2"])
    result = run(cfg, verbose=False)
    assert set(result.metrics_before) == set(result.metrics_after) == {"eval_loss", "exact_match"}
    assert result.metrics_after["eval_loss"] < result.metrics_before["eval_loss"]
    adapter = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 8
    assert (result.adapter_dir / "adapter_model.safetensors").stat().st_size > 0
    assert len(result.generations) == 2
    run_dir = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "eval_metrics.png"):
        assert (run_dir / name).exists(), name
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
