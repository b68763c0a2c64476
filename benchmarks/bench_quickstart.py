"""The quickstart recipe (configs/quickstart.yaml: LoRA r=8 on q,k,v,o of SmolLM2-135M-Instruct, the bundled
arithmetic rows, batch 8, AdamW 2e-3 cosine with 10 warm-up steps, clipping 1.0, SFT loss on the response)
trained for --steps steps by `jaxpeft train` and by a Hugging Face PEFT loop on the same weights (the GGUF the
quickstart loads, written out as a transformers folder), the same encoded rows in the same batch order, padded to
each batch's longest row. Each side in its own process, one after the other, --rounds times (A B A B).

Reported per side: the whole run's wall time (load, compile, train, a final 8-row evaluation) and the training
steps' time without the first step (which holds jaxpeft's compile).
Usage: python benchmarks/bench_quickstart.py [--steps 60] [--rounds 2]
Target (issue 11): jaxpeft wall time <= 0.75x HF PEFT's.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import Worker, interleave, median, serve, write_json

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "quickstart.yaml"


def _overrides(steps: int, out: str) -> list[str]:
    return [f"train.steps={steps}", f"train.output_dir={out}", "train.eval_before_training=false",
            f"train.eval_every={steps}", f"train.checkpoint_every={steps}", "train.log_every=1",
            "data.max_eval_rows=8", "generation.eval_generate=false", "generation.show_examples=0",
            "data.path=bundled:arithmetic"]


def setup_jax(args):
    from jaxpeft.train import run

    def measure():
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            run(str(CONFIG), _overrides(args.steps, out), verbose=False)
            wall = time.perf_counter() - t0
            logs = [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]
            train = {r["step"]: r["time"] for r in logs if r["split"] == "train" and "loss" in r}
        return {"wall_s": wall, "steps_after_first_s": train[args.steps] - train[1]}
    return measure


def _hf_folder(cache: Path) -> Path:
    """The quickstart's weights (jaxpeft's GGUF load) as a transformers folder, written once."""
    if (cache / "model.safetensors").exists():
        return cache
    from jaxpeft.loading import load_pretrained, save_hf_folder

    return save_hf_folder(load_pretrained("smollm2-135m-instruct"), cache)


def setup_torch(args):
    import numpy as np
    import peft
    import torch
    import transformers

    from jaxpeft.train.config import load_config
    from jaxpeft.train.data import Batcher, load_split
    from jaxpeft.loading.pretrained import load_pretrained
    from jaxpeft.train.tasks import encode_rows, make_task

    folder = _hf_folder(Path(tempfile.gettempdir()) / "jaxpeft-bench-smollm2-hf")

    def measure():
        t0 = time.perf_counter()
        cfg = load_config(str(CONFIG), _overrides(args.steps, "unused"))
        tok = load_pretrained(cfg.model.checkpoint).tokenizer  # the same tokens as jaxpeft's run
        task = make_task(cfg, tok, None)
        examples = encode_rows(task, load_split(cfg.data, cfg.data.train_split, cfg.data.max_train_rows))
        batcher = Batcher(examples, cfg.train.batch_size, (cfg.data.max_length,), tok.pad_token_id or 0, cfg.train.seed)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
        a = cfg.adapter
        model = peft.get_peft_model(model, peft.LoraConfig(r=a.r, lora_alpha=a.lora_alpha,
                                                           target_modules=list(a.target_modules), lora_dropout=0.0))
        model.train()
        o = cfg.optim
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=o.lr,
                                betas=(o.b1, o.b2), weight_decay=o.weight_decay)
        sched = transformers.get_cosine_schedule_with_warmup(opt, o.warmup_steps, args.steps)
        it = batcher.iterate()
        step_times = []
        for _ in range(args.steps):
            s0 = time.perf_counter()
            _, _, b = next(it)
            longest = int(b["attention_mask"].sum(1).max())  # pad to the batch's longest row, as HF collators do
            ids = torch.tensor(b["input_ids"][:, :longest], dtype=torch.long)
            mask = torch.tensor(b["attention_mask"][:, :longest], dtype=torch.long)
            labels = ids.clone()
            labels[torch.tensor(b["loss_mask"][:, :longest]) == 0] = -100
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], o.clip_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step_times.append(time.perf_counter() - s0)
        model.eval()
        with torch.no_grad():  # the same final 8-row evaluation loss pass jaxpeft's run ends with
            ev = encode_rows(task, load_split(cfg.data, cfg.data.eval_split, 8))
            for e in ev:
                ids = torch.tensor([e["input_ids"]])
                model(input_ids=ids, labels=ids)
        return {"wall_s": time.perf_counter() - t0, "steps_after_first_s": float(np.sum(step_times[1:])),
                "final_loss": float(loss)}
    return measure


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        serve(lambda: (setup_jax if args.worker == "jax" else setup_torch)(args))
        return {}
    _hf_folder(Path(tempfile.gettempdir()) / "jaxpeft-bench-smollm2-hf")
    runs: dict[str, list] = {"jaxpeft": [], "peft": []}
    for _ in range(args.rounds):  # a fresh process per run: the wall time includes imports' warm state only
        for side, flag in (("jaxpeft", "jax"), ("peft", "torch")):
            w = Worker([__file__, "--worker", flag, "--steps", str(args.steps)])
            runs[side] += interleave({side: w}, 1)[side]
            w.close()
    med = {side: {k: median(rs, k) for k in ("wall_s", "steps_after_first_s")} for side, rs in runs.items()}
    ratios = {k: med["jaxpeft"][k] / med["peft"][k] for k in ("wall_s", "steps_after_first_s")}
    print(f"quickstart {args.steps} steps: jaxpeft {med['jaxpeft']['wall_s']:.1f} s wall "
          f"({med['jaxpeft']['steps_after_first_s']:.1f} s after step 1), HF PEFT {med['peft']['wall_s']:.1f} s "
          f"({med['peft']['steps_after_first_s']:.1f} s) | wall {ratios['wall_s']:.2f}x, steps "
          f"{ratios['steps_after_first_s']:.2f}x", flush=True)
    write_json("quickstart_vs_peft", {"steps": args.steps, "median": med, "runs": runs, "ratios": ratios})
    return ratios


if __name__ == "__main__":
    main()
