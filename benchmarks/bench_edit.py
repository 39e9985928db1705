"""Cost of one forward-shift edit against one forward pass of the same prompt, measured side by side.

    python benchmarks/bench_edit.py [--model default|PATH] [--repeats 7] [--prompts 20] [--threads 1]

For each of the first ``--prompts`` CounterFact records and each repeat, in interleaved order:
one plain forward pass of the prompt (``model(input_ids)``, logits at every position, as a forward pass is
normally run), one forward pass with logits at the last position only (``logits_to_keep=1``), and one
``blens_fast.edit`` per variant (paper shift, whitened shift with its covariance already cached, whitened
shift with the auto scale) followed by its revert (timed separately). The edit time includes everything
``edit()`` does: tokenization, argument checks, its forward pass, the key, the clone kept for revert and the
in-place update. Reported: medians over all (prompt, repeat) pairs and the ratio edit / plain forward.
Writes edit_cost.json and edit_cost.md into --out.
"""
from __future__ import annotations

import statistics

import torch
from _common import machine_info, markdown_table, parser, setup, timed, write_result

from blens_fast import edit, load_model
from blens_fast.counterfact import load
from blens_fast.editing import calibrated_defaults, ff2_whitening


def variants(ctx) -> dict[str, dict]:
    """Edit options per calibrated forward-shift variant (the whitened ones with the covariance estimated once)."""
    defaults = calibrated_defaults(ctx)
    if "forward_shift" not in defaults:
        raise SystemExit("this model has no calibrated forward-shift settings: run blens eval-counterfact --calibrate")
    found = {"forward_shift": {}}
    if "forward_shift_whitened" in defaults:
        found["forward_shift_whitened"] = {"whiten": ff2_whitening(ctx, defaults["forward_shift_whitened"]["layer"])}
    if "forward_shift_whitened_auto" in defaults:
        layer = defaults["forward_shift_whitened_auto"]["layer"]
        found["forward_shift_whitened_auto"] = {"whiten": ff2_whitening(ctx, layer), "scale": "auto"}
    return found


def main(argv=None) -> int:
    args_parser = parser(__doc__, threads=1)
    args_parser.add_argument("--model", default="default")
    args_parser.add_argument("--repeats", type=int, default=7)
    args_parser.add_argument("--prompts", type=int, default=20)
    args = args_parser.parse_args(argv)
    out = setup(args)
    ctx = load_model(args.model)
    model, tokenizer = ctx
    options = variants(ctx)
    records = load("counterfact", args.prompts)
    times: dict[str, list[float]] = {"forward": [], "forward_last_logits": [],
                                     **{name: [] for name in options}, **{f"{n}_revert": [] for n in options}}
    with torch.no_grad():
        for record in records[:2]:  # warm-up
            model(input_ids=torch.tensor([tokenizer(record["prompt"])["input_ids"]]))
            for chosen in options.values():
                edit(ctx, record["prompt"], record["target_new"], **chosen).revert()
    for _ in range(args.repeats):
        for record in records:
            ids = torch.tensor([tokenizer(record["prompt"])["input_ids"]])
            with torch.no_grad():
                times["forward"].append(timed(lambda: model(input_ids=ids))[0])
                times["forward_last_logits"].append(timed(lambda: model(input_ids=ids, logits_to_keep=1))[0])
            for name, chosen in options.items():
                seconds, result = timed(lambda: edit(ctx, record["prompt"], record["target_new"], **chosen))
                times[name].append(seconds)
                times[f"{name}_revert"].append(timed(result.revert)[0])
    medians = {key: statistics.median(values) * 1000 for key, values in times.items()}
    result = {
        "model": args.model, "prompts": len(records), "repeats": args.repeats, "torch": torch.__version__,
        **machine_info(),
        "median_ms": {key: round(value, 3) for key, value in medians.items()},
        "edit_over_forward": {name: round(medians[name] / medians["forward"], 3) for name in options},
        "target": "forward-shift edit <= 1.2 x one forward pass of the prompt",
        "settings": {name: {key: (value if isinstance(value, (int, float, str)) else str(value))
                            for key, value in chosen.items()} for name, chosen in options.items()},
    }
    table = [f"First {len(records)} CounterFact prompts x {args.repeats} repeats, interleaved; medians. Plain "
             "forward = `model(input_ids)`.", "",
             markdown_table([{"": name, "median ms": f"{value:.2f}",
                              "/ plain forward": f"{value / medians['forward']:.2f}"}
                             for name, value in medians.items()])]
    write_result(out, "edit_cost", result, table_key="median_ms", table=table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
