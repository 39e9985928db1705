"""The ``blens`` command: thin subcommands over the public calls.

Each subcommand lives in ``blens_fast/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; bad input becomes a one-line message and exit code 2.
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
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blens", description="The Backward Lens, fast.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(f"blens_fast.commands.{module_name}")
        except ModuleNotFoundError as error:
            if error.name != f"blens_fast.commands.{module_name}":
                raise
            continue
        doc = (module.__doc__ or "").strip()
        command = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"blens {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"blens {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
