"""Edit one fact into the model (blens_fast.edit) and show what it does: the model's top prediction for the prompt and
the target's probability and rank, before and after; with --out, the edit is saved as edit.safetensors there (load it
with blens_fast.Edit.load(path) and apply it to the same model with .apply(ctx)).

The settings missing from --layer/--scale/... come from the model's calibration (--calibration FILE, the shipped
one), else from the uncalibrated default: the last layer with the scale chosen from the last position's logits. An
edit that leaves the fact unchanged (the target already predicted, or out of reach) says so.

Example: blens edit --prompt "The mother tongue of Danielle Darrieux is" --target " English" --out out/edit
"""
from __future__ import annotations

from pathlib import Path

from ._common import add_edit_settings, edit_settings, load

OUT_HELP = "folder for edit.safetensors (default: the edit is shown, not saved)"


def add_arguments(parser) -> None:
    parser.add_argument("--prompt", required=True, help="the prompt, e.g. 'The Eiffel Tower is in'")
    parser.add_argument("--target", required=True, help="the new target, e.g. ' Rome'")
    parser.add_argument("--method", choices=("forward_shift", "gradient"), default="forward_shift",
                        help="forward_shift (default: no backward pass) or gradient (the fine-tuning baseline)")
    add_edit_settings(parser)


def run(args) -> int:
    import warnings

    from .._checks import as_str_list
    from ..editing import EditSkipped, edit

    as_str_list(args.prompt, "--prompt")  # fail fast, before loading a model
    as_str_list(args.target, "--target")
    ctx = load(args)
    (example,) = ctx.tokenize([args.prompt], [args.target])
    before = _prediction(ctx, example)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EditSkipped)
        applied = edit(ctx, args.prompt, args.target, method=args.method, calibration=args.calibration,
                       progress=not args.quiet, **edit_settings(args))
    try:
        after = _prediction(ctx, example)
        info = applied.info
        scale = f", scale {info['scale']:.4g}" if isinstance(info.get("scale"), float) else (
            f", scale auto (margin {info['margin']:g}, shift {info['shifts'][0]:.4g})" if "shifts" in info else "")
        steps = f", {info['steps']} steps of lr {info['lr']:.4g}" if args.method == "gradient" else ""
        print(f"edit: {info['variant']} at layer {info['layer']}{scale}{steps} (settings: {info['source']})")
        print(f"{args.prompt!r} -> {ctx.vocabulary[example.target_ids[0]]!r}")
        for when, found in (("before", before), ("after", after)):
            print(f"  {when}: top prediction {found[0]!r} (p {found[1]:.3g}); the target: p {found[2]:.3g}, "
                  f"rank {found[3]}")
        for warning in caught:
            print(f"  {warning.message}")
        if args.out:
            path = applied.save(Path(args.out) / "edit.safetensors")  # setup() made --out, save() its folder
            print(f"wrote {path}")
    finally:
        applied.revert()
    return 0


def _prediction(ctx, example) -> tuple[str, float, float, int]:
    """The top token after the prompt and its probability, and the target's first token's probability and rank."""
    from ..forward import forward_hidden

    ids, mask = ctx.pad([example.prompt_ids])
    logits = ctx.lens.logits(forward_hidden(ctx, ids, mask).hidden[0, -1]).float()
    probs = logits.softmax(-1)
    target = example.target_ids[0]
    top = int(probs.argmax())
    rank = int((logits > logits[target]).sum()) + 1
    return ctx.vocabulary[top], float(probs[top]), float(probs[target]), rank
