"""Runs of the prefix family (prefix tuning, P-tuning v2, APT) through `jaxpeft.train` and the CLI.

* APT on the tiny BERT (sequence classification, the `classifier` head trained too) learns the synthetic labels,
  writes the jaxpeft adapter format and its gate report (gates.json / gates.png), and `evaluate` reproduces its
  final metrics from the exported folder and from the latest checkpoint.
* `jaxpeft apt-to-pt2 --train` turns that run's gates into per-layer prefix lengths (PT-2*) and trains the
  P-tuning v2 config; that run prints a trainable-parameter line counting the real prefix slots plus the head, and
  `jaxpeft export` of its checkpoint writes the same jaxpeft-format adapter as the run.
* Prefix tuning on the tiny llama exports the HF PEFT format; `jaxpeft generate --adapter` matches
  `generate_with_adapter`, and `--merge` is refused cleanly.
* APT on the tiny llama resumes bit-exactly after a SIGKILL (the approach of tests/train/test_run.py).
* `CausalLMTask.model_inputs` marks exactly the prompt tokens (what APT's gate pools over in decoders).
* Learned position tables (GPT-2, BERT) must hold data.max_length plus the prefix's position shift.

The runs are module-scoped and shared between tests: the whole module trains six tiny models.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

import train_procs as tp  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# the tiny BERT of tests/train/conftest.py: hidden 32, 4 heads of 8, 2 layers -> a prefix entry holds 32 keys
BERT_LAYERS, BERT_HIDDEN, BERT_D_KV = 2, 32, 32
CLS_LABELS = ["negative", "positive"]
HEAD_PARAMS = BERT_HIDDEN * len(CLS_LABELS) + len(CLS_LABELS)  # classifier kernel + bias
APT_SLOTS = 4
APT_STEPS = 80


# ------------------------------------------------------------------------------------------------ helpers

def _assert_same_metrics(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, v in got.items():
        assert v == pytest.approx(want[k], abs=1e-6), f"{k}: {v!r} != {want[k]!r}"


def _trainable_line(trainable: int, base: int) -> str:
    """PEFT's print_trainable_parameters line (all = base + trainable, as PEFT counts a modules_to_save copy)."""
    return (f"trainable params: {trainable:,d} || all params: {base + trainable:,d} || "
            f"trainable%: {100 * trainable / (base + trainable):.4f}")


def _bert_base_params(tiny_bert_dir: Path) -> int:
    """Frozen parameters of the tiny BERT with a new 2-label classifier."""
    return sum(int(np.prod(v.shape)) for v in load_file(str(tiny_bert_dir / "model.safetensors")).values()) \
        + HEAD_PARAMS


def _cls_rows(n: int, seed: int) -> list[dict]:
    """Balanced rows made only of sentiment words: learnable by a frozen random BERT's prefix + head."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(["good", "great"] if label else ["bad", "awful"]) for _ in range(rng.randrange(2, 6))]
        rows.append({"text": " ".join(words), "label": label})
    rng.shuffle(rows)
    return rows


def _bert_cls_config(tiny_bert_dir: Path, data_dir: Path, out_dir: Path, adapter: dict) -> dict:
    return {"model": {"checkpoint": str(tiny_bert_dir), "task": "seq_cls"},
            "adapter": adapter,
            "data": {"path": str(data_dir), "max_length": 16, "buckets": [16]},
            "optim": {"lr": 5e-2, "warmup_steps": 2},
            "train": {"steps": APT_STEPS, "batch_size": 8, "eval_every": 1000, "checkpoint_every": APT_STEPS // 2,
                      "keep_last": 2, "eval_batch_size": 16, "log_every": 10, "output_dir": str(out_dir),
                      "eval_before_training": True}}


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def cls_data(tmp_path_factory, write_jsonl) -> Path:
    folder = tmp_path_factory.mktemp("cls-data")
    write_jsonl(folder / "train.jsonl", _cls_rows(64, seed=0))
    write_jsonl(folder / "validation.jsonl", _cls_rows(16, seed=1))
    (folder / "labels.json").write_text(json.dumps(CLS_LABELS))
    return folder


@pytest.fixture(scope="module")
def apt_bert_run(tmp_path_factory, tiny_bert_dir, cls_data) -> dict:
    """APT (random token gates, so the heatmap has structure) + the classifier head, in-process."""
    from jaxpeft.train import run

    root = tmp_path_factory.mktemp("apt-bert")
    cfg = _bert_cls_config(tiny_bert_dir, cls_data, root / "run",
                           {"method": "apt", "num_virtual_tokens": APT_SLOTS, "gate_init": "normal",
                            "gate_init_std": 0.5, "modules_to_save": ["classifier"]})
    result = run(cfg, verbose=False)
    return dict(cfg=cfg, result=result, run_dir=root / "run", root=root)


@pytest.fixture(scope="module")
def pt2_star_run(apt_bert_run) -> dict:
    """`jaxpeft apt-to-pt2 RUN --out pt2star.yaml --set train.steps=2 --train` on the APT run, then
    `jaxpeft export pt2star.yaml` of the P-tuning v2 run's latest checkpoint."""
    root = apt_bert_run["root"]
    out_cfg = root / "pt2star.yaml"
    rc, stdout, stderr = tp.cli(["apt-to-pt2", apt_bert_run["run_dir"], "--out", out_cfg, "--output-dir",
                               root / "pt2star", "--set", "train.steps=2", "--set", "train.log_every=1", "--train"])
    assert rc == 0, stderr[-3000:]
    export = tp.cli(["export", out_cfg, "--out", root / "exported"])
    return dict(stdout=stdout, out_cfg=out_cfg, run_dir=root / "pt2star", export=export,
                exported=root / "exported")


@pytest.fixture(scope="module")
def prefix_llama_run(tmp_path_factory, build_config) -> dict:
    """Prefix tuning (PEFT-compatible) on the tiny llama's arithmetic data, in-process."""
    from jaxpeft.train import run

    root = tmp_path_factory.mktemp("prefix-llama")
    cfg = build_config({"train": {"steps": 6, "output_dir": str(root / "run")}})
    cfg["adapter"] = {"method": "prefix", "num_virtual_tokens": 4}  # replaced whole: no LoRA keys from the defaults
    return dict(cfg=cfg, result=run(cfg, verbose=False))


# ------------------------------------------------------------------------------------------------ APT on BERT

def test_apt_seq_cls_run_learns_the_synthetic_labels(apt_bert_run):
    before, after = apt_bert_run["result"].metrics_before, apt_bert_run["result"].metrics_after
    assert set(before) == set(after) == {"eval_loss", "accuracy", "macro_f1", "mcc"}
    assert before["accuracy"] <= 0.75, f"premise: the untrained head is near chance ({before})"
    assert after["eval_loss"] < 0.7 * before["eval_loss"], (before, after)
    assert after["accuracy"] >= 0.9 and after["accuracy"] > before["accuracy"], (before, after)
    losses = apt_bert_run["result"].train_losses
    assert [s for s, _ in losses] == list(range(1, APT_STEPS + 1)) and all(math.isfinite(v) for _, v in losses)


def test_apt_run_writes_jaxpeft_adapter_and_gate_report(apt_bert_run):
    run_dir = apt_bert_run["run_dir"]
    adapter = run_dir / "adapter"
    assert apt_bert_run["result"].adapter_dir == adapter
    meta = json.loads((adapter / "jaxpeft_adapter.json").read_text())
    assert meta["format"] == "jaxpeft-adapter" and meta["method"] == "apt" and meta["task"] == "seq_cls"
    assert meta["config"]["num_virtual_tokens"] == APT_SLOTS and meta["config"]["modules_to_save"] == ["classifier"]
    assert not (adapter / "adapter_config.json").exists(), "APT has no PEFT form: only the jaxpeft format"
    tensors = load_file(str(adapter / "adapter.safetensors"))
    assert {"trainable/saved/classifier/kernel", "trainable/saved/classifier/bias"} <= set(tensors)

    stats = json.loads((run_dir / "gates.json").read_text())
    gate = np.asarray(stats["mean_token_gate"])
    assert gate.shape == (BERT_LAYERS, APT_SLOTS)
    assert np.all((gate > 0) & (gate < 1)), "token gates are sigmoids"
    assert len(stats["lambda"]) == BERT_LAYERS
    assert stats["rows"] == 16 and stats["prefix_lengths"] == [APT_SLOTS] * BERT_LAYERS
    # the report describes the trained adapter: its lambdas are the exported ones, moved away from lambda_init 1
    (lam_key,) = [k for k in tensors if k.endswith("/lambda")]
    np.testing.assert_allclose(stats["lambda"], tensors[lam_key], rtol=0, atol=1e-7)
    assert not np.allclose(tensors[lam_key], 1.0)

    png = (run_dir / "gates.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 0 and height > 0
    assert png[-8:-4] == b"IEND", "the PNG is complete"


def test_apt_evaluate_from_adapter_and_from_checkpoint_reproduce_final_metrics(apt_bert_run):
    from jaxpeft.train import evaluate

    cfg, result = apt_bert_run["cfg"], apt_bert_run["result"]
    _assert_same_metrics(evaluate(cfg, adapter=str(result.adapter_dir)), result.metrics_after)
    _assert_same_metrics(evaluate(cfg), result.metrics_after)  # the latest checkpoint: the final step


# ------------------------------------------------------------------------------------------------ apt-to-pt2 (PT-2*)

def test_apt_to_pt2_writes_ptuning_v2_config_with_gate_derived_lengths_and_trains_it(apt_bert_run, pt2_star_run):
    from jaxpeft.train.probes import prefix_lengths_from_gates

    r = pt2_star_run
    expected = list(prefix_lengths_from_gates(json.loads((apt_bert_run["run_dir"] / "gates.json").read_text())))
    assert len(expected) == BERT_LAYERS and max(expected) == APT_SLOTS
    written = yaml.safe_load(r["out_cfg"].read_text())
    assert written["adapter"]["method"] == "ptuning_v2"
    assert written["adapter"]["prefix_lengths"] == expected
    assert written["adapter"]["modules_to_save"] == ["classifier"]
    assert not {"gate_init", "gate_init_std"} & set(written["adapter"]), "APT-only options do not carry over"
    assert written["train"]["steps"] == 2 and written["train"]["log_every"] == 1
    assert written["train"]["output_dir"] == str(r["run_dir"])
    assert written["model"]["checkpoint"] == apt_bert_run["cfg"]["model"]["checkpoint"]
    assert written["model"]["task"] == "seq_cls" and written["data"]["path"] == apt_bert_run["cfg"]["data"]["path"]
    assert f"per-layer prefix lengths {expected}" in r["stdout"]
    # --train ran it: two logged steps, and a P-tuning v2 adapter with those lengths
    losses = tp.train_losses(r["run_dir"])
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    meta = json.loads((r["run_dir"] / "adapter" / "jaxpeft_adapter.json").read_text())
    assert meta["method"] == "ptuning_v2" and meta["config"]["prefix_lengths"] == expected


# ------------------------------------------------------------------------------------------------ P-tuning v2

def test_ptuning_v2_run_prints_trainable_line_of_real_prefix_slots_plus_head(pt2_star_run, tiny_bert_dir):
    lengths = yaml.safe_load(pt2_star_run["out_cfg"].read_text())["adapter"]["prefix_lengths"]
    trainable = sum(lengths) * 2 * BERT_D_KV + HEAD_PARAMS
    lines = [ln for ln in pt2_star_run["stdout"].splitlines() if ln.startswith("trainable params:")]
    assert lines == [_trainable_line(trainable, _bert_base_params(tiny_bert_dir))]


@pytest.mark.parametrize("lengths", [[3, 1], [3, 0]])
def test_ptuning_v2_trainable_line_skips_padded_slots_of_shorter_layers(lengths, tiny_bert_dir, cls_data, tmp_path):
    """The line `jaxpeft train` prints, for per-layer lengths padded to the longest (a layer may have none)."""
    import jax

    from jaxpeft.adapters import AdaptedModel
    from jaxpeft.adapters.partition import trainable_parameters_line
    from jaxpeft.loading.pretrained import load_pretrained
    from jaxpeft.train.config import load_config

    cfg = load_config(_bert_cls_config(tiny_bert_dir, cls_data, tmp_path / "run",
                                       {"method": "ptuning_v2", "prefix_lengths": lengths,
                                        "modules_to_save": ["classifier"]}))
    pre = load_pretrained(tiny_bert_dir, task="seq_cls", num_labels=len(CLS_LABELS))
    model = AdaptedModel.wrap(pre.module).add("default", cfg.adapter_config())
    state = jax.eval_shape(lambda: model.init(jax.random.key(0), pre.params))  # counting needs shapes only
    assert state["extras"]["default"]["modules"], "premise: the prefix hooks were found"
    trainable = sum(lengths) * 2 * BERT_D_KV + HEAD_PARAMS
    assert trainable_parameters_line(model, state, pre.params) == \
        _trainable_line(trainable, _bert_base_params(tiny_bert_dir))


def test_ptuning_v2_run_and_cli_export_write_the_same_jaxpeft_adapter(pt2_star_run):
    adapter = pt2_star_run["run_dir"] / "adapter"
    rc, stdout, stderr = pt2_star_run["export"]
    assert rc == 0, stderr[-3000:]
    exported = pt2_star_run["exported"]
    assert stdout.strip() == str(exported)
    for folder in (adapter, exported):
        assert (folder / "jaxpeft_adapter.json").exists() and (folder / "adapter.safetensors").exists()
        assert not (folder / "adapter_config.json").exists(), "P-tuning v2 has no PEFT form"
    meta = json.loads((adapter / "jaxpeft_adapter.json").read_text())
    assert meta["format"] == "jaxpeft-adapter" and meta["method"] == "ptuning_v2"
    assert (exported / "jaxpeft_adapter.json").read_text() == (adapter / "jaxpeft_adapter.json").read_text()
    tp.assert_same_tensors(exported / "adapter.safetensors", adapter / "adapter.safetensors")


# ------------------------------------------------------------------------------------------------ prefix tuning

GEN_PROMPTS = ["What is 12 plus 7?\nA:", "Hi"]
GEN_NEW_TOKENS = 6


def test_prefix_tuning_run_exports_hf_peft_prefix_tuning(prefix_llama_run):
    adapter = prefix_llama_run["result"].adapter_dir
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PREFIX_TUNING" and saved["task_type"] == "CAUSAL_LM"
    assert saved["num_virtual_tokens"] == 4
    assert (adapter / "adapter_model.safetensors").exists()
    assert not (adapter / "jaxpeft_adapter.json").exists()
    losses = prefix_llama_run["result"].train_losses
    assert [s for s, _ in losses] == list(range(1, 7)) and all(math.isfinite(v) for _, v in losses)


def test_generate_cli_with_prefix_adapter_matches_generate_with_adapter(prefix_llama_run, tiny_llama_dir):
    from jaxpeft.adapters import AdaptedModel
    from jaxpeft.adapters.native_io import load_any
    from jaxpeft.loading.pretrained import load_pretrained
    from jaxpeft.train.loop import generate_with_adapter

    adapter = prefix_llama_run["result"].adapter_dir
    args = ["generate", tiny_llama_dir, "--adapter", adapter, "--max-new-tokens", GEN_NEW_TOKENS]
    for p in GEN_PROMPTS:
        args += ["--prompt", p]
    rc, stdout, stderr = tp.cli(args)
    assert rc == 0, stderr[-3000:]

    pre = load_pretrained(tiny_llama_dir)
    tok = pre.tokenizer
    model, state = load_any(AdaptedModel.wrap(pre.module), pre.params, adapter)
    outs = generate_with_adapter(model, pre.params, state, [tok.encode(p) for p in GEN_PROMPTS],
                                 max_new_tokens=GEN_NEW_TOKENS, eos_token_ids=tok.eos_token_ids,
                                 pad_token_id=tok.pad_token_id or 0)
    # the comparison means something: the adapted model produces real (non-special) tokens
    assert any(t not in tok.eos_token_ids for o in outs for t in o), outs
    assert stdout == "".join(tok.decode(o, skip_special_tokens=True) + "\n" for o in outs)


def test_generate_cli_refuses_to_merge_a_prefix_adapter_without_traceback(prefix_llama_run, tiny_llama_dir):
    adapter = prefix_llama_run["result"].adapter_dir
    # in-process: an exception escaping `main` (what prints a traceback) would fail this call itself
    rc, stdout, stderr = tp.cli(["generate", tiny_llama_dir, "--prompt", "Hi", "--adapter", adapter, "--merge",
                               "--max-new-tokens", 2])
    assert rc != 0
    assert stderr.startswith("error: ") and "cannot be merged" in stderr and "prefix" in stderr, stderr
    assert "Traceback" not in stderr + stdout
    assert stdout == ""


# ------------------------------------------------------------------------------------------------ APT resume

RESUME_STEPS, RESUME_KILL_AT, RESUME_EVERY = 10, 4, 2


@pytest.fixture(scope="module")
def apt_llama_resumed(tmp_path_factory, build_config, cli_env) -> dict:
    """APT on the tiny llama (random token gates, prefix dropout, attention dropout), `jaxpeft train` subprocesses:
    run B is SIGKILLed once its step-4 checkpoint is committed and restarted with the same command; run A, the
    same config uninterrupted, runs beside B's second attempt (and reuses B's first compilation through the
    session compilation cache)."""
    root = tmp_path_factory.mktemp("apt-resume")

    def config(name: str) -> Path:
        cfg = build_config({
            "data": {"max_eval_rows": 8},
            "optim": {"lr": 1e-2, "warmup_steps": 2, "schedule": "cosine"},
            "train": {"steps": RESUME_STEPS, "batch_size": 4, "checkpoint_every": RESUME_EVERY, "keep_last": 2,
                      "eval_every": 1000, "log_every": 1, "eval_batch_size": 8, "eval_before_training": False,
                      "output_dir": str(root / name), "seed": 3},
        })
        cfg["adapter"] = {"method": "apt", "num_virtual_tokens": APT_SLOTS, "gate_init": "normal",
                          "gate_init_std": 0.5, "prefix_dropout": 0.1}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    run_a, run_b = root / "a", root / "b"
    pair = tp.resumed_pair(root, config("a"), config("b"), cli_env, RESUME_KILL_AT)
    return dict(run_a=run_a, run_b=run_b, **pair)


def test_apt_resume_after_sigkill_is_bit_exact(apt_llama_resumed):
    r = apt_llama_resumed
    run_a, run_b = r["run_a"], r["run_b"]
    tp.assert_bit_exact_resume(run_a, run_b, r, RESUME_STEPS, RESUME_KILL_AT, RESUME_EVERY)
    assert sorted(tp.evals(run_a)) == [RESUME_STEPS] and "eval_loss" in tp.evals(run_a)[RESUME_STEPS]

    adapter_a, adapter_b = run_a / "adapter", run_b / "adapter"
    assert json.loads((adapter_a / "jaxpeft_adapter.json").read_text())["method"] == "apt"
    tp.assert_same_tensors(adapter_a / "adapter.safetensors", adapter_b / "adapter.safetensors")
    assert (adapter_a / "jaxpeft_adapter.json").read_text() == (adapter_b / "jaxpeft_adapter.json").read_text()
    assert (run_a / "gates.json").read_text() == (run_b / "gates.json").read_text()


# ------------------------------------------------------------------------------------------------ prompt mask

SFT_ROWS = [{"prompt": "What is 3 plus 4?\nA:", "response": "7"},
            {"prompt": "Hi", "response": "hello there"},
            {"prompt": "What is 10 minus 25?\nA:", "response": "-15 is the answer to that"}]  # truncated


@pytest.fixture(scope="module")
def sft_task(tiny_llama_dir, arith_dir):
    from jaxpeft.loading.tokenizer import tokenizer_from_folder
    from jaxpeft.train.config import load_config
    from jaxpeft.train.tasks import make_task

    tok = tokenizer_from_folder(tiny_llama_dir, json.loads((tiny_llama_dir / "config.json").read_text()))
    cfg = load_config({"model": {"checkpoint": str(tiny_llama_dir)},
                       "data": {"path": str(arith_dir), "max_length": 32, "buckets": [16, 32], "truncate": True}})
    return make_task(cfg, tok, None)


def _expected_prompt_mask(task, rows, shape) -> np.ndarray:
    want = np.zeros(shape, bool)
    for i, row in enumerate(rows):
        want[i, : len(task.prompt_ids(row, i))] = True
    return want


def test_prompt_mask_is_true_exactly_on_prompt_tokens_of_sft_rows(sft_task):
    from jaxpeft.train.data import collate
    from jaxpeft.train.tasks import encode_rows

    examples = encode_rows(sft_task, SFT_ROWS)
    assert len(examples[2]["input_ids"]) == 32, "premise: the last row is truncated to max_length"
    batch = collate(examples, (16, 32), sft_task.tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (3, 32) and (batch["attention_mask"] == 0).any()  # rows 0 and 1 padded
    got = np.asarray(sft_task.model_inputs(batch)["prompt_mask_bt"])
    assert got.dtype == bool
    np.testing.assert_array_equal(got, _expected_prompt_mask(sft_task, SFT_ROWS, got.shape))
    # the prompt span ends where the loss (response + EOS) starts, and never covers pads
    assert not (got & (batch["loss_mask"] > 0)).any() and not (got & (batch["attention_mask"] == 0)).any()


def test_prompt_mask_excludes_pads_of_weight_zero_filler_rows(sft_task):
    """Evaluation batches are filled up to eval_batch_size with all-pad rows of weight 0: they hold no prompt."""
    from jaxpeft.train.data import eval_batches
    from jaxpeft.train.tasks import encode_rows

    (batch,) = list(eval_batches(encode_rows(sft_task, SFT_ROWS), 4, (16, 32), sft_task.tokenizer.pad_token_id))
    assert batch["example_weight"].tolist() == [1.0, 1.0, 1.0, 0.0]
    got = np.asarray(sft_task.model_inputs(batch)["prompt_mask_bt"])
    np.testing.assert_array_equal(got, _expected_prompt_mask(sft_task, SFT_ROWS, got.shape))


# ------------------------------------------------------------------------------------------------ learned positions

GPT2_POSITIONS = 32


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A random 2-layer GPT-2 with only 32 learned positions, sharing the tiny llama's character tokenizer."""
    import flax
    import jax
    from safetensors.numpy import save_file

    from jaxpeft.loading.convert import params_to_hf
    from jaxpeft.models import ModelConfig, build_model

    folder = tmp_path_factory.mktemp("ckpt") / "tiny-gpt2"
    folder.mkdir()
    vocab = json.loads((tiny_llama_dir / "config.json").read_text())["vocab_size"]
    hf = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=vocab, n_embd=32, n_layer=2,
              n_head=4, n_positions=GPT2_POSITIONS, activation_function="gelu_new", resid_pdrop=0.0,
              embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5, initializer_range=0.02,
              bos_token_id=1, eos_token_id=1, pad_token_id=1, torch_dtype="float32")
    cfg = ModelConfig.from_hf(hf)
    shapes = flax.core.meta.unbox(jax.eval_shape(build_model(cfg, "causal_lm").init, jax.random.key(0),
                                                 np.zeros((1, 4), np.int32))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in params_to_hf(cfg, "causal_lm", params).items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, folder / name)
    return folder


def test_gpt2_max_length_plus_prefix_shift_beyond_learned_positions_is_a_config_error(
        tiny_gpt2_dir, arith_dir, tmp_path):
    from jaxpeft.train import run
    from jaxpeft.train.config import ConfigError

    cfg = {"model": {"checkpoint": str(tiny_gpt2_dir), "task": "causal_lm"},
           "adapter": {"method": "prefix", "num_virtual_tokens": 4},
           "data": {"path": str(arith_dir), "max_length": 30, "buckets": [32]},
           "train": {"steps": 1, "batch_size": 4, "output_dir": str(tmp_path / "run")}}
    with pytest.raises(ConfigError, match=r"data\.max_length=30 \+ the prefix's position shift 4 exceeds the 32 "
                                          r"learned positions of this gpt2 model"):
        run(cfg, verbose=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_gpt2_max_length_that_fits_with_the_prefix_shift_passes_the_position_check(tiny_gpt2_dir, arith_dir):
    from jaxpeft.adapters import AdaptedModel
    from jaxpeft.loading.pretrained import load_pretrained
    from jaxpeft.train.config import ConfigError, load_config
    from jaxpeft.train.runner import _check_positions

    pre = load_pretrained(tiny_gpt2_dir)
    base = {"model": {"checkpoint": str(tiny_gpt2_dir)}, "data": {"path": str(arith_dir), "buckets": [32]}}

    def check(max_length: int, **adapter) -> None:
        cfg = load_config({**base, "adapter": {"method": "prefix", "num_virtual_tokens": 4, **adapter},
                           "data": {**base["data"], "max_length": max_length}})
        _check_positions(cfg, pre.config, AdaptedModel.wrap(pre.module).add("default", cfg.adapter_config()))

    check(GPT2_POSITIONS - 4)  # 28 + 4 = 32: exactly fits
    check(GPT2_POSITIONS, position_offset=0)  # no shift: max_length may use every position
    with pytest.raises(ConfigError, match=r"data\.max_length=29 .*or set adapter\.position_offset: 0"):
        check(GPT2_POSITIONS - 3)


def test_bert_max_length_plus_prefix_shift_beyond_learned_positions_is_a_config_error(
        tiny_bert_dir, cls_data, tmp_path):
    from jaxpeft.train import run
    from jaxpeft.train.config import ConfigError

    cfg = _bert_cls_config(tiny_bert_dir, cls_data, tmp_path / "run",
                           {"method": "ptuning_v2", "num_virtual_tokens": 4, "modules_to_save": ["classifier"]})
    cfg["data"].update(max_length=126, buckets=[128])
    with pytest.raises(ConfigError, match=r"data\.max_length=126 \+ the prefix's position shift 4 exceeds the 128 "
                                          r"learned positions of this bert model"):
        run(cfg, verbose=False)
