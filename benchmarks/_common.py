"""What every benchmark script shares: one argument set (``--threads``, ``--out``), the machine, result files and
tables (from :mod:`blens_fast._report`), and one way to time a call.

Scripts run as ``python benchmarks/<script>.py``, which puts this folder on ``sys.path``: they ``import _common``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from blens_fast._report import machine_description, machine_info, markdown_table, write_result

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS", "add_shared", "machine_description", "machine_info", "markdown_table", "median_seconds",
           "parser", "setup", "timed", "write_result"]


def add_shared(parser: argparse.ArgumentParser, *, threads: int | None = None, out: Path | None = RESULTS) -> None:
    """``--threads`` (torch CPU threads, default ``threads``: torch's own when None) and ``--out`` (results folder,
    default ``out``: benchmarks/results; None: print only)."""
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"torch CPU threads (default: {threads or 'torch default'})")
    parser.add_argument("--out", type=Path, default=out,
                        help=f"folder for the result files (default: {out or 'print only'})")


def parser(doc: str, **defaults) -> argparse.ArgumentParser:
    """A parser described by a script's docstring, with :func:`add_shared`'s options."""
    found = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared(found, **defaults)
    return found


def setup(args) -> Path | None:
    """Apply ``--threads`` and create ``--out``; returns the output folder (None: print only)."""
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads {args.threads}: expected at least 1")
        torch.set_num_threads(args.threads)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    return args.out


def timed(fn, *, sync=None):
    """``(seconds, result)`` of one call of ``fn``; ``sync`` (e.g. ``torch.cuda.synchronize``) runs before the clock
    stops."""
    start = time.perf_counter()
    result = fn()
    if sync is not None:
        sync()
    return time.perf_counter() - start, result


def median_seconds(fn, repeats: int, *, sync=None) -> float:
    """The median over ``repeats`` calls of ``fn`` (see :func:`timed`)."""
    return statistics.median(timed(fn, sync=sync)[0] for _ in range(repeats))
