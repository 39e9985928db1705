"""Backward Lens of one fact: a table per layer on the terminal, PNG/HTML/CSV into --out.

Example: blens lens --prompt "The mother tongue of Danielle Darrieux is" --target " French" --out out/lens
"""
from __future__ import annotations

from .._checks import parse_layers
from ._common import add_layers, add_loss, add_projection, load

OUT_HELP = "folder for lens.png, lens.html and the CSV tables (default: print only)"


def add_arguments(parser) -> None:
    parser.add_argument("--prompt", required=True, help="the prompt, e.g. 'The Eiffel Tower is in'")
    parser.add_argument("--target", required=True,
                        help="the target object, e.g. ' Paris' (a leading space is added if missing)")
    add_layers(parser)
    add_projection(parser)
    add_loss(parser)
    parser.add_argument("--positions", choices=("last", "all"), default="last",
                        help="positions shown on the terminal (files always hold all)")


def run(args) -> int:
    from .._checks import as_str_list, check_positive_int
    from ..lens import lens

    as_str_list(args.prompt, "--prompt")  # fail fast, before loading a model
    as_str_list(args.target, "--target")
    check_positive_int(args.k, "--k")
    layers = parse_layers(args.layers, "--layers")
    ctx = load(args)
    report = lens(ctx, args.prompt, args.target, layers=layers, k=args.k, unit_norm=args.unit_norm, impl=args.impl,
                  loss=args.loss)
    print(report.format(positions=args.positions))
    if args.out:
        written = report.save(args.out)
        print("\nwrote " + ", ".join(str(p) for p in written.values()))
    return 0
