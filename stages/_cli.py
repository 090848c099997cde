"""Shared command-line glue for stage entry points (not library code)."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from diffmodels.core.errors import DiffmodelsError
from diffmodels.core.interrupt import signals_raise


def stage_main(fn: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> Callable:
    """Wrap a stage: parse arguments, turn user errors into one line on stderr and exit code 2.

    Bugs (any other exception) keep their traceback. Ctrl-C and SIGTERM print one line and exit
    128 + the signal number (130, 143); training stages save a checkpoint first
    (:mod:`diffmodels.core.interrupt`) and the MLflow run is marked KILLED.
    """

    @functools.wraps(fn)
    def main(argv: Sequence[str] | None = None) -> None:
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # for a stage that re-launches itself
        try:
            # a stage may switch autograd off for its whole run; the caller (a test, a notebook)
            # gets its own grad mode back
            with signals_raise(), torch.set_grad_enabled(torch.is_grad_enabled()):
                fn(args)
        except DiffmodelsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as exc:
            print(str(exc) or "interrupted", file=sys.stderr)
            sys.exit(getattr(exc, "exit_code", 130))

    return main


def base_parser(description: str, *paths: str, **helps: str) -> argparse.ArgumentParser:
    """The stage's parser: ``--params`` and, for each name in ``paths`` (``"fid-reference"``), a
    required path argument ``--fid-reference``. Paths have no defaults: they live in dvc.yaml only,
    which passes every one. ``helps`` adds help texts by argument name (``fid_reference=...``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    for name in paths:
        parser.add_argument(f"--{name}", type=Path, required=True, help=helps.get(name.replace("-", "_")))
    return parser
