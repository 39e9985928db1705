"""Benchmarks of gradient_stats (results under benchmarks/results/stats_*.{json,md}).

memory:   the bytes gradient_stats holds (sketch accumulators + Gaussian test matrices) against accumulating dense
          gradients, at GPT-J-6B dimensions (d = 4096, MLP 16384, 28 layers, mlp.in + mlp.out), for the whole model
          and for a single module counting its own test matrices; plus the time of one fused update there.
accuracy: on a small model, the top singular values of the summed gradient over a set of CounterFact facts
          from the one-pass sketch against the dense sum (SVD of the explicitly summed d_in x d_out gradient).

    python benchmarks/bench_stats.py memory
    python benchmarks/bench_stats.py accuracy [--model default] [--records 200] [--rank 8] [--threads 1]
"""
from __future__ import annotations

import argparse

import torch
from _common import add_shared, machine_info, markdown_table, median_seconds, setup, timed, write_result


def memory(args) -> dict:
    from blens_fast.ops.lowrank import SKETCH
    from blens_fast.stats import StatsAccumulator

    d, d_ff, layers = 4096, 16384, 28
    shapes = {}
    for layer in range(layers):
        shapes[(layer, "mlp.in")] = (d, d_ff)
        shapes[(layer, "mlp.out")] = (d_ff, d)
    dense_bytes_module = d * d_ff * 4
    acc = StatsAccumulator(shapes, rank=args.rank)
    whole = acc.nbytes()
    single = StatsAccumulator({(0, "mlp.in"): shapes[(0, "mlp.in")]}, rank=args.rank).nbytes()
    norms_bytes = 8 * len(shapes) * args.examples  # one float64 norm per example and module
    # one fused update at these dimensions (T tokens), as the backward hook hands X and Delta over
    g = torch.Generator().manual_seed(0)
    t_tokens = 32
    x = torch.randn(t_tokens, d, generator=g)
    delta = torch.randn(t_tokens, d_ff, generator=g)
    key = (0, "mlp.in")
    acc.update_factors(key, [x], [delta])  # warm-up, builds the test matrices
    seconds = median_seconds(lambda: acc.update_factors(key, [x], [delta]), args.repeats)
    # what a dense accumulation does per example (plus the d x 4d add)
    dense_seconds = median_seconds(lambda: x.T @ delta, max(1, args.repeats // 2))
    return {"benchmark": "memory", "dims": {"d_model": d, "d_mlp": d_ff, "layers": layers,
                                            "modules": ["mlp.in", "mlp.out"]},
            "rank": args.rank, "sketch_sizes_k_l_m": list(acc.sizes),
            "dense_bytes_all_modules": dense_bytes_module * len(shapes), "stats_bytes_all_modules": whole,
            "ratio_all_modules": whole / (dense_bytes_module * len(shapes)),
            "dense_bytes_one_module": dense_bytes_module, "stats_bytes_one_module_own_test_matrices": single,
            "ratio_one_module": single / dense_bytes_module,
            "per_example_norm_bytes_for_examples": {"examples": args.examples, "bytes": norms_bytes},
            "target_ratio": 0.02, "fused_update_seconds_T32": seconds,
            "fused_update_impl": SKETCH.resolve("auto", "cpu").name, "dense_outer_product_seconds_T32": dense_seconds,
            **machine_info()}


def accuracy(args) -> dict:
    from blens_fast import capture, load_model
    from blens_fast._checks import parse_layers
    from blens_fast.counterfact import load
    from blens_fast.stats import gradient_stats

    ctx = load_model(args.model)
    records = load("counterfact", args.records)
    layers = parse_layers(args.layers, "--layers")
    stats_seconds, stats = timed(lambda: gradient_stats(ctx, records, layers=layers, rank=args.rank,
                                                        batch_size=args.batch_size, sketch_size=args.sketch_size,
                                                        seed=args.seed, progress=False))

    def dense_sums() -> dict:
        sums: dict = {}
        for i in range(0, len(records), args.batch_size):
            chunk = records[i:i + args.batch_size]
            cap = capture(ctx, [r["prompt"] for r in chunk], [r["target"] for r in chunk], layers=layers)
            for key in stats.summed:
                g = cap.gradient(*key).dense().double()
                sums[key] = g if key not in sums else sums[key] + g
        return sums

    dense_seconds, dense = timed(dense_sums)
    rows = []
    for key, summed in stats.summed.items():
        s = torch.linalg.svdvals(dense[key])
        r = summed.singular_values.shape[0]
        rel = ((summed.singular_values - s[:r]).abs() / s[:r]).tolist()
        frob = dense[key].norm().item()
        rows.append({"layer": key[0], "module": key[1], "shape": list(summed.shape),
                     "top_singular_values_dense": s[:r].tolist(), "relative_errors": rel,
                     "max_relative_error_top_r": max(rel), "relative_error_top1": rel[0],
                     "frobenius_dense": frob, "frobenius_estimate": summed.frobenius,
                     "frobenius_relative_error": summed.frobenius / frob - 1,
                     "energy_share_estimate": summed.energy_share,
                     "energy_share_dense": float((s[:r] ** 2).sum() / frob ** 2),
                     "approximation_error_estimate": summed.approximation_error})
    worst = max(row["max_relative_error_top_r"] for row in rows)
    return {"benchmark": "accuracy", "model": args.model, "records": len(records), "rank": args.rank,
            "sketch_sizes_k_l_m": list(stats.sketch), "seed": args.seed, "target_relative_error": 1e-3,
            "worst_relative_error_top_r": worst,
            "worst_relative_error_top1": max(row["relative_error_top1"] for row in rows),
            "stats_seconds": stats_seconds, "dense_seconds": dense_seconds, "modules": rows, **machine_info()}


def write(result: dict, out, name: str) -> None:
    table = []
    if "modules" in result:
        table = [markdown_table([{"layer": m["layer"], "module": m["module"],
                                  "max rel. error top-r": f"{m['max_relative_error_top_r']:.2e}",
                                  "rel. error top-1": f"{m['relative_error_top1']:.2e}",
                                  "frobenius rel. error": f"{m['frobenius_relative_error']:+.2e}",
                                  "energy share (est / dense)": f"{m['energy_share_estimate']:.4f} / "
                                                                f"{m['energy_share_dense']:.4f}"}
                                 for m in result["modules"]])]
    write_result(out, name, result, table_key="modules", table=table)
    for m in result.get("modules", []):
        print(m["layer"], m["module"], f"{m['max_relative_error_top_r']:.2e}", f"{m['frobenius_relative_error']:+.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--rank", type=int, default=8)
    m.add_argument("--examples", type=int, default=20000)
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument("--name", default="stats_memory")
    a = sub.add_parser("accuracy")
    a.add_argument("--model", default="default")
    a.add_argument("--records", type=int, default=200)
    a.add_argument("--rank", type=int, default=8)
    a.add_argument("--sketch-size", type=int, default=None)
    a.add_argument("--layers", default=None)
    a.add_argument("--batch-size", type=int, default=16)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--name", default="stats_accuracy")
    add_shared(m)
    add_shared(a, threads=1)
    args = parser.parse_args()
    out = setup(args)
    write(memory(args) if args.what == "memory" else accuracy(args), out, args.name)


if __name__ == "__main__":
    main()
