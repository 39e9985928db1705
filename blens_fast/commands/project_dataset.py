"""Backward Lens over a dataset: long-format Parquet shards, resumable, split across torchrun ranks.

Each record of --input (JSON Lines, a JSON list or Parquet) has a prompt and a target (and an optional id).
Killed and started again with the same arguments, a run resumes where it stopped; other arguments into the
same --output are refused. Under `torchrun --nproc_per_node N -m blens_fast.cli project-dataset ...` the
records are split across the processes and the merged result is the same whatever N is.

Example: blens project-dataset --input facts.jsonl --output out/facts --k 10 --batch-size 16
CounterFact as it is: blens project-dataset --input counterfact.json --target-field ground_truth
  --id-field case_id --output out/cf
"""
from __future__ import annotations

from ._common import add_layers_argument, add_model_argument, parse_layers


def add_arguments(parser) -> None:
    parser.add_argument("--input", required=True, help="FILE.jsonl, FILE.json (a list) or FILE.parquet")
    parser.add_argument("--output", required=True, help="output directory (created; reused to resume)")
    add_model_argument(parser)
    add_layers_argument(parser)
    parser.add_argument("--modules", default="mlp.in,mlp.out",
                        help="lens lists to write: mlp.in (FF1 input, top-k) and/or mlp.out (FF2 VJP, bottom/top-k)")
    parser.add_argument("--k", type=int, default=10, help="tokens per list (default 10)")
    parser.add_argument("--batch-size", type=int, default=16, help="records per forward+backward (default 16)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="at most this many padded tokens per batch (default: no limit beyond --batch-size)")
    parser.add_argument("--shard-size", type=int, default=256, help="input records per output shard (default 256)")
    parser.add_argument("--prompt-field", default="prompt", help="the record field holding the prompt")
    parser.add_argument("--target-field", default="target",
                        help="the record field holding the target (e.g. ground_truth for CounterFact)")
    parser.add_argument("--id-field", default="id", help="the record field holding its id (default: the line number)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="write bad records to rejected.jsonl with the reason and go on (default: stop)")
    parser.add_argument("--normalized", action="store_true", help="project unit-normalised vectors")
    parser.add_argument("--stats", action="store_true",
                        help="also accumulate dataset-level gradient statistics into OUTPUT/stats")
    parser.add_argument("--stats-rank", type=int, default=8, help="rank of the summed-gradient sketch (default 8)")
    parser.add_argument("--impl", default="auto", help="projection implementation: auto, cpu, triton, cuda, torch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..bulk import project_dataset

    modules = tuple(m.strip() for m in args.modules.split(",") if m.strip())
    project_dataset(args.input, args.output, model=args.model, layers=parse_layers(args.layers), modules=modules,
                    k=args.k, batch_size=args.batch_size, max_tokens=args.max_tokens, shard_size=args.shard_size,
                    prompt_field=args.prompt_field, target_field=args.target_field, id_field=args.id_field,
                    skip_bad=args.skip_bad, normalized=args.normalized, stats=args.stats,
                    stats_rank=args.stats_rank, impl=args.impl, device=args.device, progress=not args.no_progress)
    return 0
