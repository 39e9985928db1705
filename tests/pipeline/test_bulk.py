"""project_dataset: rows against an independent lens, exactly-once resume (gaps included), verified shards, safe
segments, the folder lock, refusals, bad records, inputs, and an output folder that pandas and pyarrow read."""
import dataclasses
import json
import re
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

import blens_fast.bulk
from blens_fast.batching import Example
from blens_fast.bulk import BadRecord, InjectedFault, project_dataset, read_results
from blens_fast.bulk.records import Fields, Record, open_source
from blens_fast.bulk.run import Ranks, RunOptions, auto_shard_size, batches_by_length, build_spec, execute
from blens_fast.context import load_model
from blens_fast.counterfact import load as load_counterfact
from blens_fast.stats import gradient_stats
from tests.helpers import autograd_loss, lens_logits64, prompt_target_ids

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
FACTS = [("The mother tongue of Danielle Darrieux is", "French"), ("The capital of France is", "Paris"),
         ("Toyota was founded in", "Japan"), ("The Eiffel Tower is located in", "Paris"),
         ("Python was created by", "Guido"), ("Ten plus two is", "twelve"), ("A cat is an", "animal"),
         ("The sun rises in the", "east"), ("Water freezes at zero", "degrees"), ("Mozart was born in", "Salzburg")]
COLUMNS = ["id", "layer", "module", "position", "input_token", "list", "rank", "token_id", "token", "logit", "prob",
           "target_rank", "grad_norm", "grad_rank", "grad_tokens", "degenerate"]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_model(str(tiny_checkpoint))


def fact(i):
    prompt, target = FACTS[i % len(FACTS)]
    return {"id": f"r{i}", "prompt": prompt + " indeed" * (i % 3), "target": target}


def write_jsonl(path, n, *, start=0):
    path.write_text("".join(json.dumps(fact(i)) + "\n" for i in range(start, start + n)), encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


#: a small run with statistics: layer 0, shards of 2 records
STATS_RUN = dict(k=2, layers=[0], batch_size=2, shard_size=2, stats=True, stats_rank=2, progress=False)


def rows_for(df, rid):
    return df[df.id == rid].reset_index(drop=True)


def injected(point, count, call):
    """``call()`` must stop with the injected fault at the ``count``-th time it reaches ``point``."""
    os.environ["BLENS_FAULT"] = f"{point}:{count}:raise"
    try:
        with pytest.raises(InjectedFault):
            call()
    finally:
        del os.environ["BLENS_FAULT"]


def expected_tokens(tokenizer, records):
    """Positions the model reads per record, tokenized here: prompt + target[:-1]."""
    return [len(p) + len(t) - 1 for p, t in (prompt_target_ids(tokenizer, r["prompt"], r["target"]) for r in records)]


# -- an independent Backward Lens of one record: plain torch, float64 logits, lower index first on ties ------------
def reference_lens(model, tokenizer, prompt, target, k):
    """Per list, ``(ids L x T x k, their logits, their probs, target_rank L x T, degenerate L x T, all logits
    L x T x V, tokens within 1e-4 of the target's logit L x T)`` and the dense gradients' ``(norm, rank)`` per
    (layer, module), from hooks on the model's own modules and autograd."""
    blocks = model.transformer.h
    x_in, outputs = {}, {}
    handles = []
    for layer, block in enumerate(blocks):
        handles.append(block.mlp.c_fc.register_forward_hook(
            lambda m, args, out, layer=layer: x_in.__setitem__(layer, args[0][0].detach())))
        handles.append(block.mlp.c_proj.register_forward_hook(
            lambda m, args, out, layer=layer: outputs.__setitem__(layer, out)))
    try:
        loss = autograd_loss(model, tokenizer, prompt, target)
    finally:
        for handle in handles:
            handle.remove()
    layers = range(len(blocks))
    weights = [w for b in blocks for w in (b.mlp.c_fc.weight, b.mlp.c_proj.weight)]
    grads = torch.autograd.grad(loss, [outputs[layer] for layer in layers] + weights)
    deltas, dense = grads[:len(blocks)], grads[len(blocks):]
    target_id = prompt_target_ids(tokenizer, prompt, target)[1][0]
    vectors = {"ff1_top": [x_in[layer] for layer in layers], "ff2_bottom": [deltas[layer][0] for layer in layers],
               "ff2_top": [deltas[layer][0] for layer in layers]}
    lists = {}
    for name, rows in vectors.items():
        descending = name != "ff2_bottom"  # the paper's directions: FF1 top, FF2 bottom (argmin) and top
        logits = torch.stack([lens_logits64(model, r) for r in rows])  # L x T x V
        order = torch.sort(-logits if descending else logits, dim=-1, stable=True).indices  # ties: lower index
        ids = order[..., :k]
        target_logit = logits[..., target_id:target_id + 1]
        better = (logits > target_logit) if descending else (logits < target_logit)
        tied_before = (logits[..., :target_id] == target_logit).sum(-1)
        flat = torch.stack([(r.abs().amax(-1) == 0) for r in rows])
        if name != "ff1_top":
            flat |= logits.amax(-1) == logits.amin(-1)
        near = ((logits - target_logit).abs() <= 1e-4).sum(-1)
        lists[name] = (ids, logits.gather(-1, ids), logits.softmax(-1).gather(-1, ids),
                       better.sum(-1) + tied_before + 1, flat, logits, near)
    gradients = {(layer, module): (dense[2 * layer + j].double().norm().item(),
                                   torch.linalg.matrix_rank(dense[2 * layer + j]).item())
                 for layer in layers for j, module in enumerate(("mlp.in", "mlp.out"))}
    return lists, gradients


def test_rows_match_an_independent_lens(tmp_path, tiny, tokenizer):
    model, tok = tiny
    k = 3
    data = write_jsonl(tmp_path / "in.jsonl", 5)
    out = project_dataset(tiny, data, tmp_path / "out", k=k, batch_size=2, progress=False)
    rows = read_results(out)
    records = read_results(out, "records")
    assert list(records.id) == [f"r{i}" for i in range(5)]  # input order, whatever the batching
    assert list(rows.columns) == COLUMNS
    checked_exactly = 0
    for i in range(5):
        record = fact(i)
        lists, gradients = reference_lens(model, tok, record["prompt"], record["target"], k)
        got = rows_for(rows, record["id"])
        n_tokens = expected_tokens(tok, [record])[0]
        assert len(got) == 3 * 2 * n_tokens * k
        assert records.set_index("id").loc[record["id"], "tokens"] == n_tokens
        assert records.set_index("id").loc[record["id"], "loss"] == pytest.approx(
            autograd_loss(model, tok, record["prompt"], record["target"]).item(), rel=1e-5)
        for name, (ids, logits, probs, target_rank, flat, full, near) in lists.items():
            part = got[got.list == name]
            assert set(part.module) == {"mlp.in" if name == "ff1_top" else "mlp.out"}
            shape = ids.shape
            got_ids = torch.tensor(part.token_id.to_numpy(), dtype=torch.long).reshape(shape)
            assert (torch.tensor(part.layer.to_numpy()).reshape(shape) == torch.arange(shape[0])[:, None, None]).all()
            assert (torch.tensor(part.position.to_numpy()).reshape(shape)
                    == torch.arange(shape[1])[None, :, None]).all()
            assert (torch.tensor(part["rank"].to_numpy()).reshape(shape) == torch.arange(1, k + 1)).all()
            assert list(part.token) == [tok.convert_tokens_to_string([tok.convert_ids_to_tokens(int(t))])
                                        for t in part.token_id]
            got_flat = torch.tensor(part.degenerate.to_numpy()).reshape(shape)
            assert (got_flat == flat[..., None]).all(), name
            live = ~flat
            assert live.any()
            # every listed token is a true top/bottom-k token of the float64 logits, in order, with its logit ...
            picked = full.gather(-1, got_ids)[live]
            kth = logits[live][:, -1:]
            tol = 1e-4
            assert ((picked >= kth - tol) if name != "ff2_bottom" else (picked <= kth + tol)).all(), name
            got_logits = torch.tensor(part.logit.to_numpy(), dtype=torch.float64).reshape(shape)[live]
            torch.testing.assert_close(got_logits, picked, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(torch.tensor(part.prob.to_numpy(), dtype=torch.float64).reshape(shape)[live],
                                       probs[live], rtol=1e-3, atol=1e-9)
            # ... and, where the reference has no near-tie among its first k + 1, exactly the reference's tokens
            sorted_full = full.sort(-1, descending=name != "ff2_bottom").values[..., :k + 1]
            clear = live & (sorted_full.diff(dim=-1).abs().amin(-1) > tol)
            assert (got_ids[clear] == ids[clear]).all(), name
            checked_exactly += int(clear.sum())
            got_rank = torch.tensor(part.target_rank.to_numpy(), dtype=torch.long).reshape(shape)[..., 0]
            assert ((got_rank - target_rank).abs() <= near)[live].all(), name
        for r in got.drop_duplicates(["layer", "module"]).itertuples():
            norm, rank = gradients[(r.layer, r.module)]
            assert r.grad_norm == pytest.approx(norm, rel=1e-4)
            assert r.grad_rank == rank and r.grad_tokens == n_tokens
    assert checked_exactly > 100  # the exact comparison is not vacuous
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["records"] == 5 and manifest["rows"] == len(rows)


@pytest.mark.parametrize("point", ["after_rows", "after_records", "after_stats", "after_commit"])
def test_killed_anywhere_resumes_exactly_once(tmp_path, tiny, point):
    data = write_jsonl(tmp_path / "in.jsonl", 60)
    kwargs = dict(k=2, layers=[1], batch_size=8, shard_size=8, progress=False, stats=point == "after_stats",
                  stats_rank=2)
    ref_out = project_dataset(tiny, data, tmp_path / "ref", **kwargs)
    out = tmp_path / "out"
    injected(point, 3, lambda: project_dataset(tiny, data, out, **kwargs))
    injected(point, 2, lambda: project_dataset(tiny, data, out, **kwargs))
    with pytest.raises(ValueError, match="not finished"):
        read_results(out)
    partial = read_results(out, "records", partial=True)
    assert partial.id.is_unique and 0 < len(partial) < 60
    project_dataset(tiny, data, out, **kwargs)
    got, ref = read_results(out), read_results(ref_out)
    records = read_results(out, "records")
    assert records.id.is_unique and sorted(records.id) == sorted(f"r{i}" for i in range(60))
    pd.testing.assert_frame_equal(got, ref)
    assert not list(out.rglob("*.tmp"))
    if kwargs["stats"]:
        assert (read_results(out, "stats_summary").examples == 60).all()


def assert_stats_equal_one_pass(out, ctx, records, layers, rank):
    """Merged statistics against one gradient_stats pass (no merge on that side), token counts against counting
    the tokens here."""
    direct = gradient_stats(ctx, records, layers=layers, rank=rank, batch_size=len(records), impl="torch",
                            progress=False)
    summary = read_results(out, "stats_summary").set_index(["layer", "module"])
    assert len(summary) == len(direct.summed)
    tokens = sum(expected_tokens(ctx.tokenizer, records))
    for key, module_stats in direct.summed.items():
        assert summary.loc[key, "examples"] == len(records) == module_stats.num_examples
        assert summary.loc[key, "tokens"] == tokens == module_stats.num_tokens
        assert summary.loc[key, "frobenius"] == pytest.approx(module_stats.frobenius, rel=1e-4)
        assert summary.loc[key, "top_singular_value"] == pytest.approx(float(module_stats.singular_values[0]),
                                                                       rel=1e-4)
        assert summary.loc[key, "sum_of_norms"] == pytest.approx(module_stats.sum_of_norms, rel=1e-5)
    norms = read_results(out, "stats_norms")
    assert len(norms) == len(records) * len(direct.summed) and set(norms.id) == {r["id"] for r in records}


def test_merged_stats_equal_one_pass_stats(tmp_path, tiny):
    """Statistics of a run killed and resumed (two segments merged) equal one pass, token counts included; and the
    per-example norms equal the rows' gradient norms."""
    data = write_jsonl(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out"
    injected("after_commit", 2, lambda: project_dataset(tiny, data, out, **STATS_RUN))
    project_dataset(tiny, data, out, **STATS_RUN)
    assert len(list((out / "segments").glob("seg-*.json"))) == 2
    assert_stats_equal_one_pass(out, tiny, read_jsonl(data), [0], 2)
    norms = read_results(out, "stats_norms")
    rows = read_results(out, columns=["id", "layer", "module", "grad_norm"]).drop_duplicates(["id", "layer", "module"])
    merged = norms.merge(rows.astype({"module": str}), on=["id", "layer", "module"])
    assert len(merged) == 12
    torch.testing.assert_close(torch.tensor(merged.norm.to_numpy()), torch.tensor(merged.grad_norm.to_numpy()),
                               rtol=1e-4, atol=0)


def test_resume_fills_a_gap_among_finished_shards(tmp_path, tiny):
    """Rank 0 of two commits shards 0, 2, 4 and rank 1 none (it died): the resume computes 1, 3, 5, whatever is done
    above them, and ends with every record once and the statistics of one pass."""
    data = write_jsonl(tmp_path / "in.jsonl", 12)
    out = tmp_path / "out"
    source = open_source(data)
    spec = build_spec(tiny, source, RunOptions(**{key: value for key, value in STATS_RUN.items() if key != "progress"}))
    with pytest.raises(RuntimeError, match=r"shards \[1, 3, 5\] are not done"):
        execute(tiny, spec, source, out, Ranks(rank=0, world=2), progress=False, log=lambda m: None)
    assert sorted(read_results(out, "records", partial=True).id) == sorted(f"r{i}" for i in (0, 1, 4, 5, 8, 9))
    messages = []
    project_dataset(tiny, data, out, log=messages.append, **STATS_RUN)
    assert any("3 of 6 shards done, 3 to compute" in m for m in messages)
    got = read_results(out, "records")
    assert list(got.id) == [f"r{i}" for i in range(12)]
    reference = project_dataset(tiny, data, tmp_path / "ref", **STATS_RUN)
    pd.testing.assert_frame_equal(read_results(out), read_results(reference))
    assert_stats_equal_one_pass(out, tiny, read_jsonl(data), [0], 2)


# -- integrity: damaged shards, run files and segments (issue 12, defects 3 and 4) ---------------------------------
def damage(path: Path, how: str, other: Path | None = None) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "emptied":
        path.write_bytes(b"")
    elif how == "deleted":
        path.unlink()
    elif how == "corrupted":  # one byte changed, the size kept
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:  # swapped: a valid shard of the same run copied over this one
        path.write_bytes(other.read_bytes())


@pytest.mark.parametrize("how, why", [("truncated", "bytes"), ("emptied", "has 0 bytes"), ("deleted", "is missing"),
                                      ("swapped", ""),
                                      ("corrupted", "sha256 mismatch")])
def test_damaged_shard_is_named_by_read_results_and_recomputed_on_resume(tmp_path, tiny, how, why):
    data = write_jsonl(tmp_path / "in.jsonl", 6)
    out = project_dataset(tiny, data, tmp_path / "out", **STATS_RUN)
    before = {table: read_results(out, table) for table in ("rows", "records", "stats_summary")}
    shard = out / "records" / "part-000001.parquet"
    damage(shard, how, out / "records" / "part-000002.parquet")
    with pytest.raises(ValueError, match=rf"shard 1: .*part-000001\.parquet' .*{why}"):
        read_results(out, "records")
    messages = []
    project_dataset(tiny, data, out, log=messages.append, **STATS_RUN)
    assert any("shard 1:" in m and "recomputing it" in m for m in messages), messages
    assert not any("already complete" in m for m in messages)
    for table, frame in before.items():
        pd.testing.assert_frame_equal(read_results(out, table), frame)  # statistics not counted twice
    assert list(read_results(out, "records").id) == [f"r{i}" for i in range(6)]
    messages.clear()  # shard 1 is now committed twice (the damaged entry and the new one): still complete
    project_dataset(tiny, data, out, log=messages.append, **STATS_RUN)
    assert any("already complete" in m for m in messages), messages


def test_damaged_statistics_segment_is_recomputed(tmp_path, tiny):
    data = write_jsonl(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out"
    injected("after_commit", 2, lambda: project_dataset(tiny, data, out, **STATS_RUN))
    segment = next((out / "segments").glob("seg-*.json"))
    damage(out / "segments" / json.loads(segment.read_text())["stats"]["file"], "truncated")
    messages = []
    project_dataset(tiny, data, out, log=messages.append, **STATS_RUN)
    assert any("statistics file" in m and "recomputed" in m for m in messages), messages
    assert_stats_equal_one_pass(out, tiny, read_jsonl(data), [0], 2)


def test_a_shard_recomputed_without_statistics_counts_again_when_its_counting_segment_is_dropped(tmp_path, tiny):
    """Segment A commits shards 0 and 1 with statistics; shard 0's files are damaged, so segment B recomputes it
    without statistics (A counted it); then A's statistics file is damaged: A is dropped, and shard 0 must be computed
    again with statistics (B's entry never counted it), or the merged statistics would lack its tokens."""
    data = write_jsonl(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out"
    injected("after_commit", 2, lambda: project_dataset(tiny, data, out, **STATS_RUN))
    (first,) = (out / "segments").glob("seg-*.json")
    damage(out / "records" / "part-000000.parquet", "truncated")
    injected("after_commit", 1, lambda: project_dataset(tiny, data, out, **STATS_RUN))
    (second,) = set((out / "segments").glob("seg-*.json")) - {first}
    assert [(e["shard"], e["stats"]) for e in json.loads(second.read_text())["shards"]] == [(0, False)]
    damage(out / "segments" / json.loads(first.read_text())["stats"]["file"], "truncated")
    project_dataset(tiny, data, out, **STATS_RUN)
    assert_stats_equal_one_pass(out, tiny, read_jsonl(data), [0], 2)
    assert list(read_results(out, "records").id) == [f"r{i}" for i in range(6)]


@pytest.mark.parametrize("name", ["manifest.json", "run.json"])
def test_truncated_run_files_are_named(tmp_path, tiny, name):
    data = write_jsonl(tmp_path / "in.jsonl", 2)
    out = project_dataset(tiny, data, tmp_path / "out", k=2, layers=[0], progress=False)
    damage(out / name, "truncated")
    pattern = rf"{name}' is damaged"
    label = {"manifest.json": "manifest", "run.json": "run file"}[name]
    with pytest.raises(ValueError, match=rf"^{label} '.*{pattern}"):
        read_results(out)
    with pytest.raises(ValueError, match=pattern):
        project_dataset(tiny, data, out, k=2, layers=[0], progress=False)


def test_segments_never_run_code_from_the_output_folder(tmp_path, tiny):
    """A segment naming a file outside the run's folder is refused before anything is read; states are
    safetensors, and the package never unpickles."""
    data = write_jsonl(tmp_path / "in.jsonl", 4)
    out = tmp_path / "a" / "b" / "out"
    injected("after_commit", 1, lambda: project_dataset(tiny, data, out, **STATS_RUN))
    segment = next((out / "segments").glob("seg-*.json"))
    assert segment.with_name(json.loads(segment.read_text())["stats"]["file"]).suffix == ".safetensors"
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"layouts": Payload()}, out.parent / "x.pt")  # what out/segments/../../x.pt names
    value = json.loads(segment.read_text())
    value["stats"]["file"] = "../../x.pt"
    segment.write_text(json.dumps(value))
    with pytest.raises(ValueError, match=r"'\.\./\.\./x\.pt'.*refusing to read it"):
        project_dataset(tiny, data, out, **STATS_RUN)
    assert not marker.exists()
    package = Path(blens_fast.bulk.__file__).parent
    assert not any("torch.load" in p.read_text() or "pickle" in p.read_text() for p in package.glob("*.py"))


# -- the lock (issue 12, defect 5) --------------------------------------------------------------------------------
HOLD_LOCK = """
import sys, time
from pathlib import Path
from blens_fast.bulk.shards import FolderLock
with FolderLock(Path(sys.argv[1]), 0):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_process_is_refused_and_a_killed_one_never_blocks(tmp_path, tiny):
    data = write_jsonl(tmp_path / "in.jsonl", 2)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"^output folder {re.escape(repr(str(out)))} is in use by another "
                                             rf"project-dataset run \(pid {holder.pid} on host "):
            project_dataset(tiny, data, out, k=2, layers=[0], progress=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    project_dataset(tiny, data, out, k=2, layers=[0], progress=False)  # the killed holder's lock is gone
    assert len(read_results(out, "records")) == 2


# -- refusals, bad records, inputs ------------------------------------------------------------------------------
def test_refusals_and_reruns(tmp_path, tiny):
    data = write_jsonl(tmp_path / "in.jsonl", 3)
    kwargs = dict(layers=[0], progress=False)
    out = project_dataset(tiny, data, tmp_path / "out", k=2, **kwargs)
    before = read_results(out)
    messages = []
    project_dataset(tiny, data, out, k=2, log=messages.append, **kwargs)  # complete: nothing to do
    assert "already complete" in messages[0]
    pd.testing.assert_frame_equal(read_results(out), before)
    with pytest.raises(ValueError, match="different arguments.*k was 2, now 3"):
        project_dataset(tiny, data, out, k=3, **kwargs)
    with pytest.raises(ValueError, match="different arguments.*input.sha256"):
        write_jsonl(data, 4)
        project_dataset(tiny, data, out, k=2, **kwargs)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty and holds no blens project-dataset run"):
        project_dataset(tiny, data, tmp_path / "other", k=2, **kwargs)
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / ".run.json.0123abcd.tmp").write_text("{")  # a first run killed while writing run.json
    assert len(read_results(project_dataset(tiny, data, tmp_path / "fresh", k=2, **kwargs), "records")) == 4
    with pytest.raises(ValueError, match="module 'attn.q' has no lens list"):
        project_dataset(tiny, data, tmp_path / "x", modules=["attn.q"], **kwargs)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        project_dataset(tiny, tmp_path / "missing.jsonl", tmp_path / "y", **kwargs)
    with pytest.raises(ValueError, match="table='bogus' is not one of"):
        read_results(out, "bogus")
    with pytest.raises(ValueError, match="shard_size"):
        project_dataset(tiny, data, tmp_path / "z", shard_size=0, **kwargs)
    with pytest.raises(ValueError, match="device= and dtype= apply to a model given by name"):
        project_dataset(tiny, data, tmp_path / "z", device="cpu", **kwargs)


def test_bad_records_stop_or_are_skipped(tmp_path, tiny):
    lines = [json.dumps({"id": "a", "prompt": "The capital of France is", "target": "Paris"}),
             "{not json",
             json.dumps({"id": "b", "prompt": "Toyota was founded in"}),
             json.dumps({"id": "c", "prompt": "   ", "target": "x"}),
             json.dumps({"id": "a", "prompt": "A cat is an", "target": "animal"}),
             "",
             json.dumps({"id": "d", "prompt": "A cat is an", "target": "animal"})]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    kwargs = dict(k=2, layers=[0], progress=False)
    with pytest.raises(BadRecord, match=r"bad\.jsonl:2: malformed JSON"):
        project_dataset(tiny, data, tmp_path / "stop", **kwargs)
    assert not (tmp_path / "stop").exists()  # the input is checked before any work
    out = project_dataset(tiny, data, tmp_path / "skip", skip_bad=True, shard_size=2, **kwargs)
    assert list(read_results(out, "records").id) == ["a", "d"]
    rejected = read_results(out, "rejected")
    assert list(rejected.line) == [2, 3, 4, 5]
    reasons = list(rejected.reason)
    assert reasons[0].startswith("malformed JSON") and reasons[1].startswith("missing field 'target'")
    assert reasons[2].startswith("empty prompt") and reasons[3] == "duplicate id 'a' (first on line 1)"
    assert [json.loads(line)["line"] for line in (out / "rejected.jsonl").read_text().splitlines()] == [2, 3, 4, 5]
    # shard 1 holds only rejected records: its empty files have the same schema as the others
    assert pq.read_schema(out / "rows" / "part-000001.parquet") == pq.read_schema(out / "rows" / "part-000000.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(out / "rows"), read_results(out))


def test_counterfact_parquet_and_in_memory_inputs(tmp_path, tiny, tokenizer):
    cf = load_counterfact("counterfact", n=3)
    cf_path = tmp_path / "counterfact.json"
    cf_path.write_text(json.dumps(cf))
    out = project_dataset(tiny, cf_path, tmp_path / "cf", k=2, layers=[1], progress=False,
                          target_field="ground_truth", id_field="case_id", modules=["mlp.out"])
    records = read_results(out, "records")
    assert list(records.id) == [str(r["case_id"]) for r in cf] and list(records.target) == [r["ground_truth"]
                                                                                             for r in cf]
    rows = read_results(out)
    assert set(rows.module) == {"mlp.out"} and set(rows.list) == {"ff2_bottom", "ff2_top"}
    # the object is scored with its leading space: the target token is " French", not "French"
    first_token = tokenizer(" " + cf[0]["ground_truth"], add_special_tokens=False)["input_ids"][0]
    assert int(records.target_token_id[0]) == first_token and tokenizer.decode([first_token]).startswith(" ")
    # the same records in memory, as bl.counterfact.load gives them, and the shipped file by name
    in_memory = project_dataset(tiny, cf, tmp_path / "mem", k=2, layers=[1], progress=False, modules=["mlp.out"])
    pd.testing.assert_frame_equal(read_results(in_memory, "records"), records)
    pd.testing.assert_frame_equal(read_results(in_memory), rows)
    shipped = list(open_source("counterfact", Fields()).records())
    assert len(shipped) == len(load_counterfact("counterfact"))
    assert [(r.id, r.prompt, r.target) for r in shipped[:3]] == [(str(r["id"]), r["prompt"], r["target"]) for r in cf]
    pairs = project_dataset(tiny, [(p, t) for p, t in FACTS[:2]], tmp_path / "pairs", k=2, layers=[0],
                            progress=False)
    assert list(read_results(pairs, "records").id) == ["1", "2"]
    table = pa.table({"question": [p for p, _ in FACTS[:4]], "answer": [t for _, t in FACTS[:4]]})
    pq.write_table(table, tmp_path / "in.parquet")
    out = project_dataset(tiny, tmp_path / "in.parquet", tmp_path / "pq", k=2, layers=[0],
                          prompt_field="question", target_field="answer", progress=False)
    assert list(read_results(out, "records").id) == ["1", "2", "3", "4"]  # ids default to the record number


def test_model_given_by_folder_name(tmp_path, tiny, tiny_checkpoint):
    data = write_jsonl(tmp_path / "in.jsonl", 2)
    by_name = project_dataset(str(tiny_checkpoint), data, tmp_path / "name", k=2, layers=[0], progress=False)
    model, tok = tiny
    loaded = project_dataset(model, tok, data, tmp_path / "loaded", k=2, layers=[0], progress=False)
    pd.testing.assert_frame_equal(read_results(by_name), read_results(loaded))


# -- the output folder as the ecosystem reads it (issue 14) -------------------------------------------------------
def test_rows_and_records_read_as_parquet_datasets(tmp_path, tiny):
    data = write_jsonl(tmp_path / "in.jsonl", 14)
    out = project_dataset(tiny, data, tmp_path / "out", k=2, layers=[0], batch_size=4, progress=False)
    assert auto_shard_size(14) == 8 and len(list((out / "rows").iterdir())) == 2
    for table in ("rows", "records"):
        expected = read_results(out, table)
        assert len(expected) and sorted(p.name for p in (out / table).iterdir()) == [
            f"part-{j:06d}.parquet" for j in range(2)]
        pd.testing.assert_frame_equal(pd.read_parquet(out / table), expected)
        pd.testing.assert_frame_equal(pads.dataset(out / table, format="parquet").to_table().to_pandas(), expected)
    assert set(read_results(out).columns) == set(COLUMNS)


def test_rows_and_records_read_with_hugging_face_datasets(tmp_path, tiny):
    """``datasets`` (not a dependency: skipped without it) gives the same rows; it decodes the dictionary-encoded
    ``module`` and ``list`` columns to plain strings."""
    datasets = pytest.importorskip("datasets")
    data = write_jsonl(tmp_path / "in.jsonl", 6)
    out = project_dataset(tiny, data, tmp_path / "out", k=2, layers=[0], progress=False)
    for table in ("rows", "records"):
        expected = read_results(out, table)
        expected = expected.astype({c: str for c in ("module", "list") if c in expected})
        got = datasets.load_dataset("parquet", data_dir=str(out / table), split="train",
                                    cache_dir=str(tmp_path / "cache")).to_pandas()
        pd.testing.assert_frame_equal(got, expected)


def test_default_shard_size_depends_on_the_record_count_only():
    assert [auto_shard_size(n) for n in (1, 12, 20, 256, 257, 300, 8192, 8193, 10 ** 6)] == [
        8, 8, 8, 8, 9, 10, 256, 256, 256]


def test_twenty_records_make_three_shards_not_forty_one_record_files(tmp_path, tiny):
    """Issue 24: a minimum shard size (8 records) keeps small inputs from making a Parquet file per record."""
    data = write_jsonl(tmp_path / "in.jsonl", 20)
    out = project_dataset(tiny, data, tmp_path / "out", k=1, layers=[0], batch_size=8, progress=False)
    for table in ("rows", "records"):
        assert sorted(p.name for p in (out / table).iterdir()) == [f"part-{j:06d}.parquet" for j in range(3)]
    assert list(read_results(out, "records").id) == [f"r{i}" for i in range(20)]


def test_start_and_n_select_records_as_on_the_command_line(tmp_path, tiny):
    """One record selection for every reader of records: positions start .. start + n - 1 (0-based), the input's
    lines and ids kept; a selection past the end names the input and what it holds; another selection into the
    same folder is another run."""
    data = write_jsonl(tmp_path / "in.jsonl", 10)
    out = project_dataset(tiny, data, tmp_path / "out", k=1, layers=[0], start=3, n=4, batch_size=1, progress=False)
    assert list(read_results(out, "records").id) == ["r3", "r4", "r5", "r6"]
    whole = read_results(project_dataset(tiny, data, tmp_path / "all", k=1, layers=[0], batch_size=1,
                                         progress=False))  # one record per batch: the same numbers either way
    pd.testing.assert_frame_equal(read_results(out), whole[whole.id.isin(["r3", "r4", "r5", "r6"])]
                                  .reset_index(drop=True))
    tail = project_dataset(tiny, data, tmp_path / "tail", k=1, layers=[0], start=8, progress=False)
    assert list(read_results(tail, "records").id) == ["r8", "r9"]
    for start, n, asked in ((8, 4, "start=8, n=4 asks for records 8..11"), (10, None, "start=10 asks for records "
                                                                                      "from 10 on")):
        with pytest.raises(ValueError, match=rf"input '.*in.jsonl' holds 10 records \(0..9\): {asked}"):
            project_dataset(tiny, data, tmp_path / f"past{start}", k=1, layers=[0], start=start, n=n, progress=False)
    with pytest.raises(ValueError, match=r"holds a run with different arguments \(input.n was 4, now 5"):
        project_dataset(tiny, data, out, k=1, layers=[0], start=3, n=5, batch_size=1, progress=False)
    for bad, error, match in ((dict(start=-1), ValueError, "start=-1: expected 0 or more"),
                              (dict(n=0), ValueError, "n=0 is out of range"),
                              (dict(start=1.5), TypeError, "start=1.5: expected")):
        with pytest.raises(error, match=match):
            project_dataset(tiny, data, tmp_path / "bad", k=1, **bad)


def test_settings_travel_as_one_typed_value(tmp_path, tiny):
    """RunOptions carries every setting; keywords replace its fields; an unknown keyword is named."""
    data = write_jsonl(tmp_path / "in.jsonl", 3)
    options = RunOptions(k=1, layers="0", modules="mlp.out", shard_size=2)
    assert options.layers == (0,) and options.modules == ("mlp.out",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.k = 3
    out = project_dataset(tiny, data, tmp_path / "out", options=options, batch_size=2, progress=False)
    run = json.loads((out / "run.json").read_text())
    assert (run["k"], run["layers"], run["modules"], run["batch_size"], run["shard_size"]) == (1, [0], ["mlp.out"], 2,
                                                                                             2)
    assert RunOptions.of(options, prompt_field="question").fields == Fields("question", "target", "id")
    with pytest.raises(TypeError, match="unexpected keyword argument 'top_k'"):
        project_dataset(tiny, data, tmp_path / "x", top_k=3)
    with pytest.raises(ValueError, match="module 'attn.q' has no lens list"):
        RunOptions(modules=("attn.q",))


def test_progress_bar_on_stderr_unless_turned_off(tmp_path, tiny, capsys):
    """The bar's total counts records (5 in shards of 2: the last shard holds one); silent when turned off."""
    data = write_jsonl(tmp_path / "in.jsonl", 5)
    project_dataset(tiny, data, tmp_path / "on", k=2, layers=[0], shard_size=2, log=lambda m: None)
    err = capsys.readouterr().err
    assert "project-dataset" in err and re.search(r"\b0/5\b", err) and "/6" not in err, err
    project_dataset(tiny, data, tmp_path / "off", k=2, layers=[0], log=lambda m: None, progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_progress_false_prints_nothing_and_true_prints_the_summary(tmp_path, tiny, capfd):
    """Issue 24: ``progress=False`` is silent, the final summary included (``log=`` still receives it)."""
    data = write_jsonl(tmp_path / "in.jsonl", 3)
    project_dataset(tiny, data, tmp_path / "quiet", k=1, layers=[0], progress=False)
    project_dataset(tiny, data, tmp_path / "quiet", k=1, layers=[0], progress=False)  # already complete: silent too
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    project_dataset(tiny, data, tmp_path / "loud", k=1, layers=[0])
    assert "blens project-dataset: 3 records (0 rejected)" in capfd.readouterr().err


def test_batches_respect_size_and_token_budget():
    items = []
    for i, n in enumerate([5, 3, 9, 3, 7, 2]):
        record = Record(index=i, line=i + 1, id=str(i), prompt="p", target="t")
        items.append((record, Example("p", "t", tuple(range(n)), (1,))))
    batches = batches_by_length(items, 3, None)
    assert [[r.index for r, _ in b] for b in batches] == [[5, 1, 3], [0, 4, 2]]
    batches = batches_by_length(items, 4, 16)
    assert all(len(b) * max(e.num_tokens for _, e in b) <= 16 or len(b) == 1 for b in batches)
    assert sorted(r.index for b in batches for r, _ in b) == list(range(6))


def test_damaged_merged_statistics_of_a_finished_run_are_written_again(tmp_path, tiny):
    """A finished run whose merged statistics file is damaged is not "already complete": the restart names the file
    and writes it again, equal to what it was."""
    data = write_jsonl(tmp_path / "in.jsonl", 4)
    out = project_dataset(tiny, data, tmp_path / "out", **STATS_RUN)
    merged = sorted((out / "stats").glob("*.safetensors"))
    assert merged
    before = merged[0].read_bytes()
    damage(merged[0], "truncated")
    messages = []
    project_dataset(tiny, data, out, log=messages.append, **STATS_RUN)
    assert (f"blens project-dataset: {str(merged[0])!r} has {len(before) // 2} bytes, {len(before)} were committed "
            "(truncated or replaced): writing it again") in messages, messages
    assert not any("already complete" in m for m in messages)
    assert merged[0].read_bytes() == before


def test_a_segment_without_statistics_says_so(tmp_path):
    from blens_fast.bulk.shards import Segment

    assert Segment("seg-1.json", "session", 0).stats_problem(tmp_path) == "names no statistics file"


def test_manifest_outputs_are_checked_and_may_be_absent(tmp_path, tiny):
    """A malformed output digest in manifest.json is an error naming that file; a manifest without the outputs
    entry (no merged statistics) reads as one with none."""
    data = write_jsonl(tmp_path / "in.jsonl", 2)
    out = project_dataset(tiny, data, tmp_path / "out", k=2, layers=[0], progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"] == {}
    del manifest["outputs"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    messages = []
    project_dataset(tiny, data, out, k=2, layers=[0], progress=False, log=messages.append)
    assert any("already complete" in m for m in messages), messages
    manifest["outputs"] = {"stats/state.safetensors": {"size": "big", "sha256": "00"}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(out / 'manifest.json'))}: expected a file digest"):
        project_dataset(tiny, data, out, k=2, layers=[0], progress=False)


def test_run_differences_name_each_changed_setting():
    from blens_fast.bulk.run import _differences

    old = {"a": 1, "b": {"c": 2, "d": 0}, "x": 1}
    assert _differences(old, json.loads(json.dumps(old))) == []
    assert _differences(old, {"a": 1, "b": {"c": 3, "d": 0}, "y": 2}) == [
        "b.c was 2, now 3", "x was 1, now '<absent>'", "y was '<absent>', now 2"]
    assert _differences({"b": {"c": 1}}, {"b": 5}) == ["b was {'c': 1}, now 5"]
    assert _differences(1, 2) == ["run was 1, now 2"]
    assert _differences([1], {"a": 1}) == ["run was [1], now {'a': 1}"]
    assert _differences([1], [1]) == []


def test_a_damaged_run_file_is_named_as_such(tmp_path, tiny):
    data = write_jsonl(tmp_path / "in.jsonl", 2)
    out = project_dataset(tiny, data, tmp_path / "out", k=2, layers=[0], progress=False)
    damage(out / "run.json", "truncated")
    with pytest.raises(ValueError, match=r"^run file '.*run\.json' is damaged"):
        project_dataset(tiny, data, out, k=2, layers=[0], progress=False)


def test_a_malformed_shard_entry_names_the_manifest(tmp_path, tiny):
    data = write_jsonl(tmp_path / "in.jsonl", 2)
    out = project_dataset(tiny, data, tmp_path / "out", k=2, layers=[0], progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0] = {"shard": 0}
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(out / 'manifest.json'))}: a shard entry is malformed"):
        read_results(out)


def test_shard_arithmetic():
    from blens_fast.bulk.shards import shard_count

    assert [shard_count(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [1, 1, 1, 2, 2, 3]


def test_the_fault_hook_fires_at_the_named_occurrence():
    """The crash tests rely on ``BLENS_FAULT=point:count[:raise]`` stopping at exactly the count-th time a point is
    reached (the first when no count is given), and by default killing the process outright."""
    from blens_fast.bulk.shards import fault, reset_faults

    reset_faults()
    os.environ["BLENS_FAULT"] = "somewhere:3:raise"
    try:
        fault("elsewhere")
        fault("somewhere")
        fault("somewhere")
        with pytest.raises(InjectedFault, match=r"^injected fault at somewhere \(#3\)$"):
            fault("somewhere")
        reset_faults()
        os.environ["BLENS_FAULT"] = "somewhere::raise"
        with pytest.raises(InjectedFault, match=r"\(#1\)$"):
            fault("somewhere")
    finally:
        del os.environ["BLENS_FAULT"]
        reset_faults()
    killed = subprocess.run([sys.executable, "-c", "from blens_fast.bulk.shards import fault; fault('here')"],
                            env={**os.environ, "PYTHONPATH": str(ROOT), "BLENS_FAULT": "here"}, cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL


def test_a_finished_run_is_left_as_it_is_and_a_resume_drops_orphan_states(tmp_path, tiny):
    """A rerun of a finished run writes nothing (run.json names its format); a resumed one deletes statistics states
    no segment names (a kill between a state's write and its commit leaves one)."""
    from blens_fast.bulk.run import FORMAT

    data = write_jsonl(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out"
    injected("after_commit", 2, lambda: project_dataset(tiny, data, out, **STATS_RUN))
    orphan = out / "segments" / "stats-orphan.safetensors"
    orphan.write_bytes(b"left by a kill")
    project_dataset(tiny, data, out, **STATS_RUN)
    assert not orphan.exists()
    assert json.loads((out / "run.json").read_text())["format"] == FORMAT
    def stamps():  # the lock file aside, which every run takes
        return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.startswith(".lock")}

    before = stamps()
    project_dataset(tiny, data, out, **STATS_RUN)
    assert stamps() == before


def test_a_damaged_segment_is_logged_and_its_shards_recomputed(tmp_path, tiny):
    data = write_jsonl(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out"
    injected("after_commit", 2, lambda: project_dataset(tiny, data, out, **STATS_RUN))
    segment = next((out / "segments").glob("seg-*.json"))
    damage(segment, "truncated")
    messages = []
    project_dataset(tiny, data, out, log=messages.append, **STATS_RUN)
    damaged = [i for i, m in enumerate(messages)
               if f"segment {str(segment)!r} is damaged" in m and "its shards will be recomputed" in m]
    assert damaged == [0], messages  # said once, before any work
    assert list(read_results(out, "records").id) == [f"r{i}" for i in range(6)]


def test_segments_read_back_as_written(tmp_path, tiny):
    from blens_fast.bulk.shards import read_segments

    data = write_jsonl(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out"
    injected("after_commit", 2, lambda: project_dataset(tiny, data, out, **STATS_RUN))
    project_dataset(tiny, data, out, **STATS_RUN)
    segments = read_segments(out)
    assert len(segments) == 2
    for segment in segments:
        assert segment.to_json() == json.loads((out / "segments" / segment.name).read_text())


@pytest.mark.parametrize("change, message", [
    (lambda seg: seg.update(rank="0"), "is not a project-dataset segment"),
    (lambda seg: seg.update(shards="none"), "is not a project-dataset segment"),
    (lambda seg: seg["shards"][0].pop("rows"), "a shard entry is malformed"),
    (lambda seg: seg["stats"].update(size="big"), "expected a file digest"),
    (lambda seg: seg["shards"][0]["files"]["records"].update(sha256=None),
     "a shard entry is malformed (its records file: expected a file digest"),
    (lambda seg: seg["stats"].update(file="../x.safetensors"), "x.safetensors"),
])
def test_a_malformed_segment_is_an_error_naming_it(tmp_path, tiny, change, message):
    """Valid JSON but not a segment (wrong types, a malformed shard entry or statistics digest, a file name
    outside the run's folder): an error naming the segment file, not a half-read plan."""
    data = write_jsonl(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out"
    injected("after_commit", 2, lambda: project_dataset(tiny, data, out, **STATS_RUN))
    path = next((out / "segments").glob("seg-*.json"))
    segment = json.loads(path.read_text())
    change(segment)
    path.write_text(json.dumps(segment))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}.*{re.escape(message)}"):
        project_dataset(tiny, data, out, **STATS_RUN)


def test_each_segment_keeps_one_statistics_state(tmp_path, tiny):
    """A commit replaces its segment's previous statistics state: one state file per segment at the end."""
    data = write_jsonl(tmp_path / "in.jsonl", 6)
    out = project_dataset(tiny, data, tmp_path / "out", **STATS_RUN)  # 3 shards, one segment
    assert len(list((out / "segments").glob("seg-*.json"))) == 1
    assert len(list((out / "segments").glob("stats-*.safetensors"))) == 1


@pytest.mark.parametrize("change", [lambda m: m.update(format="other"), lambda m: m.update(shards={}),
                                    lambda m: m.clear()])
def test_a_manifest_of_another_format_is_refused(tmp_path, tiny, change):
    data = write_jsonl(tmp_path / "in.jsonl", 2)
    out = project_dataset(tiny, data, tmp_path / "out", k=2, layers=[0], progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"^manifest '.*manifest\.json' is not a project-dataset manifest of format"):
        read_results(out)
