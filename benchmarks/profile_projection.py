"""Where the time of one batch's lens projection goes (blens_fast.lens.lens_lists), on any device.

    python benchmarks/profile_projection.py [--model gpt-j] [--depth 2] [--device cuda] [--prompts 16]

Builds a random-init model at real dimensions (a bench model spec), captures a batch of CounterFact prompts, then
times lens_lists per implementation (median of --repeats) and prints torch.profiler's table of the heaviest
operators; with --out, also writes profile_projection_<device>.{json,md}.
"""
from __future__ import annotations

import torch
from _common import machine_info, markdown_table, median_seconds, parser, setup, write_result

from blens_fast.bench.run import build_model, make_prompts
from blens_fast.capture import capture
from blens_fast.lens import lens_lists


def main(argv=None) -> None:
    args_parser = parser(__doc__, out=None)
    args_parser.add_argument("--model", default="gpt-j", help="a bench model spec, 'default' or a folder")
    args_parser.add_argument("--depth", type=int, default=2, help="transformer blocks built")
    args_parser.add_argument("--device", default="cuda")
    args_parser.add_argument("--dtype", default="bfloat16")
    args_parser.add_argument("--prompts", type=int, default=16)
    args_parser.add_argument("--impls", default="auto,triton,torch")
    args_parser.add_argument("--repeats", type=int, default=5)
    args = args_parser.parse_args(argv)
    out = setup(args)
    ctx, info = build_model(args.model, depth=args.depth, device=args.device, dtype=getattr(torch, args.dtype))
    cap = capture(ctx, *make_prompts(ctx.tokenizer, args.prompts), layers=list(range(info.depth)))
    rows = sum(e.num_tokens for e in cap.examples) * len(cap.layers)
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else None
    found = []
    for impl in args.impls.split(","):
        lens_lists(ctx, cap, k=10, impl=impl)  # warm-up (compiles Triton)
        seconds = median_seconds(lambda: lens_lists(ctx, cap, k=10, impl=impl), args.repeats, sync=sync)
        found.append({"impl": impl, "ms per batch": round(seconds * 1e3, 1)})
        print(f"{impl}: {seconds * 1e3:.1f} ms per batch ({args.prompts} prompts x {len(cap.layers)} layers = "
              f"{rows} rows per factor)", flush=True)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        lens_lists(ctx, cap, k=10)
        if sync is not None:
            sync()
    key = "cuda_time_total" if ctx.device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))
    if out is not None:
        result = {"model": info.about, "dtype": args.dtype, "prompts": args.prompts, "rows_per_factor": rows,
                  **machine_info(ctx.device), "impls": found}
        write_result(out, f"profile_projection_{ctx.device.type}", result, table_key="impls",
                     table=[markdown_table(found)])


if __name__ == "__main__":
    main()
