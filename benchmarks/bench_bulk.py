"""Benchmarks of `blens project-dataset` (results under benchmarks/results/bulk_*.{json,md}).

throughput: on the same batches, the lens pipeline (what project-dataset does per shard: tokenize, capture,
            analyze, Parquet rows) against the model's own forward + backward (loss.backward() with parameter
            gradients; once with logits at every position as a training step computes them, once with logits
            only at the loss positions as capture computes them), side by side, alternating, best of rounds.
resume:     a large run through the command line, SIGKILLed at random moments N times and started again
            with the same arguments; then checks that every input record appears exactly once.

    python benchmarks/bench_bulk.py throughput [--model default] [--records 64]
    python benchmarks/bench_bulk.py resume [--records 20000] [--kills 3]
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
from collections import Counter
from pathlib import Path

from _common import timed

from blens_fast._report import machine_info, markdown_table, write_result

RESULTS = Path(__file__).resolve().parent / "results"


def counterfact_records(n: int) -> list[dict]:
    """``n`` records from the shipped CounterFact edit file: its prompts, then its rephrased prompts, then its
    neighbourhood prompts, each with its true object as target."""
    from blens_fast.counterfact import load

    source = load("counterfact")
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
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# -- throughput ----------------------------------------------------------------------------------------------
def throughput(args) -> dict:
    import torch

    from blens_fast.batching import target_log_probs
    from blens_fast.bulk.records import open_source
    from blens_fast.bulk.run import RunOptions, ShardWorker, batches_by_length, build_spec
    from blens_fast.capture import loss_logits
    from blens_fast._checks import parse_layers
    from blens_fast.context import load_model

    torch.set_num_threads(args.threads)
    ctx = load_model(args.model)
    source = open_source(counterfact_records(args.records))
    spec = build_spec(ctx, source, RunOptions(layers=parse_layers(args.layers, "--layers"), k=args.k,
                                              batch_size=args.batch_size, shard_size=args.records))
    worker = ShardWorker(ctx, spec, source)
    records = list(source.records())
    batches = [[example for _, example in batch]
               for batch in batches_by_length(worker.tokenize(records)[0], args.batch_size, None)]

    def lens_pass() -> int:
        return worker.shard(records).tables["rows"].num_rows

    def model_pass(only_loss_positions: bool) -> None:
        for examples in batches:
            ids, mask = ctx.pad([e.input_ids for e in examples])
            ctx.model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                if only_loss_positions:
                    logits, positions = loss_logits(ctx.model, ids, mask, examples)
                else:
                    logits, positions = ctx.model(input_ids=ids, attention_mask=mask, use_cache=False).logits, None
                (-target_log_probs(logits, examples, positions)).sum().backward()
        ctx.model.zero_grad(set_to_none=True)

    passes = {"lens": lens_pass, "model": lambda: model_pass(False), "model_loss_positions": lambda: model_pass(True)}
    tokens = sum(e.num_tokens for batch in batches for e in batch)
    rows = lens_pass()  # warm-up
    model_pass(False)
    model_pass(True)
    times = {name: [] for name in passes}
    for _ in range(args.rounds):
        for name, run in passes.items():
            times[name].append(timed(run)[0])
    best = {name: min(ts) for name, ts in times.items()}
    return {"benchmark": "throughput", "model": args.model, "records": len(records), "tokens": tokens,
            "batch_size": args.batch_size, "batches": len(batches), "k": args.k, "layers": args.layers or "all",
            "rows": rows,
            "what": {"lens": "tokenize + capture + analyze (3 lists, target ranks, gradient ranks and norms) + Parquet "
                             "rows, as project-dataset computes a shard",
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
    import pyarrow.dataset as pads

    from blens_fast.bulk import read_results

    work = Path(args.workdir)
    if work.exists() and not args.keep:
        shutil.rmtree(work)
    data = write_jsonl(counterfact_records(args.records), work / "records.jsonl")
    out = work / "out"
    launcher = [sys.executable, "-m", "blens_fast.cli"] if args.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "-m", "blens_fast.cli"]
    command = launcher + ["project-dataset", "--records", str(data), "--out", str(out), "--model", args.model,
                          "--batch-size", str(args.batch_size), "--k", str(args.k), "--shard-size", args.shard_size,
                          "--threads", str(args.threads), "--quiet"]
    if args.layers:
        command += ["--layers", args.layers]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rng = random.Random(args.seed)
    attempts = []
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
            try:
                output, _ = proc.communicate(timeout=rng.uniform(args.min_delay, args.max_delay))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                output, _ = proc.communicate()
                killed = True
        else:
            output, _ = proc.communicate()
        attempts.append({"attempt": attempt, "killed_after_s": round(time.perf_counter() - t0, 1) if killed else None,
                         "returncode": proc.returncode, "shards_committed": _committed(out), "tail": output[-400:]})
        print(json.dumps(attempts[-1]), flush=True)
        if not killed and proc.returncode != 0:
            raise RuntimeError(f"run failed: {output[-2000:]}")
    elapsed = time.perf_counter() - started
    manifest = json.loads((out / "manifest.json").read_text())
    expected = [json.loads(line)["id"] for line in data.read_text(encoding="utf-8").splitlines()]
    counts = Counter(read_results(out, "records", columns=["id"]).id)
    row_ids = set(pads.dataset(out / "rows").to_table(columns=["id"]).column("id").unique().to_pylist())
    duplicates = [rid for rid, c in counts.items() if c > 1]
    missing = sorted(set(expected) - set(counts))
    extra = sorted(set(counts) - set(expected))
    return {"benchmark": "kill_and_resume", "model": args.model, "records": len(expected),
            "kills": args.kills, "attempts": attempts, "seconds_total": elapsed,
            "records_in_output": sum(counts.values()), "distinct_records": len(counts),
            "duplicates": len(duplicates), "missing": len(missing), "unexpected": len(extra),
            "records_without_rows": len(set(counts) - row_ids), "manifest_records": manifest["records"],
            "shards": len(manifest["shards"]), "rows": manifest["rows"],
            "every_record_exactly_once": not duplicates and not missing and not extra,
            "settings": {"batch_size": args.batch_size, "k": args.k, "layers": args.layers or "all",
                         "shard_size": args.shard_size, "threads": args.threads, "processes": args.nproc},
            **machine_info()}


def _committed(out: Path) -> int:
    """Shards committed so far, by every process's segment."""
    total = 0
    for path in (out / "segments").glob("seg-*.json"):
        try:
            total += len(json.loads(path.read_text())["shards"])
        except (OSError, ValueError):
            pass
    return total


def write(result: dict, folder: Path, name: str) -> None:
    table = []
    if "attempts" in result:
        table = [markdown_table(result["attempts"],
                                columns=["attempt", "killed_after_s", "returncode", "shards_committed"])]
    write_result(folder, name, result, table_key="attempts", table=table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name, records, batch_size, result in (("throughput", 64, 16, "bulk_throughput"),
                                              ("resume", 20000, 32, "bulk_resume")):
        command = sub.add_parser(name)
        command.add_argument("--model", default="default", help="'default' or a local Hugging Face folder")
        command.add_argument("--records", type=int, default=records)
        command.add_argument("--batch-size", type=int, default=batch_size)
        command.add_argument("--k", type=int, default=10)
        command.add_argument("--layers", default=None, help="layer indices, e.g. 0,2 (default: all)")
        command.add_argument("--threads", type=int, default=1)
        command.add_argument("--name", default=result, help=f"result file name (default {result})")
        command.add_argument("--results", type=Path, default=RESULTS, help="result folder (default benchmarks/results)")
    t = sub.choices["throughput"]
    t.add_argument("--rounds", type=int, default=3)
    r = sub.choices["resume"]
    r.add_argument("--kills", type=int, default=3)
    r.add_argument("--shard-size", default="256", help="records per shard or 'auto'")
    r.add_argument("--min-delay", type=float, default=0.0, help="kill this long at least after a new commit")
    r.add_argument("--max-delay", type=float, default=60.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--nproc", type=int, default=1, help="processes (torchrun) per attempt")
    r.add_argument("--workdir", default="/tmp/blens_bench_resume")
    r.add_argument("--keep", action="store_true", help="keep an existing workdir (continue a run)")
    args = parser.parse_args()
    result = throughput(args) if args.what == "throughput" else resume(args)
    write(result, args.results, args.name)


if __name__ == "__main__":
    main()
