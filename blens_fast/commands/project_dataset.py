"""Backward Lens over a dataset: long-format Parquet rows, resumable, verified, split across torchrun ranks.

Each record of --records (JSON Lines, a JSON list, Parquet, or 'counterfact': the shipped CounterFact edit file;
--start and --n select a slice) has a prompt and a target (and an optional id). --out gets two Parquet datasets,
OUT/rows and OUT/records, which pandas, pyarrow.dataset and Hugging Face datasets read as they are. Killed and started
again with the same arguments, a run resumes where it stopped; shards whose files are damaged are recomputed; other
arguments into the same --out are refused, and so is a second process while one runs. Under `torchrun
--nproc_per_node N -m blens_fast.cli -- project-dataset --records ...` the records are split across the processes
and the result is the same whatever N is (the `--` keeps torchrun from reading --start and --n as its own options).

Example: blens project-dataset --records facts.jsonl --out out/facts --k 10 --batch-size 16
CounterFact: blens project-dataset --records counterfact --n 1000 --out out/cf --stats
"""
from __future__ import annotations

import argparse

from .._checks import parse_layers
from ._common import add_batching, add_layers, add_projection, add_records, record_fields, selected_source

OUT_HELP = "output folder (required; created; run again with the same arguments to resume)"


def _shard_size(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer or 'auto'")
    return value


def add_arguments(parser) -> None:
    add_records(parser)
    add_layers(parser)
    parser.add_argument("--modules", default="mlp.in,mlp.out",
                        help="lens lists to write: mlp.in (FF1 input, top-k) and/or mlp.out (FF2 VJP, bottom/top-k)")
    add_batching(parser, batch_size=16)
    add_projection(parser)
    parser.add_argument("--shard-size", type=_shard_size, default="auto",
                        help="input records per output shard (default auto: ceil(records / 32), between 8 and 256)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="write bad records to OUT/rejected.jsonl with the reason and go on (default: stop)")
    parser.add_argument("--stats", action="store_true",
                        help="also accumulate dataset-level gradient statistics into OUT/stats")
    parser.add_argument("--stats-rank", type=int, default=8, help="rank of the summed-gradient sketch (default 8)")


def run(args) -> int:
    from ..bulk.run import RunOptions, log_to_stderr, project_dataset

    if not args.out:
        raise ValueError("--out is required: the folder for the results (reused to resume)")
    if args.start or args.n is not None:
        selected_source(args)  # a selection past the input's end fails before the model loads
    fields = record_fields(args)
    options = RunOptions(layers=parse_layers(args.layers, "--layers"), modules=args.modules, k=args.k,
                         batch_size=args.batch_size, max_tokens=args.max_tokens, shard_size=args.shard_size,
                         fields=fields, start=args.start,
                         n=args.n, skip_bad=args.skip_bad, unit_norm=args.unit_norm, impl=args.impl,
                         stats=args.stats, stats_rank=args.stats_rank)
    project_dataset(args.model, args.records, args.out, options=options, device=args.device, dtype=args.dtype,
                    progress=not args.quiet, log=log_to_stderr)
    return 0
