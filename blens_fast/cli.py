"""The ``blens`` command (also ``python -m blens_fast``): thin subcommands over the public calls.

Each subcommand lives in ``blens_fast/commands/<name>.py`` with ``add_arguments(parser)`` and ``run(args) -> int``
(optionally ``OUT_DEFAULT`` / ``OUT_HELP`` for ``--out``); every subcommand is built on the one parent parser of
shared options (:mod:`blens_fast.commands._common`), which ``setup`` validates before any work. Bad input becomes a
one-line message and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> module under blens_fast.commands
COMMANDS = {
    "lens": "lens",
    "eval-counterfact": "eval_counterfact",
    "project-dataset": "project_dataset",
    "bench": "bench",
    "imprint-shift": "imprint_shift",
    "rank": "rank",
    "edit": "edit",
    "training-lens-report": "training_lens_report",
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .commands._common import MODEL_HELP, shared_parser

    parser = argparse.ArgumentParser(prog="blens", description="The Backward Lens, fast.")
    parser.add_argument("--version", action="version", version=f"blens_fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(f"blens_fast.commands.{module_name}")
        except ModuleNotFoundError as error:
            if error.name != f"blens_fast.commands.{module_name}":
                raise
            continue
        doc = (module.__doc__ or "").strip()
        parent = shared_parser(out_default=getattr(module, "OUT_DEFAULT", None),
                               out_help=getattr(module, "OUT_HELP", "output folder"),
                               model_help=getattr(module, "MODEL_HELP", MODEL_HELP))
        command = sub.add_parser(name, parents=[parent], help=doc.splitlines()[0] if doc else None, description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    import torch

    from .commands._common import setup

    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        setup(args)
        return int(args.run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, PermissionError) as error:
        print(f"blens {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"blens {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)  # --threads holds for this command only (callers in one process)


if __name__ == "__main__":
    sys.exit(main())
