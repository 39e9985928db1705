"""Imprint and shift: train one fact's FF1/FF2 weights step by step and measure the paper's two mechanisms.

Writes imprint_shift.png, imprint_shift.html, imprint_shift.csv and imprint_shift_lens.csv into --out.
Example: blens imprint-shift --prompt "The mother tongue of Danielle Darrieux is" --target " English" --steps 5
"""
from __future__ import annotations

from .._checks import parse_layers
from ._common import add_layers, load

OUT_DEFAULT = "out/imprint_shift"
OUT_HELP = "folder for the PNG, HTML and CSV files"


def add_arguments(parser) -> None:
    parser.add_argument("--prompt", required=True, help="the prompt, e.g. 'The Eiffel Tower is in'")
    parser.add_argument("--target", required=True, help="the new target, e.g. ' Rome'")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps (default 5)")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="sgd (default) or adam")
    parser.add_argument("--lr", type=float, default=None, help="step size (default: 1.0 for sgd, 1e-3 for adam)")
    parser.add_argument("--k", type=int, default=10, help="tokens per lens list (default 10)")
    add_layers(parser, "layers whose FF1 and FF2 weights are trained, e.g. '0,2' or '0-3' (default: all)")


def run(args) -> int:
    from .._checks import as_str_list
    from ..imprint import imprint_shift

    as_str_list(args.prompt, "--prompt")
    as_str_list(args.target, "--target")
    layers = parse_layers(args.layers, "--layers")
    report = imprint_shift(load(args), args.prompt, args.target, steps=args.steps, lr=args.lr,
                           optimizer=args.optimizer, layers=layers, k=args.k)
    print(report)
    written = report.save(args.out)
    print("\nwrote " + ", ".join(str(p) for p in written.values()))
    return 0
