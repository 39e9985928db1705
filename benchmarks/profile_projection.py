"""Where the time of one batch's lens projection goes (blens_fast.lens.project_lists), on any device.

    PYTHONPATH=. python benchmarks/profile_projection.py [--model gpt-j] [--layers 2] [--device cuda] [--prompts 16]

Builds a random-init model at real dimensions, captures a batch of CounterFact prompts, then times
project_lists per implementation and prints torch.profiler's table of the heaviest operators.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blens_fast.bench import build_model  # noqa: E402
from blens_fast.capture import capture  # noqa: E402
from blens_fast.default_model import load_counterfact  # noqa: E402
from blens_fast.lens import project_lists  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt-j")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--impls", default="auto,triton,torch")
    args = parser.parse_args()
    model, tokenizer, _ = build_model(args.model, layers=args.layers, device=args.device,
                                      dtype=getattr(torch, args.dtype))
    facts = load_counterfact()[: args.prompts]
    cap = capture(model, tokenizer, [f["prompt"] for f in facts], [f["ground_truth"] for f in facts])
    rows = sum(e.num_tokens for e in cap.examples) * len(cap.layers)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for impl in args.impls.split(","):
        project_lists(cap, model, k=10, impl=impl)  # warm-up (compiles Triton)
        sync()
        start = time.perf_counter()
        for _ in range(5):
            project_lists(cap, model, k=10, impl=impl)
        sync()
        print(f"{impl}: {(time.perf_counter() - start) / 5 * 1e3:.1f} ms per batch "
              f"({args.prompts} prompts x {len(cap.layers)} layers = {rows} rows per factor)", flush=True)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        project_lists(cap, model, k=10)
        sync()
    key = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
