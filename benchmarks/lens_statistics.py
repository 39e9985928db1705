"""Backward Lens statistics over CounterFact prompts on the shipped default model.

Measures (i) how often the target is among the bottom-k tokens of the last layer's FF2 VJP at the last
position (the paper's Lemma 5.1 says it is the least probable token there), and (ii) per layer and module, how
often the gradient's rank equals the token count. The loss is the paper's: the target's first token only.

    python benchmarks/lens_statistics.py --n 200 --out benchmarks/results
"""
from __future__ import annotations

import pandas as pd
import torch
from _common import machine_info, markdown_table, parser, setup, timed, write_result

import blens_fast as bl
from blens_fast._ui import progress_bar
from blens_fast.counterfact import load


def lens_statistics(ctx, records, *, k: int, batch_size: int) -> dict:
    """The target's rank in the last layer's FF2 bottom list at the last position, and every gradient's rank against
    its token count, over ``records``."""
    tokenizer = ctx.tokenizer
    prompts = [r["prompt"] for r in records]
    targets = [tokenizer.decode(tokenizer(" " + r["target"]).input_ids[:1]) for r in records]  # the first token
    last_layer = ctx.num_layers - 1
    ranks, gradients = [], []
    for first in progress_bar(range(0, len(prompts), batch_size), desc="lens statistics", unit="batch"):
        cap = bl.capture(ctx, prompts[first:first + batch_size], targets[first:first + batch_size])
        for report in bl.analyze(ctx, cap, k=k):
            ranks.append(int(report.target_rank["ff2_bottom"][report.layers.index(last_layer), -1]))
            gradients.append(report.gradients)
    table = pd.concat(gradients, ignore_index=True)
    table["full"] = table["rank"] == table["tokens"]
    per_layer = (table.groupby(["layer", "module"])["full"].mean() * 100).round(2).reset_index()
    n = len(records)
    return {"target_in_bottom_k_last_layer_ff2_last_position_pct": round(100 * sum(r <= k for r in ranks) / n, 2),
            "target_is_bottom_1_pct": round(100 * sum(r == 1 for r in ranks) / n, 2),
            "median_target_rank_from_bottom": float(torch.tensor(ranks, dtype=torch.float64).median()),
            "rank_equals_token_count_pct": per_layer.to_dict(orient="records")}


def main(argv=None) -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--n", type=int, default=200, help="records from the start of the edit file")
    args_parser.add_argument("--k", type=int, default=10)
    args_parser.add_argument("--batch-size", type=int, default=16)
    args = args_parser.parse_args(argv)
    out = setup(args)
    ctx = bl.load_default_model()
    records = load("counterfact", args.n)
    seconds, found = timed(lambda: lens_statistics(ctx, records, k=args.k, batch_size=args.batch_size))
    result = {"model": "blens_fast default model (GPT-2 architecture, 4 layers, width 256)", "records": len(records),
              "k": args.k, **machine_info(), "seconds": round(seconds, 2), **found}
    per_layer = pd.DataFrame(found["rank_equals_token_count_pct"]).pivot(index="layer", columns="module",
                                                                         values="full")
    table = [f"Target's first token among the bottom-{args.k} tokens of the last layer's FF2 VJP at the last "
             f"position: **{result['target_in_bottom_k_last_layer_ff2_last_position_pct']}%** (the very bottom "
             f"token: {result['target_is_bottom_1_pct']}%).",
             "", "Share of examples whose gradient rank equals the token count (%):", "",
             markdown_table(per_layer, index=True), "",
             "The last layer's gradients have rank 1 by construction under a one-token last-position loss (only the "
             "last position's VJP is non-zero there)."]
    write_result(out, "lens_statistics", result, table_key="rank_equals_token_count_pct", table=table, echo=False)
    print("\n".join(table))


if __name__ == "__main__":
    main()
