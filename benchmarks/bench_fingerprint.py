"""Cost of an edit's fingerprint (of the architecture and of every value of the weights it touches) against the
whole edit, measured side by side. The fingerprint is taken when an edit is saved and when a saved edit is applied
(an edit that is never saved does not compute it).

    python benchmarks/bench_fingerprint.py [--models default,gpt2-small] [--repeats 5] [--prompts 20] [--threads 1]

For each model (``default``: the shipped one with its calibrated forward shift; ``gpt2-small``: GPT-2-small
dimensions, 12 layers, width 768, random initialisation, the uncalibrated default edit: the last layer, scale from
the logits) and each of the first ``--prompts`` CounterFact records, repeated in interleaved order: one
``blens_fast.edit`` (everything it does; the revert is not timed), then the fingerprint alone
(``blens_fast.editing.update.fingerprint`` of the weight the edit touched, as ``Edit.save`` computes it) and, as a
yardstick, a sha256 of the touched weight's bytes. Reported: medians and the fingerprint's share of an edit. Writes
fingerprint_cost.json and fingerprint_cost.md into --out.
"""
from __future__ import annotations

import hashlib
import statistics

import torch
import transformers
from _common import machine_info, markdown_table, parser, setup, timed, write_result

from blens_fast import bind, edit, load_default_model
from blens_fast.counterfact import load
from blens_fast.editing.update import fingerprint

BUDGET = 0.05  # the fingerprint's share of an edit, at most


def model(name: str):
    ctx = load_default_model()
    if name == "default":
        return ctx
    if name == "gpt2-small":
        torch.manual_seed(0)
        return bind(transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval(), ctx.tokenizer)
    raise SystemExit(f"--models: unknown model {name!r}: expected default or gpt2-small")


def measure(name: str, records, repeats: int) -> dict:
    ctx = model(name)
    for record in records[:2]:  # warm-up
        edit(ctx, record["prompt"], record["target_new"], progress=False).revert()
    times = {"edit": [], "fingerprint": [], "sha256_of_the_weight": []}
    for _ in range(repeats):
        for record in records:
            seconds, made = timed(lambda: edit(ctx, record["prompt"], record["target_new"], progress=False))
            made.revert()
            if not made.touched:  # skipped: the target already wins, nothing was written or fingerprinted
                continue
            times["edit"].append(seconds)
            touched = {key: ctx.weight_io(*key) for key in made.touched}
            times["fingerprint"].append(timed(lambda: fingerprint(ctx, touched))[0])
            data = memoryview(next(iter(touched.values())).detach().contiguous().numpy()).cast("B")
            times["sha256_of_the_weight"].append(timed(lambda: hashlib.sha256(data).digest())[0])
    if not times["edit"]:
        raise SystemExit(f"{name}: every edit was skipped (its target already won): nothing to measure")
    medians = {key: statistics.median(values) * 1000 for key, values in times.items()}
    skipped = len(records) * repeats - len(times["edit"])
    weight = next(iter(touched.values()))
    return {"model": name, "about": repr(ctx), "touched": [f"{layer}.{module}" for layer, module in touched],
            "touched_shape": list(weight.shape), "touched_mib": weight.numel() * weight.element_size() / 2**20,
            "median_ms": {key: round(value, 3) for key, value in medians.items()},
            "fingerprint_share_of_edit": round(medians["fingerprint"] / medians["edit"], 4),
            "edits_timed": len(times["edit"]), "edits_skipped": skipped}


def main(argv=None) -> int:
    args_parser = parser(__doc__, threads=1)
    args_parser.add_argument("--models", default="default,gpt2-small")
    args_parser.add_argument("--repeats", type=int, default=5)
    args_parser.add_argument("--prompts", type=int, default=20)
    args = args_parser.parse_args(argv)
    out = setup(args)
    records = load("counterfact", args.prompts)
    rows = [measure(name, records, args.repeats) for name in args.models.split(",")]
    result = {"prompts": len(records), "repeats": args.repeats, "torch": torch.__version__, **machine_info(),
              "budget": f"fingerprint <= {BUDGET:.0%} of an edit", "rows": rows,
              "within_budget": all(r["fingerprint_share_of_edit"] <= BUDGET for r in rows)}
    table = [f"First {len(records)} CounterFact records x {args.repeats} repeats, interleaved; medians in ms. The "
             "fingerprint is paid when an edit is saved and when a saved edit is applied.", "",
             markdown_table([{"model": r["model"], "touched weight": f"{r['touched_shape']} "
                                                                     f"({r['touched_mib']:.1f} MiB)",
                              "edit": r["median_ms"]["edit"], "fingerprint": r["median_ms"]["fingerprint"],
                              "sha256 of the weight (yardstick)": r["median_ms"]["sha256_of_the_weight"],
                              "share of the edit": f"{r['fingerprint_share_of_edit']:.1%}"} for r in rows])]
    if out is not None:
        write_result(out, "fingerprint_cost", result, table_key="rows", table=table)
    print("\n".join(table))
    return 0 if result["within_budget"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
