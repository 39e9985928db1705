"""Gradient ranks over records: per example, layer and module, the token count, the rank of the weight's gradient and
its norm (blens_fast.rank), and their means per layer and module on the terminal.

Each record of --records (default: the shipped CounterFact edit file, whose target is the true object) has a prompt
and a target; --start and --n select them as in every subcommand that reads records. With --out, rank.csv (one row
per example, layer and module) and rank_summary.csv (the table printed) are written there.

Example: blens rank --records counterfact --n 8 --layers 0-3 --out out/rank
"""
from __future__ import annotations

from pathlib import Path

from .._checks import parse_layers
from ._common import add_layers, add_loss, add_records, load, selected_source

OUT_HELP = "folder for rank.csv and rank_summary.csv (default: print only)"


def add_arguments(parser) -> None:
    add_records(parser)
    add_layers(parser)
    parser.add_argument("--modules", default="mlp.in,mlp.out",
                        help="modules whose weight gradients are ranked, e.g. mlp.in,mlp.out or attn.o "
                             "(default: mlp.in,mlp.out)")
    parser.add_argument("--batch-size", type=int, default=8, help="records per forward + backward (default 8)")
    add_loss(parser)


def run(args) -> int:
    from .._report import write_file
    from .._ui import plural
    from ..spectrum import rank

    layers = parse_layers(args.layers, "--layers")
    source, fields = selected_source(args)
    records = list(source.records(fields))
    bad = next((r for r in records if r.error is not None), None)
    if bad is not None:
        raise source.bad(bad)
    table = rank(load(args), [r.prompt for r in records], [r.target for r in records], layers=layers,
                 modules=tuple(m.strip() for m in args.modules.split(",")), batch_size=args.batch_size,
                 loss=args.loss, progress=not args.quiet)
    table.insert(1, "id", [records[i].id for i in table.example])
    summary = table.groupby(["layer", "module"], sort=False).agg(
        examples=("example", "size"), tokens=("tokens", "mean"), rank=("rank", "mean"),
        full_rank_share=("full_rank", "mean"), norm=("norm", "mean")).reset_index()
    print(f"gradient ranks of {plural(len(records), 'record')} from {source.label} "
          "(means per layer and module; full_rank_share: the share whose rank reaches min(tokens, d_in, d_out))")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.out:
        written = [write_file(Path(args.out) / name, frame.to_csv(index=False))
                   for name, frame in (("rank.csv", table), ("rank_summary.csv", summary))]
        print(f"\nwrote {', '.join(map(str, written))}")
    return 0
