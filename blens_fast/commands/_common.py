"""The one vocabulary of the ``blens`` subcommands: a parent parser of shared options and the helpers that read
them.

Shared by every subcommand: ``--model``, ``--device``, ``--dtype``, ``--threads``, ``--out``, ``--quiet``. Used
with the same name and meaning wherever a subcommand needs them: ``--layers`` (layer indices), ``--batch-size``,
``--max-tokens``, ``--k``, ``--impl``, ``--unit-norm``, and for every subcommand that reads records ``--records
SOURCE --start N --n N`` (which records; :func:`add_records`) with ``--prompt-field``/``--target-field``/
``--id-field`` where any records will do.
"""
from __future__ import annotations

import argparse

MODEL_HELP = ("a local Hugging Face folder (config.json, *.safetensors weights and the tokenizer files) or 'default' "
              "(the shipped model); an existing folder wins over a built-in name (default: default)")


def shared_parser(*, out_default: str | None = None, out_help: str = "output folder",
                  model_help: str = MODEL_HELP) -> argparse.ArgumentParser:
    """The parent parser every subcommand is built on."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("shared options")
    group.add_argument("--model", default="default", help=model_help)
    group.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    group.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or float64 (default: float32)")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    group.add_argument("--out", default=out_default, help=out_help + (f" (default: {out_default})" if out_default
                                                                      else ""))
    group.add_argument("--quiet", action="store_true", help="no progress bars (they go to stderr)")
    return parent


def add_layers(parser, help_text: str = "layer indices, e.g. '0,2,-1' or '0-3' (default: all)") -> None:
    parser.add_argument("--layers", default=None, help=help_text)


#: the CLI's spelling of the record selection (blens_fast.records.check_window)
WINDOW_OPTIONS = ("--start", "--n")


def add_records(parser, *, n_default: int | None = None, fields: bool = True,
                kinds: str = "FILE.jsonl, FILE.json (a list), FILE.parquet") -> None:
    """``--records SOURCE --start N --n N``: which records a subcommand reads, the same everywhere (with ``fields``,
    also the record fields holding the prompt, the target and the id)."""
    group = parser.add_argument_group("records")
    group.add_argument("--records", default="counterfact", metavar="SOURCE",
                       help=f"{kinds}, or 'counterfact': the shipped CounterFact edit file, whose records read as "
                            "target = the true object, id = the case id (default: counterfact)")
    group.add_argument("--start", type=int, default=0, metavar="N",
                       help="position of the first record used, 0-based (default: 0)")
    group.add_argument("--n", type=int, default=n_default, metavar="N",
                       help=f"records used from --start (default: {n_default if n_default else 'all'})")
    if fields:
        group.add_argument("--prompt-field", default="prompt", help="the record field holding the prompt")
        group.add_argument("--target-field", default="target", help="the record field holding the target")
        group.add_argument("--id-field", default="id",
                           help="the record field holding its id (default: the line or record number)")


def record_fields(args):
    """The record fields the ``--prompt-field``/``--target-field``/``--id-field`` options name (the defaults where a
    subcommand has none)."""
    from ..bulk.records import Fields

    return Fields(*(getattr(args, f"{name}_field", name) for name in ("prompt", "target", "id")))


def selected_source(args):
    """The records ``--records``/``--start``/``--n`` (and the field options) select, as a
    :class:`~blens_fast.bulk.records.RecordSource` and its fields; a selection past the input's end is an error
    naming what it holds, before any model is loaded."""
    from ..bulk.records import open_source
    from ..records import check_held, selection_end

    fields = record_fields(args)
    source = open_source(args.records, fields)
    check_held(f"input {source.label!r}", source.count(selection_end(args.start, args.n)), args.start, args.n,
               WINDOW_OPTIONS)
    return source.select(args.start, args.n), fields


def add_loss(parser) -> None:
    parser.add_argument("--loss", choices=("teacher_forced", "last_position"), default="teacher_forced",
                        help="teacher_forced (default: ranks refer to the target's first token) or last_position "
                             "(the paper authors' code: every target token scored at the prompt's last position, "
                             "ranks refer to its last token)")


def _scale(text: str):
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scale {text!r}: expected a number or 'auto'") from None


def add_edit_settings(parser) -> None:
    """The settings of an edit (:func:`blens_fast.edit`), missing ones coming from the model's calibration."""
    group = parser.add_argument_group("edit settings (default: the model's calibration, else the uncalibrated "
                                      "default: the last layer, scale auto)")
    group.add_argument("--layer", type=int, default=None, help="edit layer (default: calibrated)")
    group.add_argument("--scale", type=_scale, default=None, help="shift scale or 'auto' (default: calibrated)")
    group.add_argument("--margin", type=float, default=None, help="logit lead for --scale auto (default: calibrated)")
    group.add_argument("--whiten", action="store_true", help="whitened key (forward_shift)")
    group.add_argument("--normalize-key", action="store_true", help="key a_n/(a_n.a_n) (forward_shift)")
    group.add_argument("--lr", type=float, default=None, help="gradient step size (default: calibrated)")
    group.add_argument("--steps", type=int, default=None, help="gradient steps (default: calibrated)")
    group.add_argument("--calibration", default=None, metavar="FILE",
                       help="a calibration file written by eval-counterfact --calibrate (default: the model's "
                            "shipped one, if any)")


def edit_settings(args) -> dict:
    """The edit settings the options give, as :func:`blens_fast.edit` keywords (the ones left out are resolved from
    the calibration)."""
    given = {"layer": args.layer, "scale": args.scale, "margin": args.margin, "lr": args.lr, "steps": args.steps}
    flags = {"whiten": args.whiten, "normalize_key": args.normalize_key}
    return {**{k: v for k, v in given.items() if v is not None}, **{k: True for k, v in flags.items() if v}}


def add_batching(parser, *, batch_size: int, max_tokens: bool = True) -> None:
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"records per forward + backward (default {batch_size})")
    if max_tokens:
        parser.add_argument("--max-tokens", type=int, default=None,
                            help="at most this many padded tokens per batch (default: no limit beyond --batch-size)")


def add_projection(parser) -> None:
    parser.add_argument("--k", type=int, default=10, help="tokens per list (default 10)")
    parser.add_argument("--unit-norm", action="store_true",
                        help="project unit-normalised vectors (the paper's normalised lens variant)")
    parser.add_argument("--impl", default="auto", help="projection kernel: auto, cpu, triton, cuda or torch")


def int_list(text: str, option: str) -> tuple[int, ...]:
    """``"10,100,1000"`` -> ``(10, 100, 1000)`` (positive integers)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected comma-separated integers, e.g. 10,100,1000") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{option} {text!r}: expected positive integers")
    return values


def setup(args) -> None:
    """Validate the shared options before any work (device, dtype, threads, a writable --out, the record selection)
    and apply them."""
    import torch

    from .._checks import check_device, check_dtype
    from .._io import make_folder
    from ..records import check_window

    args.device = str(check_device(args.device, "--device"))
    args.dtype = check_dtype(args.dtype, "--dtype")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: expected at least 1")
        torch.set_num_threads(args.threads)
    if getattr(args, "out", None):
        make_folder(args.out, "--out")
    if hasattr(args, "records"):
        check_window(args.start, args.n, WINDOW_OPTIONS)


def load(args):
    """The model context the shared options name."""
    from ..context import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)
