"""Thin entry point: `python train/train.py CONFIG.yaml [--set key=value ...]` (same as `jaxpeft train`).

Everything lives in the installed package (`jaxpeft.train.run`); this folder is not installed by pip.
"""
import sys

from jaxpeft.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
