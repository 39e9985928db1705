"""Benchmarks of `blens project-dataset` (results under benchmarks/results/bulk_*.{json,md}).

throughput: on the same batches, the lens pipeline (capture + analyze + Parquet rows, what project-dataset
            does per batch) against the model's own forward + backward (loss.backward() with parameter
            gradients; once with logits at every position as a training step computes them, once with logits
            only at the loss positions as capture computes them), side by side, alternating, best of rounds.
resume:     a large run through the command line, SIGKILLed at random moments N times and started again
            with the same arguments; then checks that every input record appears exactly once.

    PYTHONPATH=. python benchmarks/bench_bulk.py throughput [--model default] [--records 64]
    PYTHONPATH=. python benchmarks/bench_bulk.py resume [--records 20000] [--kills 3]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from blens_fast._report import machine_info, write_result  # noqa: E402


def counterfact_records(n: int) -> list[dict]:
    """``n`` records from the shipped CounterFact edit file: its prompts, then its rephrased prompts, each with the
    true object (ground_truth) as target."""
    from blens_fast.default_model import load_counterfact

    source = load_counterfact()
    records = []
    for kind, suffix in (("prompt", "p"), ("rephrase_prompt", "r"), ("locality_prompt", "l")):
        answer = "locality_ground_truth" if kind == "locality_prompt" else "ground_truth"
        for r in source:
            records.append({"id": f"{r['case_id']}-{suffix}", "prompt": r[kind], "target": r[answer]})
            if len(records) == n:
                return records
    raise ValueError(f"only {len(records)} records available")


def write_jsonl(records, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


# -- throughput ----------------------------------------------------------------------------------------------
def throughput(args) -> dict:
    import torch

    from blens_fast import bulk
    from blens_fast.capture import (batch_inputs, capture, loss_logits, target_log_probs, tokenize_examples,
                                    _pad_id)
    from blens_fast.lens import analyze
    from blens_fast.models import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    records = counterfact_records(args.records)
    examples = tokenize_examples(tokenizer, [r["prompt"] for r in records], [r["target"] for r in records])
    recs = [bulk.Record(index=i, line=i + 1, id=r["id"], prompt=r["prompt"], target=r["target"], example=e)
            for i, (r, e) in enumerate(zip(records, examples))]
    batches = bulk._batches(recs, args.batch_size, None)
    vocab = bulk._vocabulary_array(tokenizer)
    layers = None if args.layers is None else [int(x) for x in args.layers.split(",")]

    def lens_pass():
        rows = 0
        for batch in batches:
            cap = capture(model, tokenizer, [r.prompt for r in batch], [r.target for r in batch], layers=layers,
                          modules=("mlp.in", "mlp.out"))
            reports = analyze(cap, model, None, k=args.k)
            parts = [(r.id, bulk._report_rows(r, rep, vocab, bulk.LENS_MODULES, lambda m: m))
                     for r, rep in zip(batch, reports)]
            rows += bulk._rows_table(parts, vocab).num_rows
        return rows

    def model_pass(only_loss_positions: bool):
        for batch in batches:
            ex = [r.example for r in batch]
            ids, mask = batch_inputs(ex, _pad_id(tokenizer), "cpu")
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                if only_loss_positions:
                    logits, positions = loss_logits(model, ids, mask, ex)
                else:
                    logits, positions = model(input_ids=ids, attention_mask=mask, use_cache=False).logits, None
                (-target_log_probs(logits, ex, positions)).sum().backward()
        model.zero_grad(set_to_none=True)

    passes = {"lens": lens_pass, "model": lambda: model_pass(False), "model_loss_positions": lambda: model_pass(True)}
    tokens = sum(e.num_tokens for e in examples)
    times = {name: [] for name in passes}
    rows = lens_pass()  # warm-up
    model_pass(False)
    model_pass(True)
    for _ in range(args.rounds):
        for name, run in passes.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    best = {name: min(ts) for name, ts in times.items()}
    return {"benchmark": "throughput", "model": args.model, "records": len(records), "tokens": tokens,
            "batch_size": args.batch_size, "batches": len(batches), "k": args.k,
            "layers": layers or "all", "rows": rows,
            "what": {"lens": "capture + analyze (3 lists, target ranks, gradient ranks and norms) + Parquet rows",
                     "model": "the model's own forward + loss.backward() with parameter gradients, logits at "
                              "every position (what a training step does)",
                     "model_loss_positions": "the same with logits only at the loss positions (logits_to_keep), "
                                             "as capture computes them"},
            "seconds": times, "records_per_s": {n: len(records) / t for n, t in best.items()},
            "tokens_per_s": {n: tokens / t for n, t in best.items()},
            "ratio": best["model"] / best["lens"],
            "ratio_vs_model_loss_positions": best["model_loss_positions"] / best["lens"],
            "target_ratio": 0.7, **machine_info()}


# -- kill and resume -------------------------------------------------------------------------------------------
def resume(args) -> dict:
    import pyarrow.parquet as pq

    work = Path(args.workdir)
    if work.exists() and not args.keep:
        shutil.rmtree(work)
    data = write_jsonl(counterfact_records(args.records), work / "records.jsonl")
    out = work / "out"
    launcher = [sys.executable, "-m", "blens_fast.cli"] if args.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "-m", "blens_fast.cli"]
    command = launcher + ["project-dataset", "--input", str(data), "--output", str(out),
               "--model", args.model, "--batch-size", str(args.batch_size), "--k", str(args.k),
               "--shard-size", str(args.shard_size), "--no-progress"]
    if args.layers:
        command += ["--layers", args.layers]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    rng = random.Random(args.seed)
    log = []
    started = time.perf_counter()
    for attempt in range(args.kills + 1):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its own process group: the kill takes every worker
        t0 = time.perf_counter()
        killed = False
        if attempt < args.kills:
            # kill at a random moment after this attempt has committed at least one new shard
            before = _committed(out)
            while proc.poll() is None and _committed(out) <= before:
                time.sleep(0.5)
            delay = rng.uniform(args.min_delay, args.max_delay)
            try:
                output, _ = proc.communicate(timeout=delay)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                output, _ = proc.communicate()
                killed = True
        else:
            output, _ = proc.communicate()
        segments = list((out / "manifest").glob("seg-*.json"))
        done = sum(len(json.loads(s.read_text())["shards"]) for s in segments)
        log.append({"attempt": attempt, "killed_after_s": round(time.perf_counter() - t0, 1) if killed else None,
                    "returncode": proc.returncode, "shards_committed": done, "tail": output[-400:]})
        print(json.dumps(log[-1]), flush=True)
        if not killed and proc.returncode != 0:
            raise RuntimeError(f"run failed: {output[-2000:]}")
    elapsed = time.perf_counter() - started
    manifest = json.loads((out / "manifest.json").read_text())
    expected = [json.loads(line)["id"] for line in open(data, encoding="utf-8")]
    record_ids, row_ids = [], {}
    for entry in manifest["shards"]:
        record_ids.extend(pq.read_table(out / "shards" / entry["records_file"], columns=["id"]).column("id").to_pylist())
        for rid, count in zip(*_value_counts(pq.read_table(out / "shards" / entry["rows_file"], columns=["id"]))):
            row_ids[rid] = row_ids.get(rid, 0) + count
    from collections import Counter

    counts = Counter(record_ids)
    duplicates = [rid for rid, c in counts.items() if c > 1]
    missing = sorted(set(expected) - set(counts))
    extra = sorted(set(counts) - set(expected))
    return {"benchmark": "kill_and_resume", "model": args.model, "records": len(expected),
            "kills": args.kills, "attempts": log, "seconds_total": elapsed,
            "records_in_output": len(record_ids), "distinct_records": len(counts), "duplicates": len(duplicates),
            "missing": len(missing), "unexpected": len(extra), "records_without_rows": len(set(counts) - set(row_ids)),
            "manifest_records": manifest["records"], "shards": len(manifest["shards"]),
            "rows": manifest["rows"], "every_record_exactly_once": not duplicates and not missing and not extra,
            "settings": {"batch_size": args.batch_size, "k": args.k, "layers": args.layers or "all",
                         "shard_size": args.shard_size, "threads": args.threads, "processes": args.nproc},
            **machine_info()}


def _committed(out: Path) -> int:
    total = 0
    for path in (out / "manifest").glob("seg-*.json"):
        try:
            total += len(json.loads(path.read_text())["shards"])
        except (OSError, ValueError):
            pass
    return total


def _value_counts(table):
    import pyarrow.compute as pc

    vc = pc.value_counts(table.column("id"))
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()


def write(result: dict, name: str) -> None:
    table = []
    if "attempts" in result:
        table = ["| attempt | killed after (s) | return code | shards committed |", "|---|---|---|---|"]
        table += [f"| {a['attempt']} | {a['killed_after_s']} | {a['returncode']} | {a['shards_committed']} |"
                  for a in result["attempts"]]
    write_result(RESULTS, name, result, table_key="attempts", table=table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--model", default="default")
    t.add_argument("--records", type=int, default=64)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--k", type=int, default=10)
    t.add_argument("--layers", default=None, help="comma-separated (default: all)")
    t.add_argument("--rounds", type=int, default=3)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--name", default="bulk_throughput")
    r = sub.add_parser("resume")
    r.add_argument("--model", default="default")
    r.add_argument("--records", type=int, default=20000)
    r.add_argument("--kills", type=int, default=3)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--k", type=int, default=10)
    r.add_argument("--layers", default=None)
    r.add_argument("--shard-size", type=int, default=256)
    r.add_argument("--min-delay", type=float, default=0.0, help="kill this long at least after a new commit")
    r.add_argument("--max-delay", type=float, default=60.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--nproc", type=int, default=1, help="processes (torchrun) per attempt")
    r.add_argument("--workdir", default="/tmp/blens_bench_resume")
    r.add_argument("--keep", action="store_true", help="keep an existing workdir (continue a run)")
    r.add_argument("--name", default="bulk_resume")
    args = parser.parse_args()
    result = throughput(args) if args.what == "throughput" else resume(args)
    write(result, args.name)


if __name__ == "__main__":
    main()
