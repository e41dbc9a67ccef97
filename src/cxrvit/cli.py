"""The ``cxrvit`` command line: a thin layer over importable functions.

Each part of the package owns its subcommands in ``<part>/commands.py`` with a
``register(subparsers)`` function; every subcommand sets ``func(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from cxrvit import __version__
from cxrvit.allocator import keep_freed_memory
from cxrvit.engine.distributed import exit_process, multi_process

COMMAND_MODULES = (
    "cxrvit.data.commands",        # prepare, data-summary
    "cxrvit.training.commands",    # train
    "cxrvit.evaluation.commands",  # eval, compare
    "cxrvit.inference.commands",   # predict, dicom-info, export
    "cxrvit.ssl.commands",         # pretrain
    "cxrvit.experiments.commands", # bench (arms, recipes)
    "cxrvit.serve.commands",       # serve
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrvit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cxrvit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    keep_freed_memory()  # large activations reuse freed heap instead of fresh pages (allocator.py)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of the output has gone (`cxrvit data-summary CACHE | head`): not this run's error, and no
        # traceback. stdout goes to /dev/null first, or the interpreter's last flush would raise it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # what a shell reports for a writer stopped by SIGPIPE


def run() -> NoReturn:
    """``cxrvit`` and ``python -m cxrvit``: :func:`main`, then exit with its code. A worker of a multi-process
    torchrun launch exits without interpreter finalization (:func:`cxrvit.engine.distributed.exit_process`)."""
    code = main()
    if multi_process():
        exit_process(code)
    raise SystemExit(code)


if __name__ == "__main__":
    run()
