"""Benchmark the Backward Lens two ways (naive PyTorch vs blens_fast): time and peak memory per stage.

Runs the whole lens (gradients, their ranks, the projections of ff1_top / ff2_bottom / ff2_top) over N
CounterFact prompts both ways in one process, checks they give the same tokens and ranks, and writes
bench_<device>_<model>.{json,md,png} into --out.

Examples:
  blens bench --model gpt2-small --prompts 100 --naive-prompts 5 --out benchmarks/results
  blens bench --model gpt-j --layers 1 --prompts 8 --naive-prompts 1 --out benchmarks/results
  blens bench --model gpt-j --device cuda --dtype bfloat16 --prompts 100,300,1000 --naive-prompts 20 --out $OUT
"""
from __future__ import annotations

from ..bench import DTYPES, MODEL_SPECS, BenchConfig, run_bench


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected comma-separated integers, e.g. 10,100,1000") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{option} {text!r}: expected positive integers")
    return values


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="gpt2-small",
                        help=f"{', '.join(MODEL_SPECS)} (real dimensions, random initialisation), 'default' (the "
                             "shipped model) or a local checkpoint folder (default: gpt2-small)")
    parser.add_argument("--layers", type=int, default=None,
                        help="transformer blocks to build (random-init models; default: all, but 2 for gpt-j on "
                             "the CPU) or, for a loaded model, the first L layers to analyse")
    parser.add_argument("--prompts", default="100",
                        help="N, or a comma-separated sweep like 10,30,100 (the largest is compared both ways; "
                             "the others run blens_fast only, for the scaling plot). Default 100")
    parser.add_argument("--tokens", default=None,
                        help="T positions per prompt, or a sweep like 8,16,32 (default: CounterFact prompts as "
                             "they are, about 8 positions)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per blens_fast capture (default 8)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="at most this many padded positions per blens_fast capture (a longer prompt goes "
                             "alone); keeps peak memory flat in N (default: no limit)")
    parser.add_argument("--naive-prompts", type=int, default=None,
                        help="run the naive way on the first M prompts only and scale its time by N/M "
                             "(it is a loop over prompts); default: all N")
    parser.add_argument("--memory-prompts", type=int, default=None,
                        help="CPU only: the memory pass (torch.profiler) runs on the M longest prompts "
                             "(default: all)")
    parser.add_argument("--naive-single-pass", action="store_true",
                        help="CPU only: time the naive way in its (profiled) memory pass instead of running it twice "
                             "(for models whose dense SVDs take minutes)")
    parser.add_argument("--k", type=int, default=10, help="tokens per list (default 10)")
    parser.add_argument("--normalized", action="store_true", help="project unit-normalised vectors")
    parser.add_argument("--impl", default="auto", help="projection implementation (default auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0, help="random initialisation seed")
    parser.add_argument("--agreement", type=float, default=0.99,
                        help="fraction of equal tokens/ranks required to call the ways in agreement (default 0.99)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", required=True, help="directory for the JSON, markdown table and PNG")


def run(args) -> int:
    tokens = (None,) if args.tokens is None else _int_list(args.tokens, "--tokens")
    config = BenchConfig(model=args.model, layers=args.layers, prompts=_int_list(args.prompts, "--prompts"),
                         tokens=tokens,
                         device=args.device, dtype=args.dtype, batch_size=args.batch_size, max_tokens=args.max_tokens,
                         naive_prompts=args.naive_prompts, memory_prompts=args.memory_prompts, k=args.k,
                         normalized=args.normalized, impl=args.impl, threads=args.threads, seed=args.seed,
                         agreement=args.agreement, naive_single_pass=args.naive_single_pass,
                         progress=not args.no_progress, out=args.out)
    report = run_bench(config)
    main = next(r for r in report["runs"] if r["main"])
    ratios = main.get("ratios") or {}
    if ratios:
        print(f"naive / blens_fast at N={main['prompts']}: time {ratios['time']['end_to_end']:.3g}x, peak memory "
              f"beyond weights {ratios['memory_beyond_weights']['end_to_end']:.3g}x, total "
              f"{ratios['memory_total']['end_to_end']:.3g}x")
    print("wrote " + ", ".join(report["files"].values()))
    if "agree" in main and not main["agree"]:
        print("blens bench: the two ways DISAGREE beyond the --agreement threshold (see the report)")
        return 1
    return 0
