"""The Backward Lens over a whole dataset: streaming, resumable, split across ``torchrun`` ranks.

``project_dataset(input, output, ...)`` reads records (``prompt``, ``target``, optional ``id``) from JSON Lines,
a JSON list or Parquet, runs the lens (:func:`blens_fast.lens.analyze`) batch by batch and writes long-format
rows into Parquet shards; ``read_results(output)`` gives them back as a DataFrame.

Layout of the output directory::

    run.json                      the run's arguments (a second run with other arguments is refused)
    shards/rows-000012.parquet    lens rows of shard 12 (one row per record, layer, module, position, list, rank)
    shards/records-000012.parquet one row per record of shard 12 (id, line, prompt, target, tokens, loss)
    manifest/seg-<session>-r<rank>.json   the shards one process has finished, with their record ids
    manifest/stats-<session>-r<rank>-<n>.pt  that process's partial gradient sketches (--stats)
    manifest.json                 the merged manifest, written once every shard is done
    rejected.jsonl                bad records with their line and reason (--skip-bad)
    stats/                        merged gradient statistics (--stats): summary/spectrum/norms Parquet + state

Plan. Shard ``j`` holds the input records ``j * shard_size .. (j + 1) * shard_size - 1`` (by position in the
file, bad ones included). Inside a shard the valid records are sorted by token count and cut into batches of
at most ``batch_size`` records and ``max_tokens`` padded tokens. The plan depends only on the input and the
arguments, never on the number of processes or on earlier interrupted runs, so every record is computed
in the same batch whatever happens, and the results are identical.

Commit protocol (nothing lost, nothing twice). After a shard is computed its Parquet files are written to a
temporary name and renamed; then (``--stats``) the process's cumulative sketch state goes to a new file; then
its segment file (the list of finished shards and the name of its current state file) is replaced
atomically, which is the commit. A kill at any moment leaves either the old segment (the shard is redone
on resume, overwriting its files under the same names) or the new one. A shard counts as done when a
segment lists it; each resumed process writes new segments, so every shard and every sketch contribution is
counted exactly once.

Ranks. Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank reads the whole input (cheap: it parses records and
checks ids; only the shard's owner tokenizes and computes), the shards still to do are dealt round-robin, and
rank 0 merges the manifest after a barrier.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ._checks import check_positive_int
from .adapters import get_adapter
from .capture import Example, capture, max_positions, token_batches, tokenize_examples

FORMAT_VERSION = 1
LENS_MODULES = ("mlp.in", "mlp.out")
TABLES = ("rows", "records", "rejected", "stats_summary", "stats_spectrum", "stats_norms")

__all__ = ["project_dataset", "read_results", "iter_records", "BadRecord"]


# -- fault injection (tests) ------------------------------------------------------------------------------------
# BLENS_FAULT="point:n" SIGKILLs this process the n-th time it reaches `point` ("point:n:raise" raises
# InjectedFault instead, for in-process tests). Points: after_rows, after_records, after_stats, after_commit.
_FAULT_COUNTS: dict[str, int] = {}


class InjectedFault(RuntimeError):
    """Raised at a fault point when BLENS_FAULT asks for it (tests of the commit protocol)."""


def _fault(point: str) -> None:
    spec = os.environ.get("BLENS_FAULT")
    if not spec:
        return
    name, _, rest = spec.partition(":")
    if name != point:
        return
    count, _, mode = rest.partition(":")
    _FAULT_COUNTS[point] = _FAULT_COUNTS.get(point, 0) + 1
    if _FAULT_COUNTS[point] >= int(count or 1):
        if mode == "raise":
            raise InjectedFault(f"injected fault at {point} (#{_FAULT_COUNTS[point]})")
        os.kill(os.getpid(), signal.SIGKILL)


# -- input ---------------------------------------------------------------------------------------------------
class BadRecord(ValueError):
    """A record that cannot be used: its file, line (1-based; the record number for JSON lists and Parquet)
    and the reason."""

    def __init__(self, path, line: int, reason: str, raw=None):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason, self.raw = str(path), line, reason, raw


@dataclass
class Record:
    index: int  # position in the input, bad records included
    line: int
    id: str | None = None
    prompt: str | None = None
    target: str | None = None
    error: str | None = None
    raw: object = None
    example: Example | None = field(default=None, repr=False)


def _raw_records(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """``(line, value, parse_error)`` for each record of a JSONL, JSON-list or Parquet file, streaming."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield number, row, None
        return
    if suffix == ".json":
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
        if head.startswith("["):
            with open(path, encoding="utf-8") as f:
                try:
                    values = json.load(f)
                except json.JSONDecodeError as error:
                    yield error.lineno, None, f"malformed JSON ({error.msg})"
                    return
            for number, value in enumerate(values, 1):
                yield number, value, None
            return
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                yield number, json.loads(text), None
            except json.JSONDecodeError as error:
                yield number, text.rstrip("\n"), f"malformed JSON ({error.msg} at column {error.colno})"


def iter_records(path, *, prompt_field: str = "prompt", target_field: str = "target",
                 id_field: str = "id") -> Iterator[Record]:
    """Records with their line numbers; bad ones carry ``error`` (malformed JSON, a missing or non-string
    field, an empty prompt or target, a duplicate id). Ids default to the line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {str(path)!r} does not exist")
    seen: dict[str, int] = {}
    for index, (line, value, error) in enumerate(_raw_records(path)):
        record = Record(index=index, line=line, raw=value)
        if error is None and not isinstance(value, dict):
            error = f"expected a JSON object with {prompt_field!r} and {target_field!r}, got {type(value).__name__}"
        if error is None:
            for name in (prompt_field, target_field):
                if name not in value or value[name] is None:
                    error = f"missing field {name!r} (the record has {', '.join(map(repr, value)) or 'no fields'})"
                    break
                if not isinstance(value[name], str):
                    error = f"field {name!r} must be a string, got {type(value[name]).__name__}"
                    break
        if error is None:
            if not value[prompt_field].strip():
                error = f"empty prompt (field {prompt_field!r})"
            elif not value[target_field].strip():
                error = f"empty target (field {target_field!r})"
        if error is None:
            raw_id = value.get(id_field, line)
            if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
                error = f"field {id_field!r} must be a string or an int, got {type(raw_id).__name__}"
            else:
                record.id = str(raw_id)
                if record.id in seen:
                    error = f"duplicate id {record.id!r} (first on line {seen[record.id]})"
                else:
                    seen[record.id] = line
        if error is None:
            record.prompt, record.target = value[prompt_field], value[target_field]
        record.error = error
        yield record


def _count_records(path: Path) -> int | None:
    """The number of records, when cheap to know (JSON Lines: non-blank lines; Parquet: its metadata)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    if suffix == ".json":
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- files ---------------------------------------------------------------------------------------------------
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, value) -> None:
    _atomic_write_bytes(path, json.dumps(value, indent=1, sort_keys=True).encode())


def _atomic_write_table(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    torch.save(value, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_segments(out: Path) -> list[dict]:
    segments = []
    for path in sorted((out / "manifest").glob("seg-*.json")):
        try:
            segments.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # cannot happen with atomic replaces, but never trust a half file
    return segments


def _done_shards(out: Path) -> dict[int, dict]:
    done: dict[int, dict] = {}
    for segment in _read_segments(out):
        for entry in segment["shards"]:
            done.setdefault(int(entry["shard"]), entry)
    return done


# -- distributed ---------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.initialized_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _init_distributed(device: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    here = False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=12))
        here = True
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), here)


# -- the run's identity ----------------------------------------------------------------------------------------
def _model_fingerprint(spec, model) -> dict:
    config = getattr(model, "config", None)
    config_text = config.to_json_string(use_diff=False) if config is not None else type(model).__name__
    out = {"config_sha256": hashlib.sha256(config_text.encode()).hexdigest()}
    if isinstance(spec, (str, os.PathLike)):
        if str(spec) == "default":
            from .default_model import MODEL_DIR

            folder = Path(MODEL_DIR)
        else:
            folder = Path(spec).resolve()
        out["spec"] = str(spec) if str(spec) == "default" else str(folder)
        out["weights"] = sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in folder.glob("*.safetensors"))
    else:
        checksum = hashlib.sha256()
        for name, param in sorted(model.state_dict().items()):
            checksum.update(name.encode())
            checksum.update(np.float64(param.detach().double().sum().item()).tobytes())
        out["parameters"] = checksum.hexdigest()
    return out


def _describe_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(_describe_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            diffs.append(f"{prefix}{key} was {a!r}, now {b!r}")
    return diffs


# -- rows ----------------------------------------------------------------------------------------------------
_LIST_MODULE = {"ff1_top": "mlp.in", "ff2_bottom": "mlp.out", "ff2_top": "mlp.out"}


def _vocabulary_array(tokenizer) -> pa.Array:
    from .lens import _vocabulary

    return pa.array(list(_vocabulary(tokenizer)), type=pa.string())


def _report_rows(record: Record, report, vocab: pa.Array, modules: Sequence[str], grad_module) -> dict:
    """Columns (numpy / arrow arrays) of one record's rows, in ``(list, layer, position, rank)`` order."""
    columns: dict[str, list] = {name: [] for name in ("layer", "module", "position", "input_token_id", "list", "rank",
                                                       "token_id", "logit", "prob", "target_rank")}
    grads = {(int(r.layer), r.module): r for r in report.gradients.itertuples(index=False)}
    input_ids = np.asarray(record.example.input_ids, dtype=np.int32)
    grad_norm, grad_rank, grad_tokens = [], [], []
    for name, indices in report.indices.items():
        module = _LIST_MODULE[name]
        if module not in modules:
            continue
        n_layers, n_pos, k = indices.shape
        count = n_layers * n_pos * k
        layers = np.repeat(np.asarray(report.layers, dtype=np.int16), n_pos * k)
        positions = np.tile(np.repeat(np.arange(n_pos, dtype=np.int16), k), n_layers)
        columns["layer"].append(layers)
        columns["module"].append(np.full(count, module, dtype=object))
        columns["position"].append(positions)
        columns["input_token_id"].append(input_ids[positions])
        columns["list"].append(np.full(count, name, dtype=object))
        columns["rank"].append(np.tile(np.arange(1, k + 1, dtype=np.int16), n_layers * n_pos))
        columns["token_id"].append(indices.reshape(-1).numpy().astype(np.int32))
        columns["logit"].append(report.logits[name].reshape(-1).float().numpy())
        columns["prob"].append(report.probs[name].reshape(-1).float().numpy())
        columns["target_rank"].append(np.repeat(report.target_rank[name].reshape(-1).numpy().astype(np.int32), k))
        per_layer = [grads[(int(layer), grad_module(module))] for layer in report.layers]
        grad_norm.append(np.repeat(np.asarray([g.norm for g in per_layer], dtype=np.float64), n_pos * k))
        grad_rank.append(np.repeat(np.asarray([g.rank for g in per_layer], dtype=np.int32), n_pos * k))
        grad_tokens.append(np.repeat(np.asarray([g.tokens for g in per_layer], dtype=np.int32), n_pos * k))
    out = {key: np.concatenate(value) for key, value in columns.items()}
    out["grad_norm"], out["grad_rank"], out["grad_tokens"] = (np.concatenate(grad_norm), np.concatenate(grad_rank),
                                                              np.concatenate(grad_tokens))
    return out


def _rows_table(parts: list[tuple[str, dict]], vocab: pa.Array) -> pa.Table:
    if not parts:
        return _empty_rows_table()
    ids = np.concatenate([np.full(len(p["layer"]), rid, dtype=object) for rid, p in parts])
    cat = {key: np.concatenate([p[key] for _, p in parts]) for key in parts[0][1]}
    return pa.table({
        "id": pa.array(ids, type=pa.string()),
        "layer": pa.array(cat["layer"], type=pa.int16()),
        "module": pa.array(cat["module"], type=pa.string()).dictionary_encode(),
        "position": pa.array(cat["position"], type=pa.int16()),
        "input_token": vocab.take(pa.array(cat["input_token_id"], type=pa.int32())),
        "list": pa.array(cat["list"], type=pa.string()).dictionary_encode(),
        "rank": pa.array(cat["rank"], type=pa.int16()),
        "token_id": pa.array(cat["token_id"], type=pa.int32()),
        "token": vocab.take(pa.array(cat["token_id"], type=pa.int32())),
        "logit": pa.array(cat["logit"], type=pa.float32()),
        "prob": pa.array(cat["prob"], type=pa.float32()),
        "target_rank": pa.array(cat["target_rank"], type=pa.int32()),
        "grad_norm": pa.array(cat["grad_norm"], type=pa.float64()),
        "grad_rank": pa.array(cat["grad_rank"], type=pa.int32()),
        "grad_tokens": pa.array(cat["grad_tokens"], type=pa.int32()),
    })


def _empty_rows_table() -> pa.Table:
    return pa.table({"id": pa.array([], pa.string()), "layer": pa.array([], pa.int16()),
                     "module": pa.array([], pa.string()).dictionary_encode(), "position": pa.array([], pa.int16()),
                     "input_token": pa.array([], pa.string()), "list": pa.array([], pa.string()).dictionary_encode(),
                     "rank": pa.array([], pa.int16()), "token_id": pa.array([], pa.int32()),
                     "token": pa.array([], pa.string()), "logit": pa.array([], pa.float32()),
                     "prob": pa.array([], pa.float32()), "target_rank": pa.array([], pa.int32()),
                     "grad_norm": pa.array([], pa.float64()), "grad_rank": pa.array([], pa.int32()),
                     "grad_tokens": pa.array([], pa.int32())})


def _records_table(rows: list[dict]) -> pa.Table:
    schema = pa.schema([("id", pa.string()), ("line", pa.int64()), ("prompt", pa.string()), ("target", pa.string()),
                        ("target_token_id", pa.int32()), ("tokens", pa.int32()), ("loss", pa.float64())])
    return pa.Table.from_pylist(rows, schema=schema)


# -- batching ------------------------------------------------------------------------------------------------
def _batches(records: list[Record], batch_size: int, max_tokens: int | None) -> list[list[Record]]:
    """Sorted by token count (stable), cut at ``batch_size`` records or ``max_tokens`` padded tokens."""
    lengths = [r.example.num_tokens for r in records]
    return [[records[i] for i in batch] for batch in token_batches(lengths, batch_size, max_tokens, by_length=True)]


# -- the run -------------------------------------------------------------------------------------------------
@dataclass
class _Settings:
    input: Path
    output: Path
    layers: tuple[int, ...]
    modules: tuple[str, ...]
    capture_modules: tuple[str, ...]
    k: int
    batch_size: int
    max_tokens: int | None
    shard_size: int
    prompt_field: str
    target_field: str
    id_field: str
    skip_bad: bool
    normalized: bool
    impl: str
    stats: dict | None


def project_dataset(input, output, *, model="default", tokenizer=None, layers=None,
                    modules: Sequence[str] = LENS_MODULES, k: int = 10, batch_size: int = 16,
                    max_tokens: int | None = None, shard_size: int = 256, prompt_field: str = "prompt",
                    target_field: str = "target", id_field: str = "id", skip_bad: bool = False,
                    normalized: bool = False, stats: bool = False, stats_rank: int = 8, stats_seed: int = 0,
                    impl: str = "auto", device: str = "cpu", dtype: torch.dtype = torch.float32,
                    progress: bool = True, log=None) -> Path:
    """Run the Backward Lens over every record of ``input`` into the directory ``output``; return its path.

    ``model``: ``"default"``, a checkpoint folder, or a loaded model (then pass ``tokenizer``). For each record,
    layer, module in ``modules`` (``mlp.in``: the FF1 forward input's top tokens; ``mlp.out``: the FF2 VJP's
    bottom and top tokens) and position, it writes the ``k`` tokens with their logits and probabilities, the
    target's rank in the list's order, and the gradient's norm and rank (see the module docstring for the
    files). A bad record stops the run with its file and line, unless ``skip_bad`` (then it goes to
    ``rejected.jsonl``). Running again with the same arguments resumes; other arguments are refused.
    ``stats=True`` also accumulates :func:`blens_fast.gradient_stats` over the dataset (rank ``stats_rank``)
    into ``output/stats``.
    """
    log = log or (lambda message: print(message, file=sys.stderr))
    input_path = Path(input)
    if not input_path.is_file():
        raise FileNotFoundError(f"input file {str(input_path)!r} does not exist")
    check_positive_int(k, "k")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(shard_size, "shard_size")
    if max_tokens is not None:
        check_positive_int(max_tokens, "max_tokens")
    modules = tuple(modules) if not isinstance(modules, str) else tuple(m.strip() for m in modules.split(","))
    for name in modules:
        if name not in LENS_MODULES:
            raise ValueError(f"module {name!r} has no lens list: expected a subset of {', '.join(LENS_MODULES)}")
    if not modules:
        raise ValueError("modules is empty: expected mlp.in, mlp.out or both")
    for name, value in (("prompt_field", prompt_field), ("target_field", target_field), ("id_field", id_field)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")

    _FAULT_COUNTS.clear()
    dist_state = _init_distributed(device)
    try:
        return _run(input_path, Path(output), model, tokenizer, layers, modules, k, batch_size, max_tokens, shard_size,
                    prompt_field, target_field, id_field, skip_bad, normalized, stats, stats_rank, stats_seed, impl,
                    device, dtype, progress, log, dist_state)
    finally:
        dist_state.close()


def _run(input_path, out, model_spec, tokenizer, layers, modules, k, batch_size, max_tokens, shard_size,
         prompt_field, target_field, id_field, skip_bad, normalized, stats, stats_rank, stats_seed, impl, device,
         dtype, progress, log, dist_state: _Dist) -> Path:
    from .lens import analyze
    from .stats import StatsAccumulator, module_shapes, sketch_sizes

    if dist_state.world > 1 and device.startswith("cuda"):
        device = f"cuda:{dist_state.local_rank}"
        torch.cuda.set_device(device)
    if isinstance(model_spec, (str, os.PathLike)):
        from .models import load_model

        model, tokenizer = load_model(str(model_spec), dtype=dtype, device=device)
    else:
        model = model_spec
        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer: pass tokenizer=")
    adapter = get_adapter(model)
    layer_ids = adapter.check_layers(model, layers)
    capture_modules = adapter.resolve_modules(LENS_MODULES)
    grad_names = {m: adapter.resolve_modules([m])[-1] for m in LENS_MODULES}  # mlp.in -> mlp.up when gated
    vocab_size = adapter.lens(model).weight.shape[0]
    check_positive_int(k, "k", upper=vocab_size)
    stats_config = None
    if stats:
        stats_modules = adapter.resolve_modules(modules)
        stats_config = {"rank": stats_rank, "sizes": list(sketch_sizes(stats_rank)), "seed": stats_seed,
                        "modules": list(stats_modules)}

    fingerprint = {
        "format": FORMAT_VERSION,
        "input": {"path": str(input_path.resolve()), "size": input_path.stat().st_size,
                  "sha256": _file_digest(input_path)},
        "model": _model_fingerprint(model_spec, model),
        "dtype": str(next(model.parameters()).dtype),
        "layers": list(layer_ids), "modules": list(modules), "k": k, "batch_size": batch_size,
        "max_tokens": max_tokens, "shard_size": shard_size, "prompt_field": prompt_field,
        "target_field": target_field, "id_field": id_field, "skip_bad": bool(skip_bad),
        "normalized": bool(normalized), "impl": impl, "stats": stats_config,
    }
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    if dist_state.rank == 0:
        if run_file.exists():
            _check_same_run(run_file, fingerprint, out)
        else:
            if any(out.iterdir()):
                raise ValueError(f"output directory {str(out)!r} is not empty and holds no blens project-dataset run "
                                 "(no run.json): choose an empty or new directory")
            _atomic_write_json(run_file, fingerprint)
        for sub in ("shards", "manifest"):
            (out / sub).mkdir(exist_ok=True)
        for stray in [*out.glob(".*.tmp"), *out.glob("*/.*.tmp")]:  # leftovers of a killed run
            stray.unlink(missing_ok=True)
    dist_state.barrier()
    if dist_state.rank != 0:
        _check_same_run(run_file, fingerprint, out)

    final_manifest = out / "manifest.json"
    done = _done_shards(out)
    dist_state.barrier()  # every rank has read the same done set before anyone writes a new segment
    if final_manifest.exists() and json.loads(final_manifest.read_text()).get("complete"):
        if dist_state.rank == 0:
            log(f"blens project-dataset: {out} is already complete ({_summary_line(final_manifest)})")
        return out

    session = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
    segment_path = out / "manifest" / f"seg-{session}-r{dist_state.rank}.json"
    segment = {"session": session, "rank": dist_state.rank, "world": dist_state.world, "shards": [], "stats": None}
    accumulator = None
    if stats_config is not None:
        shapes = module_shapes(model, layer_ids, stats_config["modules"], adapter)
        accumulator = StatsAccumulator(shapes, rank=stats_rank, seed=stats_seed, device=device, impl="auto")
    vocab = _vocabulary_array(tokenizer)
    limit = max_positions(model)

    bar = None
    if progress and dist_state.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(desc="project-dataset", unit="rec", dynamic_ncols=True, file=sys.stderr,
                   total=_count_records(input_path), initial=sum(len(e["ids"]) + len(e["rejected"])
                                                                 for e in done.values()))
    started = time.perf_counter()
    counters = {"records": 0, "tokens": 0, "rejected": 0, "rows": 0, "shards": 0}
    pending_index = 0

    def owner_of_pending(shard: int) -> bool:
        nonlocal pending_index
        if shard in done:
            return False
        mine = pending_index % dist_state.world == dist_state.rank
        pending_index += 1
        return mine

    def process(shard: int, records: list[Record]) -> None:
        good, rejected = [], []
        for record in records:
            if record.error is None:
                try:
                    record.example = tokenize_examples(tokenizer, [record.prompt], [record.target],
                                                       max_positions=limit)[0]
                except ValueError as error:
                    record.error = (str(error).replace("example 0 is", "the record is")
                                    .replace("prompts[0]", "prompt").replace("targets[0]", "target"))
            if record.error is not None:
                if not skip_bad:
                    raise BadRecord(input_path, record.line, record.error, record.raw)
                rejected.append({"line": record.line, "index": record.index, "id": record.id,
                                 "reason": record.error, "record": record.raw})
            else:
                good.append(record)
        parts, record_rows = {}, {}
        for batch in _batches(good, batch_size, max_tokens):
            cap = capture(model, tokenizer, [r.prompt for r in batch], [r.target for r in batch], layers=layer_ids,
                          modules=capture_modules, adapter=adapter)
            reports = analyze(cap, model, None, k=k, normalized=normalized, impl=impl)
            if accumulator is not None:
                accumulator.update(cap, [r.id for r in batch])
            for record, report, loss in zip(batch, reports, cap.losses.tolist()):
                parts[record.index] = _report_rows(record, report, vocab, modules, lambda m: grad_names[m])
                record_rows[record.index] = dict(id=record.id, line=record.line, prompt=record.prompt,
                                                 target=record.target, target_token_id=record.example.target_ids[0],
                                                 tokens=record.example.num_tokens, loss=float(loss))
            counters["records"] += len(batch)
            counters["tokens"] += sum(r.example.num_tokens for r in batch)
            if bar is not None:
                bar.update(len(batch) * dist_state.world)
                elapsed = time.perf_counter() - started
                bar.set_postfix(tok_s=f"{counters['tokens'] * dist_state.world / elapsed:.0f}", refresh=False)
        order = sorted(parts)
        rows = _rows_table([(record_rows[i]["id"], parts[i]) for i in order], vocab)
        rows_name, records_name = f"rows-{shard:06d}.parquet", f"records-{shard:06d}.parquet"
        _atomic_write_table(out / "shards" / rows_name, rows)
        _fault("after_rows")
        _atomic_write_table(out / "shards" / records_name, _records_table([record_rows[i] for i in order]))
        _fault("after_records")
        entry = {"shard": shard, "rows_file": rows_name, "records_file": records_name, "rows": rows.num_rows,
                 "ids": [record_rows[i]["id"] for i in order], "rejected": rejected}
        segment["shards"].append(entry)
        old_stats = segment["stats"]
        if accumulator is not None:
            name = f"stats-{session}-r{dist_state.rank}-{len(segment['shards']):06d}.pt"
            _atomic_torch_save(out / "manifest" / name, accumulator.state_dict())
            segment["stats"] = name
            _fault("after_stats")
        _atomic_write_json(segment_path, segment)  # the commit
        _fault("after_commit")
        if old_stats:
            (out / "manifest" / old_stats).unlink(missing_ok=True)
        counters["rows"] += rows.num_rows
        counters["rejected"] += len(rejected)
        counters["shards"] += 1

    current: list[Record] = []
    current_shard = 0
    mine = owner_of_pending(0)
    seen_any = False
    for record in iter_records(input_path, prompt_field=prompt_field, target_field=target_field, id_field=id_field):
        seen_any = True
        shard = record.index // shard_size
        if shard != current_shard:
            if mine:
                process(current_shard, current)
            current, current_shard = [], shard
            mine = owner_of_pending(shard)
        if record.error is not None and not skip_bad:
            raise BadRecord(input_path, record.line, record.error, record.raw)
        if mine:
            current.append(record)
    if not seen_any:
        raise ValueError(f"input file {str(input_path)!r} holds no records")
    if mine:
        process(current_shard, current)
    total_shards = current_shard + 1
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - started

    dist_state.barrier()
    if dist_state.rank == 0:
        _finish(out, total_shards, fingerprint, stats_config, elapsed, counters, dist_state.world, log)
    dist_state.barrier()
    return out


def _check_same_run(run_file: Path, fingerprint: dict, out: Path) -> None:
    old = json.loads(run_file.read_text())
    if old != fingerprint:
        differences = _describe_differences(old, fingerprint)
        raise ValueError(f"output directory {str(out)!r} holds a run with different arguments "
                         f"({'; '.join(differences[:4])}{'; ...' if len(differences) > 4 else ''}): "
                         "resume with the same arguments or choose another --output")


def _summary_line(manifest_path: Path) -> str:
    m = json.loads(manifest_path.read_text())
    return f"{m['records']} records, {m['rejected']} rejected, {m['rows']} rows in {len(m['shards'])} shards"


def _finish(out: Path, total_shards: int, fingerprint: dict, stats_config, elapsed: float, counters: dict,
            world: int, log) -> None:
    from .stats import StatsAccumulator

    segments = _read_segments(out)
    entries: dict[int, dict] = {}
    stats_files = []
    for segment in segments:
        for entry in segment["shards"]:
            entries.setdefault(int(entry["shard"]), entry)
        if segment.get("stats"):
            stats_files.append(segment["stats"])
    missing = [s for s in range(total_shards) if s not in entries]
    if missing:
        raise RuntimeError(f"shards {missing[:10]} are not done after every rank finished: run the command again")
    ids_seen: set[str] = set()
    for shard in range(total_shards):
        for rid in entries[shard]["ids"]:
            if rid in ids_seen:
                raise RuntimeError(f"record id {rid!r} appears in two shards: the manifest is inconsistent")
            ids_seen.add(rid)
    rejected = [r for s in range(total_shards) for r in entries[s]["rejected"]]
    if rejected:
        text = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rejected)
        _atomic_write_bytes(out / "rejected.jsonl", text.encode())
    if stats_config is not None:
        state = None
        for name in sorted(stats_files):
            part = torch.load(out / "manifest" / name, weights_only=False)
            if state is None:
                acc = StatsAccumulator({tuple(key): tuple(part["layouts"][key]) for key in part["keys"]},
                                       rank=part["rank"], sketch_size=part["sizes"][0],
                                       cosketch_size=part["sizes"][1], residual_size=part["sizes"][2],
                                       seed=part["seed"], impl="torch")
                state = acc
            state.merge_state(part)
        order = [rid for s in range(total_shards) for rid in entries[s]["ids"]]
        if state is not None:
            result = state.finalize(order=order)
            stats_dir = out / "stats"
            stats_dir.mkdir(exist_ok=True)
            for table in ("summary", "spectrum", "norms"):
                frame = result.to_pandas(table)
                if table == "norms":
                    frame["id"] = frame["id"].astype(str)
                _atomic_write_table(stats_dir / f"{table}.parquet", pa.Table.from_pandas(frame, preserve_index=False))
            _atomic_torch_save(stats_dir / "state.pt", state.state_dict())
    manifest = {
        "complete": True, "format": FORMAT_VERSION, "run": fingerprint,
        "shards": [{key: entries[s][key] for key in ("shard", "rows_file", "records_file", "rows", "ids")}
                   | {"rejected": len(entries[s]["rejected"])} for s in range(total_shards)],
        "records": len(ids_seen), "rejected": len(rejected), "rows": sum(entries[s]["rows"] for s in entries),
        "segments": sorted(f"seg-{seg['session']}-r{seg['rank']}.json" for seg in segments),
    }
    _atomic_write_json(out / "manifest.json", manifest)
    rate = counters["records"] * world / elapsed if elapsed > 0 else 0.0
    summary = {"this_session": {"records": counters["records"], "tokens": counters["tokens"],
                                "shards": counters["shards"], "seconds": elapsed, "processes": world,
                                "records_per_s_rank0": counters["records"] / elapsed if elapsed > 0 else 0.0},
               "total": {"records": manifest["records"], "rejected": manifest["rejected"], "rows": manifest["rows"],
                         "shards": total_shards}}
    _atomic_write_json(out / "summary.json", summary)
    log(f"blens project-dataset: {manifest['records']} records ({manifest['rejected']} rejected), "
        f"{manifest['rows']} rows in {total_shards} shards -> {out}; this run: {counters['records']} records on "
        f"rank 0 in {elapsed:.1f}s (~{rate:.1f} records/s over {world} process{'es' if world > 1 else ''})")


# -- reading -------------------------------------------------------------------------------------------------
def read_results(directory, table: str = "rows", *, columns: Sequence[str] | None = None,
                 partial: bool = False) -> pd.DataFrame:
    """The results of :func:`project_dataset` in ``directory`` as one DataFrame.

    ``table``: ``"rows"`` (the lens rows), ``"records"`` (one row per record), ``"rejected"``, or
    ``"stats_summary"`` / ``"stats_spectrum"`` / ``"stats_norms"`` (runs with ``stats=True``). Shards come in
    input order. ``columns`` limits what is read. An unfinished run raises unless ``partial=True`` (then the
    shards committed so far are read).
    """
    out = Path(directory)
    if table not in TABLES:
        raise ValueError(f"table={table!r} is not one of {', '.join(map(repr, TABLES))}")
    if not (out / "run.json").is_file():
        raise FileNotFoundError(f"{str(out)!r} holds no project-dataset results (no run.json)")
    manifest_path = out / "manifest.json"
    complete = manifest_path.is_file()
    if table.startswith("stats_"):
        path = out / "stats" / f"{table[len('stats_'):]}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} does not exist: was the run made with --stats and finished?")
        return pq.read_table(path, columns=columns).to_pandas()
    if table == "rejected":
        path = out / "rejected.jsonl"
        if not path.is_file():
            return pd.DataFrame(columns=["line", "index", "id", "reason", "record"])
        return pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
    if complete:
        shards = json.loads(manifest_path.read_text())["shards"]
    elif partial:
        shards = [entry for _, entry in sorted(_done_shards(out).items())]
    else:
        raise ValueError(f"the run in {str(out)!r} is not finished (no manifest.json): run it again with the same "
                         "arguments to resume, or pass partial=True to read the shards done so far")
    key = "rows_file" if table == "rows" else "records_file"
    tables = [pq.read_table(out / "shards" / entry[key], columns=columns) for entry in shards]
    if not tables:
        return (_empty_rows_table() if table == "rows" else _records_table([])).to_pandas()
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()
