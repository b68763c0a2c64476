"""Run configs: every bad config raises ConfigError naming the offending key as a dotted path; valid YAML maps
one to one onto RunConfig; `--set` overrides."""
from __future__ import annotations

import copy

import pytest
import yaml

from jaxpeft.train.config import ConfigError, RunConfig, dump_config, load_config

BASE = {"model": {"checkpoint": "some/folder"},
        "data": {"path": "bundled:arithmetic", "max_length": 32, "buckets": [16, 32]}}


def with_(patch: dict) -> dict:
    """BASE with `patch` merged in; keys are dotted paths ('train.steps') or section names."""
    raw = copy.deepcopy(BASE)
    for key, value in patch.items():
        *parents, last = key.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return raw


def config_error(source, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(source, overrides)
    return str(info.value)


# (patch, text that must appear in the message: the dotted key, plus what the fix is about)
BAD = {
    "unknown top-level section": ({"trainer": {"steps": 3}}, ["trainer", "did you mean 'train'"]),
    "unknown key in a section": ({"train.stpes": 3}, ["train.stpes", "did you mean 'steps'"]),
    "unknown key in optim": ({"optim.learning_rate": 1e-3}, ["optim.learning_rate", "unknown key"]),
    "string for int": ({"train.steps": "ten"}, ["train.steps", "integer"]),
    "fraction for int": ({"train.batch_size": 2.5}, ["train.batch_size", "integer"]),
    "negative lr": ({"optim.lr": -1e-3}, ["optim.lr", "greater than 0"]),
    "zero steps": ({"train.steps": 0}, ["train.steps", "greater than 0"]),
    "zero max_length": ({"data.max_length": 0}, ["data.max_length"]),
    "buckets not increasing": ({"data.buckets": [32, 16]}, ["data.buckets", "increasing"]),
    "buckets neither lengths nor auto": ({"data.buckets": "fine"}, ["data.buckets", "auto"]),
    "top_p above 1": ({"generation.top_p": 1.5}, ["generation.top_p", "less than or equal to 1"]),
    "negative temperature": ({"generation.temperature": -0.5}, ["generation.temperature"]),
    "b2 of 1": ({"optim.b2": 1.0}, ["optim.b2"]),
    "unknown task": ({"model.task": "seqcls"}, ["model.task", "seq_cls"]),
    "unknown optimizer": ({"optim.optimizer": "sgd"}, ["optim.optimizer", "adamw"]),
    "bad best_mode": ({"train.best_mode": "maximize"}, ["train.best_mode"]),
    "missing checkpoint": ({"model": {"task": "causal_lm"}}, ["model.checkpoint", "missing"]),
    "section not a mapping": ({"train": 5}, ["train"]),
    "unknown adapter method": ({"adapter.method": "lorra"}, ["adapter.method", "did you mean 'lora'"]),
    "unknown adapter option": ({"adapter.rank": 8}, ["adapter.rank", "not a lora option", "'r'"]),
    "misspelt adapter option": ({"adapter.lora_alpa": 8}, ["adapter.lora_alpa", "did you mean 'lora_alpha'"]),
    "adapter option wrong type": ({"adapter.r": "8"}, ["adapter.r", "expected int"]),
    "adapter option float for int": ({"adapter.r": 8.0}, ["adapter.r", "expected int"]),
    "adapter option for another method": ({"adapter.method": "ia3", "adapter.r": 8}, ["adapter.r", "ia3"]),
    "zero mesh size": ({"mesh.fsdp": 0}, ["mesh.fsdp", "-1 for the devices"]),
    "rule onto no mesh axis": ({"mesh.rules": {"embed": "model"}}, ["mesh.rules", "data, fsdp or tensor"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_config_names_the_key(name):
    patch, needles = BAD[name]
    msg = config_error(with_(patch))
    for needle in needles:
        assert needle in msg, f"{name}: {needle!r} not in {msg!r}"


# Errors from cross-field checks: pydantic reports them at the section ('train', 'data'), not at the field.
CROSS_FIELD = {
    "batch_size not divisible by grad_accum": ({"train.batch_size": 6, "train.grad_accum": 4},
                                               ["train.grad_accum", "divisible"]),
    "largest bucket below max_length": ({"data.buckets": [16], "data.max_length": 32},
                                        ["data.buckets", "max_length"]),
    "adapter value out of range": ({"adapter.lora_dropout": 1.5}, ["adapter.lora_dropout", "[0, 1)"]),
}


@pytest.mark.parametrize("name", list(CROSS_FIELD))
def test_cross_field_errors_mention_both_fields(name):
    patch, needles = CROSS_FIELD[name]
    msg = config_error(with_(patch))
    key = needles[0].rsplit(".", 1)[-1]
    assert key in msg and needles[1] in msg, msg


@pytest.mark.parametrize("name", list(CROSS_FIELD))
def test_cross_field_errors_name_the_dotted_key(name):
    patch, needles = CROSS_FIELD[name]
    assert needles[0] in config_error(with_(patch))


@pytest.mark.parametrize("value", [True, "5"])
def test_numbers_are_strict_like_the_adapter_section(value):
    assert "train.steps" in config_error(with_({"train.steps": value}))


def test_several_errors_are_all_reported():
    msg = config_error(with_({"train.steps": 0, "optim.lr": -1.0, "train.nope": 1}))
    for key in ("train.steps", "optim.lr", "train.nope"):
        assert key in msg


def test_bad_yaml_syntax_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  checkpoint: [unclosed\ntrain:\n  steps: 3\n")
    msg = config_error(path)
    assert str(path) in msg and "YAML" in msg


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- data\n")
    assert "mapping" in config_error(path)


def test_missing_file():
    assert "not found" in config_error("/nonexistent/config.yaml")


def test_set_without_equals():
    msg = config_error(with_({}), ["train.steps"])
    assert "train.steps" in msg and "key=value" in msg


def test_set_overrides_are_validated_and_named():
    assert "optim.lr" in config_error(with_({}), ["optim.lr=abc"])
    assert "train.stesp" in config_error(with_({}), ["train.stesp=5"])
    assert "nosuch" in config_error(with_({}), ["nosuch.key=1"])


def test_set_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(with_({"train.steps": 100})))
    cfg = load_config(path, ["train.steps=5", "optim.lr=3e-4", "adapter.r=4", "data.buckets=[8, 32]",
                             "optim.clip_norm=null", "train.output_dir=runs/x=y"])
    assert cfg.train.steps == 5 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 3e-4
    assert cfg.adapter_config().r == 4
    assert cfg.data.buckets == (8, 32)
    assert cfg.optim.clip_norm is None
    assert cfg.train.output_dir == "runs/x=y"  # only the first '=' splits
    assert load_config(path).train.steps == 100  # the file itself is untouched


def test_exponent_floats_without_a_dot_work(tmp_path):
    """YAML 1.1 reads `1e-3` (no dot) as a string; a learning rate written that way must still load."""
    path = tmp_path / "c.yaml"
    path.write_text("model: {checkpoint: x}\ndata: {path: d}\noptim:\n  lr: 1e-3\n  weight_decay: 1e-2\n")
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == "1e-3"
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 1e-2
    assert load_config(path, ["optim.lr=5e-4"]).optim.lr == 5e-4


def test_exponent_floats_without_a_dot_work_in_the_adapter_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {checkpoint: x}\ndata: {path: d}\nadapter:\n  method: lora\n  lora_dropout: 5e-2\n")
    assert load_config(path).adapter_config().lora_dropout == 0.05


def test_dict_source_is_not_mutated():
    raw = with_({"train.steps": 7})
    before = copy.deepcopy(raw)
    load_config(raw, ["train.steps=3", "optim.lr=0.5"])
    assert raw == before


def test_valid_yaml_maps_one_to_one(tmp_path):
    raw = with_({
        "model.task": "causal_lm", "model.remat": "full", "model.dtype": "bfloat16",
        "adapter": {"method": "lora", "r": 4, "lora_alpha": 16, "lora_dropout": 0.05,
                    "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"q_proj": 8}},
        "data.prompt_format": "chat", "data.truncate": True, "data.max_train_rows": 10,
        "optim": {"optimizer": "adafactor", "lr": 0.01, "schedule": "cosine", "warmup_steps": 3,
                  "clip_norm": None},
        "train": {"steps": 9, "batch_size": 6, "grad_accum": 3, "seed": 11, "output_dir": "runs/t",
                  "best_metric": "exact_match", "best_mode": "max", "resume": False},
        "generation": {"max_new_tokens": 5, "temperature": 0.7, "top_k": 5, "top_p": 0.9},
        "metrics": ["exact_match", "bleu"],
    })
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # every key of the YAML lands on the field of the same name
    assert cfg.model.remat == "full" and cfg.model.dtype == "bfloat16"
    assert cfg.data.prompt_format == "chat" and cfg.data.truncate and cfg.data.max_train_rows == 10
    assert cfg.data.buckets == (16, 32)
    assert cfg.optim.optimizer == "adafactor" and cfg.optim.clip_norm is None and cfg.optim.warmup_steps == 3
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seed) == (9, 6, 3, 11)
    assert cfg.train.best_mode == "max" and cfg.train.resume is False
    assert cfg.generation.top_k == 5 and cfg.generation.top_p == 0.9
    assert cfg.metrics == ("exact_match", "bleu")
    lora = cfg.adapter_config()
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (4, 16, 0.05)
    assert lora.target_modules == ("q_proj", "v_proj") and dict(lora.rank_pattern) == {"q_proj": 8}

    # dump -> load gives an equal config, and dumping that again gives the same text
    text = dump_config(cfg)
    again_path = tmp_path / "again.yaml"
    again_path.write_text(text)
    again = load_config(again_path)
    assert again == cfg
    assert again.adapter_config() == lora
    assert dump_config(again) == text
    # the dump names every section and key explicitly (defaults included)
    dumped = yaml.safe_load(text)
    assert set(dumped) == {"model", "adapter", "data", "optim", "train", "generation", "mesh", "metrics"}
    assert dumped["mesh"] == {"data": -1, "fsdp": 1, "tensor": 1, "rules": None}
    assert dumped["train"]["eval_every"] == 50 and dumped["adapter"]["method"] == "lora"


def test_defaults_are_valid_and_minimal_config_loads():
    cfg = load_config({"model": {"checkpoint": "x"}, "data": {"path": "d"}})
    assert cfg.model.task == "causal_lm" and cfg.adapter.method == "lora"
    assert cfg.data.buckets == "auto" and cfg.data.bucket_multiple == 8  # planned from the data, max_length last
    assert cfg.train.batch_size % cfg.train.grad_accum == 0


def test_config_is_frozen():
    cfg = load_config(with_({}))
    with pytest.raises(Exception):
        cfg.train.steps = 3  # type: ignore[misc]


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    from jaxpeft.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(with_({"train.stpes": 3})))
    for verb in (["train"], ["eval"], ["export", "--out", str(tmp_path / "x")]):
        assert main([verb[0], str(path), *verb[1:]]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "train.stpes" in err and "Traceback" not in err
    assert main(["train", str(path), "--set", "train.stpes"]) == 2
    assert "key=value" in capsys.readouterr().err
