"""The C++ projection of this checkout against the one-file C++ kernel of an earlier revision, side by side in one run.

    python benchmarks/compare_cpu_projection.py --baseline 4129458 --threads 1 --rounds 7

The baseline's ``csrc/cpu/topk_cpu.cpp`` (the kernel before the split into topk_kernel.cpp + topk_binding.cpp, which
also had the Python module in it) is taken from git and JIT-built into the cache folder as its own module; both take
the same arguments. Per shape (rows N, d, V = 50,257; float32 and bfloat16; k = 10, top and bottom lists and target
counts, as the lens asks) every round runs the baseline, this checkout and the float32 GEMM alone writing the N x V
logits, in turn. Reported: the minimum over the rounds of the wall time and of the process CPU time
(``time.process_time``: on a machine shared with other work the CPU time moves far less than the wall time), and the
ratios this checkout / baseline. Results: ``compare_cpu_projection_<threads>threads.{json,md}`` in ``--out``.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import torch
from _common import machine_info, markdown_table, parser, setup, write_result

from blens_fast._io import atomic_write_text, cache_folder, refuse_symlinks
from blens_fast.ops import _extension

ROOT = Path(__file__).resolve().parents[1]
V = 50257


def baseline_module(revision: str):
    """The one-file C++ kernel of ``revision``, JIT-built with this checkout's compiler flags."""
    from torch.utils import cpp_extension

    from blens_fast.ops.build_flags import CPU_CXX_FLAGS, CPU_LINK_FLAGS

    source = subprocess.run(["git", "show", f"{revision}:csrc/cpu/topk_cpu.cpp"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    folder = cache_folder(f"baseline_topk_{revision}")
    refuse_symlinks(folder, "kernel build folder")
    path = folder / "topk_cpu.cpp"
    if not path.exists() or path.read_text() != source:
        atomic_write_text(path, source)
    name = f"blens_baseline_topk_{revision}"
    return cpp_extension.load(name=name, sources=[str(path)], extra_cflags=CPU_CXX_FLAGS,
                              extra_ldflags=CPU_LINK_FLAGS, build_directory=str(folder), verbose=False)


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--baseline", required=True, help="git revision whose csrc/cpu/topk_cpu.cpp is the baseline")
    p.add_argument("--shapes", default="1x768,6x768,64x768,1024x768,4096x256",
                   help="N x d per shape, comma-separated (V = 50,257)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    out = setup(args)
    ways = {"baseline": baseline_module(args.baseline), "this": _extension.extension("cpu")}
    rows = []
    for shape in args.shapes.split(","):
        n, d = (int(x) for x in shape.split("x"))
        for dtype_name in args.dtypes.split(","):
            g = torch.Generator().manual_seed(0)
            dtype = getattr(torch, dtype_name)
            weight = (torch.randn(V, d, generator=g) / d ** 0.5).to(dtype)
            hidden = torch.randn(n, d, generator=g).to(dtype)
            targets = torch.randint(0, V, (n,), generator=g)
            tau = torch.zeros(n)
            hidden32, weight32 = hidden.float(), weight.float()
            calls = {name: (lambda m=module: m.topk_logits(hidden, weight, None, None, None, None, None, 10, True,
                                                            True, targets, tau, 0, 0, 0))
                     for name, module in ways.items()}
            calls["gemm_f32"] = lambda: hidden32 @ weight32.T
            wall = {name: [] for name in calls}
            cpu = {name: [] for name in calls}
            for call in calls.values():  # warm-up
                call()
            for _ in range(args.rounds):
                for name, call in calls.items():
                    start, start_cpu = time.perf_counter(), time.process_time()
                    call()
                    cpu[name].append(time.process_time() - start_cpu)
                    wall[name].append(time.perf_counter() - start)
            row = {"N": n, "d": d, "dtype": dtype_name}
            for name in calls:
                row[f"{name} ms"] = round(min(wall[name]) * 1e3, 2)
                row[f"{name} cpu ms"] = round(min(cpu[name]) * 1e3, 2)
            row["this / baseline"] = round(min(wall["this"]) / min(wall["baseline"]), 3)
            row["this / baseline (cpu)"] = round(min(cpu["this"]) / min(cpu["baseline"]), 3)
            rows.append(row)
            print(row, flush=True)
    result = {**machine_info(torch.device("cpu")), "baseline": args.baseline, "rounds": args.rounds, "V": V, "k": 10,
              "lists": "top, bottom and target counts", "rows": rows}
    if out is not None:
        write_result(out, f"compare_cpu_projection_{torch.get_num_threads()}threads", result, table_key="rows",
                     table=[markdown_table(rows)])


if __name__ == "__main__":
    main()
