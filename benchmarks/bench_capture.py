"""Capture against an ordinary backward: bytes held, and the spectrum from factors against the dense gradient.

(1) memory: the bytes :func:`blens_fast.capture` holds (X and Delta of ``mlp.in`` and ``mlp.out`` at every layer)
against the parameter gradients an ordinary ``loss.backward()`` leaves in ``.grad`` (all parameters, as one gets
them by default; and only the same MLP matrices), for 32-token prompts, at GPT-2-small and GPT-J dimensions
(random initialisation; GPT-J with fewer layers on the CPU, and its full 28-layer figure computed from the
per-layer bytes measured). The ``.grad`` of a batch is one summed copy; per-example analysis needs one dense
gradient per example, which the table also gives.

(2) spectrum: :meth:`LowRankGradient.svdvals` / :meth:`~LowRankGradient.rank` against the dense gradient with
``torch.linalg.svdvals`` / ``torch.linalg.matrix_rank`` at d=768, 4d=3072, 16 tokens, float32, side by side in
one run, the dense gradient in both weight layouts (``[768, 3072]`` as GPT-2's ``Conv1D`` and ``[3072, 768]`` as
``nn.Linear``; the factors are the same). Each timed call of the fast path builds its gradient afresh, so that the
gradient's cached spectrum is not what is timed.

    python benchmarks/bench_capture.py --threads 1 --out benchmarks/results
"""
from __future__ import annotations

import time

import torch
from _common import machine_info, markdown_table, median_seconds, parser, setup, write_result

from blens_fast._report import figure_png, pyplot, write_file
from blens_fast.batching import target_log_probs
from blens_fast.bench.run import build_model, make_prompts
from blens_fast.capture import capture
from blens_fast.lists import LENS_MODULES as MODULES
from blens_fast.lowrank import LowRankGradient


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def capture_memory(spec: str, depth: int | None, tokens: int, batches=(1, 8)) -> list[dict]:
    ctx, info = build_model(spec, depth=depth)
    model = ctx.model
    rows = []
    for batch in batches:
        prompts, targets = make_prompts(ctx.tokenizer, batch, tokens)
        cap = capture(ctx, prompts, targets, modules=MODULES)
        held = _bytes([t for store in (cap.x, cap.delta) for parts in store.values() for t in parts])
        # an ordinary backward of the same loss (padded batch, parameter gradients)
        model.zero_grad(set_to_none=True)
        examples = ctx.tokenize(prompts, targets)
        ids, mask = ctx.pad([e.input_ids for e in examples])
        loss = -target_log_probs(model(input_ids=ids, attention_mask=mask).logits, examples).sum()
        loss.backward()
        grads_all = _bytes([p.grad for p in model.parameters() if p.grad is not None])
        grads_mlp = _bytes([ctx.weight(layer, m).grad for layer in range(info.depth)
                            for m in ctx.resolve_modules(MODULES)])
        model.zero_grad(set_to_none=True)
        row = dict(model=info.name, about=info.about, layers=info.depth, full_layers=info.full_depth,
                   prompts=batch, positions=sum(e.num_tokens for e in examples), capture_bytes=held,
                   param_grad_bytes_all=grads_all, param_grad_bytes_mlp=grads_mlp,
                   per_example_dense_mlp_bytes=grads_mlp * batch, computed_for_full_depth=False)
        rows.append(row)
        if info.depth < info.full_depth:
            # the same at full depth: per-layer bytes (measured) x full depth + the rest (embeddings, final norm)
            full, per_layer = info.full_depth, 1 / info.depth
            per_layer_all = _bytes(ctx.adapter.layers(model)[0].parameters())
            rest = grads_all - per_layer_all * info.depth
            rows.append(dict(row, model=f"{spec} (all {full} layers, computed)", layers=full,
                             capture_bytes=int(held * per_layer * full),
                             param_grad_bytes_all=int(rest + per_layer_all * full),
                             param_grad_bytes_mlp=int(grads_mlp * per_layer * full),
                             per_example_dense_mlp_bytes=int(grads_mlp * per_layer * full * batch),
                             computed_for_full_depth=True))
    return rows


def spectrum_speed(d: int = 768, d_ff: int = 3072, tokens: int = 16, dense_repeats: int = 3,
                   fast_repeats: int = 30) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(tokens, d)
    delta = torch.randn(tokens, d_ff) * 1e-3
    rows = []
    g = LowRankGradient(x, delta)
    for layout, stored in (("in_out", g.dense), ("out_in", lambda: delta.T @ x)):  # the dense .grad, as stored
        dense = stored().contiguous()
        s_fast, s_dense = g.svdvals(), torch.linalg.svdvals(dense)
        t = dict(
            fast_svdvals=median_seconds(lambda: LowRankGradient(x, delta).svdvals(), fast_repeats),
            fast_rank=median_seconds(lambda: LowRankGradient(x, delta).rank(), fast_repeats),
            dense_form=median_seconds(stored, fast_repeats),
            dense_svdvals=median_seconds(lambda: torch.linalg.svdvals(dense), dense_repeats),
            dense_rank=median_seconds(lambda: torch.linalg.matrix_rank(dense), dense_repeats),
        )
        rows.append(dict(layout=layout, shape=list(dense.shape), tokens=tokens, rank_fast=g.rank(),
                         rank_dense=int(torch.linalg.matrix_rank(dense)),
                         svdvals_max_rel_err=float((s_fast[:tokens] - s_dense[:tokens].double()).abs().max()
                                                   / s_dense[0]), seconds=t,
                         speedup_svdvals=(t["dense_form"] + t["dense_svdvals"]) / t["fast_svdvals"],
                         speedup_rank=(t["dense_form"] + t["dense_rank"]) / t["fast_rank"],
                         speedup_svdvals_given_dense=t["dense_svdvals"] / t["fast_svdvals"],
                         speedup_rank_given_dense=t["dense_rank"] / t["fast_rank"]))
    return rows


def _mib(b: float) -> str:
    return f"{b / 2**20:,.2f}"


def memory_table(rows) -> list[str]:
    def ratio(key, r):
        return f"{r[key] / r['capture_bytes']:.1f}x"

    return [markdown_table([{"model": r["model"], "layers": r["layers"], "prompts": r["prompts"],
                             "positions": r["positions"], "capture MiB": _mib(r["capture_bytes"]),
                             "all .grad MiB": _mib(r["param_grad_bytes_all"]),
                             "ratio": ratio("param_grad_bytes_all", r),
                             "MLP .grad MiB": _mib(r["param_grad_bytes_mlp"]),
                             "MLP ratio": ratio("param_grad_bytes_mlp", r),
                             "per-example MLP grads MiB": _mib(r["per_example_dense_mlp_bytes"]),
                             "per-example ratio": ratio("per_example_dense_mlp_bytes", r)} for r in rows]),
            "", "![bytes held](capture_memory.png)"]


def spectrum_table(rows) -> list[str]:
    def ms(v, digits=3):
        return f"{v * 1e3:.{digits}g} ms"

    return [markdown_table([{"weight shape": f"{r['shape'][0]} x {r['shape'][1]}",
                             "LowRankGradient.svdvals": ms(r["seconds"]["fast_svdvals"]),
                             "dense svdvals": ms(r["seconds"]["dense_svdvals"], 4),
                             "speedup (total / given dense)": f"{r['speedup_svdvals']:.0f}x / "
                                                              f"{r['speedup_svdvals_given_dense']:.0f}x",
                             "LowRankGradient.rank": ms(r["seconds"]["fast_rank"]),
                             "dense matrix_rank": ms(r["seconds"]["dense_rank"], 4),
                             "rank speedup (total / given dense)": f"{r['speedup_rank']:.0f}x / "
                                                                   f"{r['speedup_rank_given_dense']:.0f}x",
                             "ranks": f"{r['rank_fast']} / {r['rank_dense']}",
                             "svdvals max rel err": f"{r['svdvals_max_rel_err']:.1e}"} for r in rows]),
            "", "![spectrum speed](spectrum_speed.png)"]


def plot_memory(rows, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{r['model']}\n{r['prompts']} x {r['positions'] // r['prompts']} pos" for r in rows]
    xs = range(len(rows))
    for j, (key, name, color) in enumerate((("capture_bytes", "capture (X, Delta)", "#4f81bd"),
                                            ("param_grad_bytes_all", "all .grad", "#c0504d"),
                                            ("per_example_dense_mlp_bytes", "per-example dense MLP grads", "#f79646"))):
        ax.bar([x + (j - 1) * 0.27 for x in xs], [r[key] / 2**20 for r in rows], 0.27, label=name, color=color)
    ax.set_yscale("log")
    ax.set_ylabel("MiB")
    ax.set_xticks(list(xs), labels, fontsize=6)
    ax.legend(fontsize=8)
    ax.set_title("bytes held: capture vs parameter gradients", fontsize=10)
    fig.tight_layout()
    write_file(path, figure_png(fig, dpi=110))


def plot_spectrum(rows, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = ("fast_svdvals", "fast_rank", "dense_form", "dense_svdvals", "dense_rank")
    for j, r in enumerate(rows):
        ax.bar([i + (j - 0.5) * 0.4 for i in range(len(keys))], [r["seconds"][k] * 1e3 for k in keys], 0.4,
               label=f"weight {r['shape'][0]} x {r['shape'][1]}")
    ax.set_yscale("log")
    ax.set_ylabel("ms (median)")
    ax.set_xticks(range(len(keys)), [k.replace("_", "\n") for k in keys], fontsize=8)
    ax.legend(fontsize=8)
    ax.set_title("rank / spectrum of a 16-token gradient at d=768, 4d=3072", fontsize=10)
    fig.tight_layout()
    write_file(path, figure_png(fig, dpi=110))


def main(argv=None) -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--tokens", type=int, default=32, help="positions per prompt for the memory table")
    args_parser.add_argument("--models", default="gpt2-small,gpt-j",
                             help="comma-separated bench model specs for the memory table (default gpt2-small,gpt-j)")
    args_parser.add_argument("--gptj-depth", type=int, default=2, help="GPT-J blocks built on the CPU (of 28)")
    args_parser.add_argument("--skip", choices=("memory", "spectrum"), default=None)
    args = args_parser.parse_args(argv)
    out = setup(args)
    date = time.strftime("%Y-%m-%d")
    if args.skip != "spectrum":
        rows = spectrum_speed()
        about = ("X: 16 x 768, Delta: 16 x 3072, float32; median seconds. The speedups' *total* includes forming "
                 "X^T Delta.")
        write_result(out, "spectrum_speed", {"about": about, "date": date, **machine_info(), "rows": rows},
                     table_key="rows", table=spectrum_table(rows), echo=False)
        plot_spectrum(rows, out / "spectrum_speed.png")
        for r in rows:
            print(f"spectrum {r['shape']}: svdvals {r['speedup_svdvals']:.0f}x, rank {r['speedup_rank']:.0f}x faster, "
                  f"ranks {r['rank_fast']}/{r['rank_dense']}")
    if args.skip != "memory":
        rows = [row for spec in args.models.split(",")
                for row in capture_memory(spec, args.gptj_depth if spec == "gpt-j" else None, args.tokens)]
        about = ("X and Delta of mlp.in and mlp.out at every layer (float32) against `.grad` after `loss.backward()` "
                 "on the same loss. `.grad` of a batch is one summed copy; per-example analysis needs one dense MLP "
                 "gradient per example (last columns). Rows *computed* scale the per-layer bytes measured on the "
                 "reduced model to full depth.")
        write_result(out, "capture_memory", {"about": about, "date": date, **machine_info(), "rows": rows},
                     table_key="rows", table=memory_table(rows), echo=False)
        plot_memory(rows, out / "capture_memory.png")
        for r in rows:
            print(f"memory {r['model']} x{r['prompts']}: capture {_mib(r['capture_bytes'])} MiB, all .grad "
                  f"{r['param_grad_bytes_all'] / r['capture_bytes']:.0f}x more")


if __name__ == "__main__":
    main()
