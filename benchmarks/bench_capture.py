"""Capture against an ordinary backward: bytes held, and the spectrum from factors against the dense gradient.

(1) memory: the bytes :func:`blens_fast.capture` holds (X and Delta of ``mlp.in`` and ``mlp.out`` at every layer)
against the parameter gradients an ordinary ``loss.backward()`` leaves in ``.grad`` (all parameters, as one gets
them by default; and only the same MLP matrices), for 32-token prompts, at GPT-2-small and GPT-J dimensions
(random initialisation; GPT-J with fewer layers on the CPU, and its full 28-layer figure computed from the
per-layer bytes measured). The ``.grad`` of a batch is one summed copy; per-example analysis needs one dense
gradient per example, which the table also gives.

(2) spectrum: :meth:`LowRankGradient.svdvals` / :meth:`~LowRankGradient.rank` against the dense gradient with
``torch.linalg.svdvals`` / ``torch.linalg.matrix_rank`` at d=768, 4d=3072, 16 tokens, float32, side by side in
one run, both weight layouts (``[768, 3072]`` as GPT-2's ``Conv1D`` and ``[3072, 768]`` as ``nn.Linear``).

    PYTHONPATH=. python benchmarks/bench_capture.py --threads 1 --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from blens_fast._report import machine_description
from blens_fast.bench import build_model, make_prompts
from blens_fast.capture import batch_inputs, capture, target_log_probs, tokenize_examples
from blens_fast.lowrank import LowRankGradient


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def capture_memory(spec: str, layers: int | None, tokens: int, batches=(1, 8)) -> dict:
    model, tokenizer, info = build_model(spec, layers=layers)
    for p in model.parameters():
        p.requires_grad_(True)
    n_layers = info["layers"]
    rows = []
    for batch in batches:
        prompts, targets = make_prompts(tokenizer, batch, tokens)
        cap = capture(model, tokenizer, prompts, targets, modules=("mlp.in", "mlp.out"))
        held = _bytes([t for store in (cap.x, cap.delta) for parts in store.values() for t in parts])
        # an ordinary backward of the same loss (padded batch, parameter gradients)
        model.zero_grad(set_to_none=True)
        examples = tokenize_examples(tokenizer, prompts, targets)
        ids, mask = batch_inputs(examples, tokenizer.eos_token_id, "cpu")
        loss = -target_log_probs(model(input_ids=ids, attention_mask=mask).logits, examples).sum()
        loss.backward()
        grads_all = _bytes([p.grad for p in model.parameters() if p.grad is not None])
        from blens_fast.adapters import get_adapter

        adapter = get_adapter(model)
        grads_mlp = _bytes([adapter.weight(model, layer, m).grad for layer in range(n_layers)
                            for m in ("mlp.in", "mlp.out")])
        model.zero_grad(set_to_none=True)
        positions = sum(e.num_tokens for e in examples)
        row = dict(model=info["name"], about=info["about"], layers=n_layers, full_layers=info["full_layers"],
                   prompts=batch, positions=positions, capture_bytes=held, param_grad_bytes_all=grads_all,
                   param_grad_bytes_mlp=grads_mlp, per_example_dense_mlp_bytes=grads_mlp * batch,
                   computed_for_full_depth=False)
        rows.append(row)
        if n_layers < info["full_layers"]:
            # the same at full depth: per-layer bytes (measured) x full depth + the rest (embeddings, final norm)
            full = info["full_layers"]
            per_layer_cap = held / n_layers
            per_layer_mlp = grads_mlp / n_layers
            per_layer_all = sum(p.numel() * p.element_size() for p in adapter.layers(model)[0].parameters())
            rest = grads_all - per_layer_all * n_layers
            rows.append(dict(row, model=f"{spec} (all {full} layers, computed)", layers=full,
                             capture_bytes=int(per_layer_cap * full), param_grad_bytes_all=int(rest + per_layer_all * full),
                             param_grad_bytes_mlp=int(per_layer_mlp * full),
                             per_example_dense_mlp_bytes=int(per_layer_mlp * full * batch), computed_for_full_depth=True))
    del model
    return rows


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def spectrum_speed(d: int = 768, d_ff: int = 3072, tokens: int = 16, dense_repeats: int = 3,
                   fast_repeats: int = 30) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(tokens, d)
    delta = torch.randn(tokens, d_ff) * 1e-3
    rows = []
    for layout in ("in_out", "out_in"):
        g = LowRankGradient(x, delta, layout)
        dense = g.dense().contiguous()
        s_fast, s_dense = g.svdvals(), torch.linalg.svdvals(dense)
        r_fast, r_dense = g.rank(), int(torch.linalg.matrix_rank(dense))
        err = float((s_fast[:tokens] - s_dense[:tokens].double()).abs().max() / s_dense[0])
        t = dict(
            fast_svdvals=_median_time(g.svdvals, fast_repeats),
            fast_rank=_median_time(g.rank, fast_repeats),
            dense_form=_median_time(g.dense, fast_repeats),
            dense_svdvals=_median_time(lambda: torch.linalg.svdvals(dense), dense_repeats),
            dense_rank=_median_time(lambda: torch.linalg.matrix_rank(dense), dense_repeats),
        )
        rows.append(dict(layout=layout, shape=list(g.shape), tokens=tokens, rank_fast=r_fast, rank_dense=r_dense,
                         svdvals_max_rel_err=err, seconds=t,
                         speedup_svdvals=(t["dense_form"] + t["dense_svdvals"]) / t["fast_svdvals"],
                         speedup_rank=(t["dense_form"] + t["dense_rank"]) / t["fast_rank"],
                         speedup_svdvals_given_dense=t["dense_svdvals"] / t["fast_svdvals"],
                         speedup_rank_given_dense=t["dense_rank"] / t["fast_rank"]))
    return rows


def _mib(b: float) -> str:
    return f"{b / 2**20:,.2f}"


def write_memory(rows, out: Path, header: str) -> None:
    (out / "capture_memory.json").write_text(json.dumps(dict(header=header, rows=rows), indent=2) + "\n")
    lines = ["# Capture: bytes held vs parameter gradients of an ordinary backward", "", header, "",
             "X and Delta of mlp.in and mlp.out at every layer (float32) against `.grad` after `loss.backward()` "
             "on the same loss. `.grad` of a batch is one summed copy; per-example analysis needs one dense MLP "
             "gradient per example (last columns). Rows marked *computed* scale the per-layer bytes measured on "
             "the reduced model to full depth.", "",
             "| model | layers | prompts | positions | capture MiB | all .grad MiB | ratio | MLP .grad MiB | ratio | "
             "per-example MLP grads MiB | ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["capture_bytes"]
        lines.append(f"| {r['model']} | {r['layers']} | {r['prompts']} | {r['positions']} | {_mib(c)} | "
                     f"{_mib(r['param_grad_bytes_all'])} | {r['param_grad_bytes_all'] / c:.1f}x | "
                     f"{_mib(r['param_grad_bytes_mlp'])} | {r['param_grad_bytes_mlp'] / c:.1f}x | "
                     f"{_mib(r['per_example_dense_mlp_bytes'])} | {r['per_example_dense_mlp_bytes'] / c:.1f}x |")
    lines += ["", "![bytes held](capture_memory.png)", ""]
    (out / "capture_memory.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(out / "capture_memory.png", dpi=110)
    plt.close(fig)


def write_spectrum(rows, out: Path, header: str) -> None:
    (out / "spectrum_speed.json").write_text(json.dumps(dict(header=header, rows=rows), indent=2) + "\n")
    lines = ["# Spectrum and rank: from the factors vs the dense gradient", "", header, "",
             "X: 16 x 768, Delta: 16 x 3072, float32; median seconds. *dense total* includes forming X^T Delta.", "",
             "| weight shape | LowRankGradient.svdvals | dense svdvals | speedup (total / given dense) | "
             "LowRankGradient.rank | dense matrix_rank | speedup (total / given dense) | ranks | svdvals max rel err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["seconds"]
        lines.append(f"| {r['shape'][0]} x {r['shape'][1]} | {t['fast_svdvals'] * 1e3:.3g} ms | "
                     f"{t['dense_svdvals'] * 1e3:.4g} ms | {r['speedup_svdvals']:.0f}x / "
                     f"{r['speedup_svdvals_given_dense']:.0f}x | {t['fast_rank'] * 1e3:.3g} ms | "
                     f"{t['dense_rank'] * 1e3:.4g} ms | {r['speedup_rank']:.0f}x / {r['speedup_rank_given_dense']:.0f}x "
                     f"| {r['rank_fast']} / {r['rank_dense']} | {r['svdvals_max_rel_err']:.1e} |")
    lines += ["", "![spectrum speed](spectrum_speed.png)", ""]
    (out / "spectrum_speed.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(out / "spectrum_speed.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="positions per prompt for the memory table")
    parser.add_argument("--gptj-layers", type=int, default=2, help="GPT-J blocks built on the CPU (of 28)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip", choices=("memory", "spectrum"), default=None)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = f"Machine: {machine_description()}, {torch.get_num_threads()} torch threads; {time.strftime('%Y-%m-%d')}."
    if args.skip != "spectrum":
        rows = spectrum_speed()
        write_spectrum(rows, out, header)
        for r in rows:
            print(f"spectrum {r['shape']}: svdvals {r['speedup_svdvals']:.0f}x, rank {r['speedup_rank']:.0f}x faster, "
                  f"ranks {r['rank_fast']}/{r['rank_dense']}")
    if args.skip != "memory":
        rows = capture_memory("gpt2-small", None, args.tokens) + capture_memory("gpt-j", args.gptj_layers, args.tokens)
        write_memory(rows, out, header)
        for r in rows:
            print(f"memory {r['model']} x{r['prompts']}: capture {_mib(r['capture_bytes'])} MiB, all .grad "
                  f"{r['param_grad_bytes_all'] / r['capture_bytes']:.0f}x more")


if __name__ == "__main__":
    main()
