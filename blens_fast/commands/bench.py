"""Benchmark the Backward Lens two ways (plain PyTorch vs blens_fast): time and peak memory per stage, and agreement.

Runs the whole lens (gradients, their ranks, the projections of ff1_top / ff2_bottom / ff2_top) over N CounterFact
prompts both ways in one process, checks that they give the same ranks and tokens, and writes
bench_<device>_<model>[_<dtype>].{json,md,png} into --out. Exit code 1 when they disagree beyond --agreement.

Examples:
  blens bench --model gpt2-small --prompts 100 --naive-prompts 5 --out benchmarks/results
  blens bench --model gpt-j --depth 1 --prompts 8 --naive-prompts 1 --out benchmarks/results
  blens bench --model default --dtype bfloat16 --prompts 3 --naive-prompts 1 --out out/bench
  blens bench --model gpt-j --device cuda --dtype bfloat16 --prompts 100,300,1000 --naive-prompts 20 --out $OUT
"""
from __future__ import annotations

from ._common import add_batching, add_projection, int_list

MODEL_HELP = ("gpt2-small, gpt-j, tiny, tiny-gptj or tiny-llama (random initialisation at those dimensions), 'default' "
              "(the shipped model) or a local Hugging Face folder; an existing folder wins over a built-in name "
              "(default: default)")
OUT_DEFAULT = "out/bench"
OUT_HELP = "folder for the JSON, markdown table and PNG"


def add_arguments(parser) -> None:
    parser.add_argument("--depth", type=int, default=None,
                        help="transformer blocks built for a random-init model (default: all, but 2 for gpt-j on the "
                             "CPU), or the first N layers analysed of a loaded model (default: all)")
    parser.add_argument("--prompts", default="100",
                        help="N, or a comma-separated sweep like 10,30,100 (the largest is compared both ways; the "
                             "others run blens_fast only, for the scaling plot). Default 100")
    parser.add_argument("--tokens", default=None,
                        help="T positions per prompt, or a sweep like 8,16,32 (default: CounterFact prompts as they "
                             "are, about 8 positions)")
    add_batching(parser, batch_size=8)
    parser.add_argument("--naive-prompts", type=int, default=None,
                        help="run the naive way on the first M prompts only and scale its time by N/M (it is a loop "
                             "over prompts); default: all N")
    parser.add_argument("--memory-prompts", type=int, default=None,
                        help="CPU only: the memory pass (torch.profiler) runs on the M longest prompts (default: all)")
    parser.add_argument("--naive-single-pass", action="store_true",
                        help="CPU only: time the naive way in its (profiled) memory pass instead of running it twice "
                             "(for models whose dense SVDs take minutes)")
    add_projection(parser)
    parser.add_argument("--seed", type=int, default=0, help="random initialisation seed")
    parser.add_argument("--agreement", type=float, default=0.99,
                        help="fraction of equal ranks/tokens required to call the ways in agreement (default 0.99)")


def run(args) -> int:
    from ..bench import BenchConfig, run_bench

    tokens = (None,) if args.tokens is None else int_list(args.tokens, "--tokens")
    config = BenchConfig(model=args.model, depth=args.depth, prompts=int_list(args.prompts, "--prompts"),
                         tokens=tokens, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                         max_tokens=args.max_tokens, naive_prompts=args.naive_prompts,
                         memory_prompts=args.memory_prompts, k=args.k, unit_norm=args.unit_norm, impl=args.impl,
                         threads=args.threads, seed=args.seed, agreement=args.agreement,
                         naive_single_pass=args.naive_single_pass, progress=not args.quiet, out=args.out)
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
