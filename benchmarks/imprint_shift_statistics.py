"""Imprint and shift over CounterFact prompts on the shipped model: the paper's mechanism, measured.

For each of the first N records (default 200) the new object is trained into the FF1 and FF2 weights of every layer
with SGD and with Adam (:func:`blens_fast.imprint_shift`, 5 steps each, default step sizes), and this script
aggregates: the imprint fraction of FF1's updates (the share in span{x_i}), the cosine of each layer's FF2 shift
with the target's unembedding row against random tokens, the target's probability, and per step and layer the share
of prompts whose target is among the top 10 of the lens lists at the last position.

    python benchmarks/imprint_shift_statistics.py [--n 200] [--steps 5] [--threads 1]
writes imprint_shift_statistics.json / .md (and one example's PNG) into --out (default benchmarks/results).
"""
from __future__ import annotations

import time

import torch

import _common
import blens_fast as bl

#: the lens lists this summary follows
FOLLOWED = ("ff1_top", "ff2_bottom")


def aggregate(reports: list, k: int) -> dict:
    """Means over prompts of one optimizer's reports."""
    first = reports[0]
    layers, steps = first.layers, first.steps
    imprint = torch.stack([torch.stack([r.imprint[(layer, "mlp.in")] for layer in layers])
                           for r in reports])  # prompts x layers x steps
    cos = torch.stack([r.shift_cosine for r in reports])  # prompts x steps x layers
    base_mean = torch.stack([r.shift_baseline[..., 0] for r in reports])
    base_std = torch.stack([r.shift_baseline[..., 1] for r in reports])
    z = (cos - base_mean) / base_std
    probs = torch.stack([r.target_prob for r in reports])
    in_lists = {name: torch.zeros(steps + 1, len(layers)) for name in FOLLOWED}
    for r in reports:
        ranks = r.lens_ranks()
        last = ranks[(ranks.position == ranks.position.max()) & ~ranks.degenerate]
        for name in FOLLOWED:
            hit = last[(last.list == name) & (last.target_rank <= k)]
            for step, layer in zip(hit.step, hit.layer):
                in_lists[name][step, layers.index(layer)] += 1
    return {
        "prompts": len(reports),
        "imprint_fraction_first_step": {"mean": float(imprint[..., 0].mean()), "min": float(imprint[..., 0].min())},
        "imprint_fraction_all_steps": {"mean": float(imprint.mean()), "min": float(imprint.min())},
        "imprint_fraction_per_layer_first_step": {str(layer): float(imprint[:, i, 0].mean())
                                                  for i, layer in enumerate(layers)},
        "shift_cosine_first_step_per_layer": {str(layer): float(cos[:, 0, i].mean()) for i, layer in enumerate(layers)},
        "random_token_cosine_first_step_per_layer": {
            str(layer): {"mean": float(base_mean[:, 0, i].mean()), "std": float(base_std[:, 0, i].mean())}
            for i, layer in enumerate(layers)},
        "shift_z_first_step_per_layer": {str(layer): float(z[:, 0, i].mean()) for i, layer in enumerate(layers)},
        "share_shift_cosine_beyond_2sd_first_step": float((z[:, 0] > 2).float().mean()),
        "target_probability_per_step": [float(p) for p in probs.mean(0)],
        f"share_target_in_top{k}_last_position": {
            name: {f"step {s}": {str(layer): float(v) / len(reports) for layer, v in zip(layers, row.tolist())}
                   for s, row in enumerate(table)} for name, table in in_lists.items()},
    }


def markdown(result: dict, k: int) -> list[str]:
    lines = ["| | SGD | Adam |", "|---|---|---|"]
    sgd, adam = result["sgd"], result["adam"]
    lines.append(f"| FF1 imprint fraction, first step: mean (min) | {sgd['imprint_fraction_first_step']['mean']:.6f} "
                 f"({sgd['imprint_fraction_first_step']['min']:.6f}) | {adam['imprint_fraction_first_step']['mean']:.3f} "
                 f"({adam['imprint_fraction_first_step']['min']:.3f}) |")
    lines.append(f"| FF1 imprint fraction, all steps: mean | {sgd['imprint_fraction_all_steps']['mean']:.6f} | "
                 f"{adam['imprint_fraction_all_steps']['mean']:.3f} |")
    lines.append(f"| FF2 shift cosine with the target > random tokens + 2 sd (first step, all layers) | "
                 f"{100 * sgd['share_shift_cosine_beyond_2sd_first_step']:.1f}% | "
                 f"{100 * adam['share_shift_cosine_beyond_2sd_first_step']:.1f}% |")
    lines.append("| target probability per step | " + " -> ".join(f"{p:.3f}" for p in sgd["target_probability_per_step"])
                 + " | " + " -> ".join(f"{p:.3f}" for p in adam["target_probability_per_step"]) + " |")
    lines += ["", "Per layer (first step):", "",
              "| layer | SGD imprint | Adam imprint | SGD shift cos | random-token cos (mean +- sd) | SGD shift z | "
              "Adam shift cos |", "|---|---|---|---|---|---|---|"]
    for layer in sgd["shift_cosine_first_step_per_layer"]:
        rnd = sgd["random_token_cosine_first_step_per_layer"][layer]
        lines.append(f"| {layer} | {sgd['imprint_fraction_per_layer_first_step'][layer]:.6f} | "
                     f"{adam['imprint_fraction_per_layer_first_step'][layer]:.3f} | "
                     f"{sgd['shift_cosine_first_step_per_layer'][layer]:+.3f} | {rnd['mean']:+.3f} +- {rnd['std']:.3f}"
                     f" | {sgd['shift_z_first_step_per_layer'][layer]:.1f} | "
                     f"{adam['shift_cosine_first_step_per_layer'][layer]:+.3f} |")
    for name in FOLLOWED:
        table = sgd[f"share_target_in_top{k}_last_position"][name]
        layers = list(next(iter(table.values())))
        lines += ["", f"SGD: share of prompts whose target is in the top {k} of `{name}` at the last position, per "
                      "step (weights before the step) and layer:", "",
                  "| step | " + " | ".join(f"layer {layer}" for layer in layers) + " |",
                  "|---|" + "---|" * len(layers)]
        for step, row in table.items():
            lines.append(f"| {step} | " + " | ".join(f"{100 * row[layer]:.1f}%" for layer in layers) + " |")
    return lines


def main() -> None:
    parser = _common.parser(__doc__, threads=1)
    parser.add_argument("--n", type=int, default=200, help="CounterFact records (default 200)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per record (default 5)")
    parser.add_argument("--k", type=int, default=10, help="list length for the 'target in the list' shares")
    args = parser.parse_args()
    out = _common.setup(args)
    ctx = bl.load_default_model()
    records = bl.counterfact.load(n=args.n)
    started = time.perf_counter()
    reports = {"sgd": [], "adam": []}
    for i, record in enumerate(records):
        for optimizer in reports:
            reports[optimizer].append(bl.imprint_shift(ctx, record["prompt"], record["target_new"], steps=args.steps,
                                                       optimizer=optimizer, k=args.k))
        if (i + 1) % 20 == 0:
            print(f"{i + 1}/{len(records)} records, {time.perf_counter() - started:.0f} s", flush=True)
    result = {"records": f"CounterFact edit file records 0-{args.n - 1}, new object (target_new) as the target",
              "model": "the shipped default model", "steps": args.steps,
              "step_sizes": {name: reports[name][0].lr for name in reports},
              "sgd": aggregate(reports["sgd"], args.k), "adam": aggregate(reports["adam"], args.k),
              "seconds": round(time.perf_counter() - started, 1), **_common.machine_info()}
    if out is not None:
        _common.write_result(out, "imprint_shift_statistics", result, table=markdown(result, args.k))
        reports["sgd"][0].plot(out / "imprint_shift_example.png")
    else:
        print("\n".join(markdown(result, args.k)))


if __name__ == "__main__":
    main()
