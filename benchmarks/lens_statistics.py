"""Backward Lens statistics over CounterFact prompts on the shipped default model.

Measures (i) how often the target is among the bottom-k tokens of the last layer's FF2 VJP at the last
position (the paper's Lemma 5.1 says it is the least probable token there), and (ii) per layer and module, how
often the gradient's rank equals the token count. The loss is the paper's: the target's first token only.

    python benchmarks/lens_statistics.py --n 200 --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from blens_fast._report import machine_description, markdown_table
from blens_fast.capture import capture
from blens_fast.default_model import load_counterfact, load_default_model
from blens_fast.lens import analyze


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="records from the start of the edit file")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    model, tokenizer = load_default_model()
    records = load_counterfact()[: args.n]
    prompts = [r["prompt"] for r in records]
    targets = [tokenizer.decode(tokenizer(" " + r["ground_truth"]).input_ids[:1]) for r in records]
    last_layer = model.config.n_layer - 1
    hits, ranks, rows = 0, [], []
    start = time.perf_counter()
    for first in tqdm(range(0, len(prompts), args.batch_size), desc="lens statistics", unit="batch"):
        cap = capture(model, tokenizer, prompts[first:first + args.batch_size],
                      targets[first:first + args.batch_size], modules=("mlp.in", "mlp.out"))
        for report in analyze(cap, model, tokenizer, k=args.k):
            li = report.layers.index(last_layer)
            rank = int(report.target_rank["ff2_bottom"][li, -1])
            ranks.append(rank)
            hits += rank <= args.k
            rows.append(report.gradients)
    seconds = time.perf_counter() - start
    gradients = pd.concat(rows, ignore_index=True)
    gradients["full"] = gradients["rank"] == gradients["tokens"]
    per_layer = (gradients.groupby(["layer", "module"])["full"].mean() * 100).round(2).reset_index()
    result = {
        "model": "blens_fast default model (GPT-2 architecture, 4 layers, width 256)",
        "records": len(prompts), "k": args.k,
        "machine": machine_description(), "seconds": round(seconds, 2),
        "target_in_bottom_k_last_layer_ff2_last_position_pct": round(100 * hits / len(prompts), 2),
        "target_is_bottom_1_pct": round(100 * sum(r == 1 for r in ranks) / len(prompts), 2),
        "median_target_rank_from_bottom": float(torch.tensor(ranks, dtype=torch.float64).median()),
        "rank_equals_token_count_pct": per_layer.to_dict(orient="records"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lens_statistics.json").write_text(json.dumps(result, indent=2) + "\n")
    table = per_layer.pivot(index="layer", columns="module", values="full")
    lines = [f"# Backward Lens statistics, default model, first {len(prompts)} CounterFact records",
             "", f"Machine: {result['machine']}; {seconds:.1f} s.", "",
             f"- Target's first token among the bottom-{args.k} tokens of the last layer's FF2 VJP at the last "
             f"position: **{result['target_in_bottom_k_last_layer_ff2_last_position_pct']}%** "
             f"(the very bottom token: {result['target_is_bottom_1_pct']}%).",
             "", "Share of examples whose gradient rank equals the token count (%):", "",
             markdown_table(table, index=True), "",
             "The last layer's gradients have rank 1 by construction under a one-token last-position loss "
             "(only the last position's VJP is non-zero there)."]
    (out / "lens_statistics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
