"""Cost of one forward-shift edit against one forward pass of the same prompt, measured side by side.

    PYTHONPATH=. python benchmarks/bench_edit.py [--model default|PATH] [--repeats 7] [--prompts 20] [--threads 1]

For each of the first ``--prompts`` CounterFact records and each repeat, in interleaved order:
one plain forward pass of the prompt (``model(input_ids)``, logits at every position, as a forward pass is
normally run), one forward pass with logits at the last position only (``logits_to_keep=1``), and one
``blens_fast.edit`` per variant (paper shift, whitened shift with its covariance already cached, whitened
shift with the auto scale) followed by its revert (timed separately). The edit time includes everything
``edit()`` does: tokenization, argument checks, its forward pass, the key, the clone kept for revert and the
in-place update. Reported: medians over all (prompt, repeat) pairs and the ratio edit / plain forward.
Writes benchmarks/results/edit_cost.json and edit_cost.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blens_fast.default_model import load_counterfact  # noqa: E402
from blens_fast.edit import calibrated_defaults, edit, ff2_whitening  # noqa: E402
from blens_fast.models import load_model  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    defaults = calibrated_defaults(model)
    if "forward_shift" not in defaults:
        raise SystemExit("this model has no calibrated forward-shift settings: run blens eval-counterfact --calibrate")
    records = load_counterfact()[: args.prompts]
    variants = {"forward_shift": {}}
    if "forward_shift_whitened" in defaults:
        layer = defaults["forward_shift_whitened"]["layer"]
        variants["forward_shift_whitened"] = {"whiten": ff2_whitening(model, tokenizer, layer)}
    if "forward_shift_whitened_auto" in defaults:
        layer = defaults["forward_shift_whitened_auto"]["layer"]
        variants["forward_shift_whitened_auto"] = {"whiten": ff2_whitening(model, tokenizer, layer), "scale": "auto"}
    times: dict[str, list[float]] = {"forward": [], "forward_last_logits": [],
                                     **{name: [] for name in variants}, **{f"{n}_revert": [] for n in variants}}
    with torch.no_grad():
        for record in records[:2]:  # warm-up
            ids = torch.tensor([tokenizer(record["prompt"])["input_ids"]])
            model(input_ids=ids)
            for options in variants.values():
                edit(model, tokenizer, record["prompt"], record["target_new"], **options).revert()
    for _ in range(args.repeats):
        for record in records:
            ids = torch.tensor([tokenizer(record["prompt"])["input_ids"]])
            with torch.no_grad():
                times["forward"].append(timed(lambda: model(input_ids=ids))[0])
                times["forward_last_logits"].append(timed(lambda: model(input_ids=ids, logits_to_keep=1))[0])
            for name, options in variants.items():
                seconds, result = timed(lambda: edit(model, tokenizer, record["prompt"], record["target_new"],
                                                     **options))
                times[name].append(seconds)
                times[f"{name}_revert"].append(timed(result.revert)[0])
    medians = {k: statistics.median(v) * 1000 for k, v in times.items()}
    ratios = {name: medians[name] / medians["forward"] for name in variants}
    result = {
        "model": args.model, "threads": args.threads, "prompts": len(records), "repeats": args.repeats,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "median_ms": {k: round(v, 3) for k, v in medians.items()},
        "edit_over_forward": {k: round(v, 3) for k, v in ratios.items()},
        "target": "forward-shift edit <= 1.2 x one forward pass of the prompt",
        "settings": {name: {k: (str(v) if not isinstance(v, (int, float, str)) else v) for k, v in o.items()}
                     for name, o in variants.items()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "edit_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Cost of one forward-shift edit vs one forward pass", "",
             f"Model `{args.model}`, {args.threads} CPU thread(s), first {len(records)} CounterFact prompts x "
             f"{args.repeats} repeats, interleaved; medians. Plain forward = `model(input_ids)`.", "",
             "| | median ms | / plain forward |", "|---|---|---|"]
    for name, value in medians.items():
        lines.append(f"| {name} | {value:.2f} | {value / medians['forward']:.2f} |")
    (out / "edit_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
