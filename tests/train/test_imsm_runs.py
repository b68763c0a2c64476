"""IMSM through `jaxpeft train`, `jaxpeft generate --adapter` and the optimizer groups: an IMSM-over-LoRA run on the
tiny llama trains, prints the count (LoRA + 5 d r_g), saves the jaxpeft format (IMSM with the LoRA inside), and the
CLI generates from that folder exactly as `generate_with_adapter` does; the gate trains at its own lr.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_procs as tp

GEN_PROMPTS = ["What is 12 plus 7?\nA:", "Hi"]


@pytest.fixture(scope="module")
def imsm_run(tmp_path_factory, build_config):
    from jaxpeft.train import run

    out = tmp_path_factory.mktemp("imsm-run")
    cfg = build_config({"train": {"steps": 4, "batch_size": 4, "eval_every": 4, "checkpoint_every": 4,
                                  "output_dir": str(out / "run"), "log_every": 1}})
    cfg["adapter"] = {"method": "imsm", "gate_rank": 4, "gate_lr": 5e-2,
                      "inner": {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
    return run(cfg, verbose=False)


def test_imsm_run_saves_the_wrapper_with_its_inner_method(imsm_run):
    meta = json.loads((imsm_run.adapter_dir / "jaxpeft_adapter.json").read_text())
    assert meta["method"] == "imsm" and meta["config"]["inner"]["method"] == "lora"
    assert meta["config"]["gate_rank"] == 4
    assert [s for s, _ in imsm_run.train_losses] == [1, 2, 3, 4]
    assert np.isfinite(imsm_run.metrics_after["eval_loss"])


def test_imsm_trainable_count_is_lora_plus_five_d_r(imsm_run, tiny_llama_dir):
    import jaxpeft
    from jaxpeft.adapters import AdaptedModel
    from jaxpeft.adapters.native_io import load_any
    from jaxpeft.adapters.partition import count_parameters

    pre = jaxpeft.load_pretrained(tiny_llama_dir)
    model, state = load_any(AdaptedModel.wrap(pre.module), pre.params, imsm_run.adapter_dir)
    d, n_layers = pre.config.hidden_size, pre.config.num_layers
    lora = n_layers * 4 * ((d + d) + (d + pre.config.num_kv_heads * pre.config.head_dim))
    assert count_parameters(model, state, pre.params)[0] == lora + 5 * d * 4


def test_generate_cli_with_an_imsm_adapter_matches_generate_with_adapter(imsm_run, tiny_llama_dir):
    import jaxpeft
    from jaxpeft.adapters import AdaptedModel
    from jaxpeft.adapters.native_io import load_any
    from jaxpeft.train.loop import generate_with_adapter

    args = ["generate", tiny_llama_dir, "--adapter", imsm_run.adapter_dir, "--max-new-tokens", 6]
    for p in GEN_PROMPTS:
        args += ["--prompt", p]
    rc, stdout, stderr = tp.cli(args)
    assert rc == 0, stderr[-3000:]
    pre = jaxpeft.load_pretrained(tiny_llama_dir)
    tok = pre.tokenizer
    model, state = load_any(AdaptedModel.wrap(pre.module), pre.params, imsm_run.adapter_dir)
    outs = generate_with_adapter(model, pre.params, state, [tok.encode(p) for p in GEN_PROMPTS], max_new_tokens=6,
                                 eos_token_ids=tok.eos_token_ids, pad_token_id=tok.pad_token_id or 0)
    assert stdout == "".join(tok.decode(o, skip_special_tokens=True) + "\n" for o in outs)


def test_optimizer_groups_give_the_gate_its_own_peak_lr(tiny_llama_dir):
    """Adam's first update is lr * sign(g) per entry (no clipping, no warm-up): the gate moves by gate_lr, the
    inner adapter by optim.lr."""
    import jaxpeft
    from jaxpeft.adapters import AdaptedModel, IMSMConfig, LoraConfig
    from jaxpeft.train.config import OptimSection
    from jaxpeft.train.loop import make_optimizer

    pre = jaxpeft.load_pretrained(tiny_llama_dir)
    model = AdaptedModel.wrap(pre.module).add("default", IMSMConfig(
        inner=LoraConfig(r=4, init_lora_weights=False, target_modules=("q_proj",)), gate_lr=0.1))
    state = model.init(jax.random.key(0), pre.params)
    groups = model.lr_groups(0.01)
    assert groups == {"default": 0.01, "default:gate": 0.1}
    tx = make_optimizer(OptimSection(lr=0.01, schedule="constant", clip_norm=None), 10, group_lrs=groups,
                        labels=model.param_labels)
    grads = jax.tree.map(lambda x: jnp.ones_like(x), state["trainable"])
    updates, _ = tx.update(grads, tx.init(state["trainable"]), state["trainable"])
    gate = updates["default"]["shared"]["imsm_gate"]
    lora = updates["default"]["modules"]
    assert all(np.allclose(np.asarray(x), -0.1, rtol=1e-3) for x in jax.tree.leaves(gate))
    assert all(np.allclose(np.asarray(x), -0.01, rtol=1e-3) for x in jax.tree.leaves(lora))


def test_imsm_run_writes_the_gate_histogram(imsm_run):
    stats = json.loads((imsm_run.output_dir / "imsm_gates.json").read_text())
    png = (imsm_run.output_dir / "imsm_gates.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    for part in ("prompt", "response"):
        assert stats[part]["values"] > 0 and sum(stats[part]["counts"]) == stats[part]["values"]
        assert 0.0 < stats[part]["mean"] < 1.0


def test_eval_compare_base_scores_the_adapter_and_the_base_on_a_probe_task(imsm_run, tiny_llama_dir, tmp_path):
    """The forgetting probe: the trained adapter and the base model on another task's split (here the eval rows
    with other numbers), side by side; the base numbers equal an evaluation of an adapter-free model."""
    rows = [{"prompt": f"What is {a} times 2?\nA:", "response": str(2 * a)} for a in range(8)]
    probe = tmp_path / "probe"
    probe.mkdir()
    for split in ("train", "validation"):
        (probe / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = imsm_run.output_dir / "config.yaml"
    rc, stdout, stderr = tp.cli(["eval", config, "--adapter", imsm_run.adapter_dir, "--compare-base",
                                 "--set", f"data.path={probe}"])
    assert rc == 0, stderr[-3000:]
    got = dict(line.split("=") for line in stdout.split())
    assert {"eval_loss", "base_eval_loss"} <= set(got)
    assert float(got["eval_loss"]) != float(got["base_eval_loss"])
    from jaxpeft.train.runner import _context, _evaluate_base
    from jaxpeft.train.config import load_config

    ctx = _context(load_config(str(config), [f"data.path={probe}"]))
    assert f"{_evaluate_base(ctx)['base_eval_loss']:.4f}" == got["base_eval_loss"]
