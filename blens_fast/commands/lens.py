"""Backward Lens of one fact: a table per layer on the terminal, PNG/HTML/CSV into --out.

Example: blens lens --prompt "The mother tongue of Danielle Darrieux is" --target " French" --out out/lens
"""
from __future__ import annotations

from ._common import add_layers_argument, add_model_argument, parse_layers


def add_arguments(parser) -> None:
    parser.add_argument("--prompt", required=True, help="the prompt, e.g. 'The Eiffel Tower is in'")
    parser.add_argument("--target", required=True, help="the target object, e.g. ' Paris' (a leading space is added if missing)")
    add_model_argument(parser)
    add_layers_argument(parser)
    parser.add_argument("--k", type=int, default=10, help="tokens per list (default 10)")
    parser.add_argument("--normalized", action="store_true", help="project unit-normalised vectors")
    parser.add_argument("--positions", choices=("last", "all"), default="last",
                        help="positions shown on the terminal (files always hold all)")
    parser.add_argument("--out", default=None, help="directory for lens.png, lens.html and the CSV tables")
    parser.add_argument("--impl", default="auto", help="projection implementation: auto, cpu, triton, cuda, torch")


def run(args) -> int:
    from .._checks import as_str_list, check_positive_int
    from ..lens import lens
    from ..models import load_model

    as_str_list(args.prompt, "prompts")  # fail fast, before loading a model
    as_str_list(args.target, "targets")
    check_positive_int(args.k, "k")
    layers = parse_layers(args.layers)
    model, tokenizer = load_model(args.model, device=args.device)
    report = lens(model, tokenizer, args.prompt, args.target, layers=layers, k=args.k,
                  normalized=args.normalized, impl=args.impl)
    print(report.format(positions=args.positions))
    if args.out:
        written = report.save(args.out)
        print("\nwrote " + ", ".join(str(p) for p in written.values()))
    return 0
