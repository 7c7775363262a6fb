"""The ``ray-aekd`` command: argument parsing and one function per command.

Only this layer knows argparse; each command calls the library functions of the layers below.
Nothing here imports torch, Ray or MLflow at import time, so ``--help`` and ``--check`` are instant.
"""

from ray_aekd.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
