"""project-dataset: rows as the lens gives them, exactly-once resume, refusals, bad records, torchrun ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from blens_fast import bulk
from blens_fast.bulk import BadRecord, InjectedFault, project_dataset, read_results
from blens_fast.capture import capture
from blens_fast.cli import main as cli_main
from blens_fast.lens import analyze
from blens_fast.stats import gradient_stats


ROOT = Path(__file__).resolve().parents[1]
FACTS = [("The mother tongue of Danielle Darrieux is", "French"), ("The capital of France is", "Paris"),
         ("Toyota was founded in", "Japan"), ("The Eiffel Tower is located in", "Paris"),
         ("Python was created by", "Guido"), ("Ten plus two is", "twelve"), ("A cat is an", "animal"),
         ("The sun rises in the", "east"), ("Water freezes at zero", "degrees"), ("Mozart was born in", "Salzburg")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP waits that dominate small ops."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    from blens_fast.models import load_model

    return load_model(str(tiny_checkpoint))


def write_jsonl(path, n, *, start=0):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(start, start + n):
            prompt, target = FACTS[i % len(FACTS)]
            f.write(json.dumps({"id": f"r{i}", "prompt": f"{prompt}" + " indeed" * (i % 3), "target": target}) + "\n")
    return path


def rows_for(df, rid):
    return df[df.id == rid].reset_index(drop=True)


def test_rows_are_the_lens_report(tmp_path, tiny):
    model, tok = tiny
    data = write_jsonl(tmp_path / "in.jsonl", 5)
    out = project_dataset(data, tmp_path / "out", model=model, tokenizer=tok, k=3, batch_size=2, progress=False)
    rows = read_results(out)
    records = read_results(out, "records")
    assert list(records.id) == [f"r{i}" for i in range(5)]  # input order, whatever the batching
    assert list(rows.columns) == ["id", "layer", "module", "position", "input_token", "list", "rank", "token_id",
                                  "token", "logit", "prob", "target_rank", "grad_norm", "grad_rank", "grad_tokens"]
    # record r4 against the lens on its own
    prompt, target = FACTS[4]
    prompt += " indeed"
    cap = capture(model, tok, [prompt], [target], modules=("mlp.in", "mlp.out"))
    report = analyze(cap, model, tok, k=3)[0]
    expected = report.to_pandas()
    got = rows_for(rows, "r4")
    assert len(got) == len(expected) == 3 * 2 * cap.examples[0].num_tokens * 3
    for column in ("layer", "module", "position", "input_token", "list", "rank", "token_id", "token"):
        assert list(got[column]) == list(expected[column]), column
    torch.testing.assert_close(torch.tensor(got.logit.to_numpy()), torch.tensor(expected.logit.to_numpy()),
                               rtol=1e-4, atol=1e-5)
    layer_index = {layer: i for i, layer in enumerate(report.layers)}
    assert all(int(report.target_rank[r.list][layer_index[r.layer], r.position]) == r.target_rank
               for r in got.itertuples())
    grads = report.gradients.set_index(["layer", "module"])
    for r in got.drop_duplicates(["layer", "module"]).itertuples():
        assert r.grad_norm == pytest.approx(grads.loc[(r.layer, r.module), "norm"], rel=1e-4)
        assert r.grad_rank == grads.loc[(r.layer, r.module), "rank"]
    assert records.set_index("id").loc["r4", "tokens"] == cap.examples[0].num_tokens
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["records"] == 5 and manifest["rows"] == len(rows)


@pytest.mark.parametrize("point", ["after_rows", "after_records", "after_commit"])
def test_killed_anywhere_resumes_exactly_once(tmp_path, tiny, point):
    model, tok = tiny
    data = write_jsonl(tmp_path / "in.jsonl", 60)
    kwargs = dict(model=model, tokenizer=tok, k=2, layers=[1], batch_size=8, shard_size=8, progress=False)
    ref_out = project_dataset(data, tmp_path / "ref", **kwargs)
    out = tmp_path / "out"
    os.environ["BLENS_FAULT"] = f"{point}:3:raise"
    try:
        with pytest.raises(InjectedFault):
            project_dataset(data, out, **kwargs)
        os.environ["BLENS_FAULT"] = f"{point}:2:raise"
        with pytest.raises(InjectedFault):
            project_dataset(data, out, **kwargs)
    finally:
        del os.environ["BLENS_FAULT"]
    with pytest.raises(ValueError, match="not finished"):
        read_results(out)
    partial = read_results(out, "records", partial=True)
    assert partial.id.is_unique and 0 < len(partial) < 60
    project_dataset(data, out, **kwargs)
    got, ref = read_results(out), read_results(ref_out)
    records = read_results(out, "records")
    assert records.id.is_unique and sorted(records.id) == sorted(f"r{i}" for i in range(60))
    pd.testing.assert_frame_equal(got, ref)
    assert not list(out.rglob("*.tmp"))


def test_sigkill_and_resume_through_the_command_line(tmp_path, tiny_checkpoint, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", 24)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "blens_fast.cli", "project-dataset", "--input", str(data), "--output", str(out),
            "--model", str(tiny_checkpoint), "--k", "2", "--layers", "0", "--shard-size", "6", "--batch-size", "4",
            "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "BLENS_FAULT": "after_stats:2"}
    killed = subprocess.run(args + ["--stats", "--stats-rank", "2"], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    env.pop("BLENS_FAULT")
    done = subprocess.run(args + ["--stats", "--stats-rank", "2"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "24 records (0 rejected)" in done.stderr
    records = read_results(out, "records")
    assert records.id.is_unique and len(records) == 24
    summary = read_results(out, "stats_summary")
    assert (summary.examples == 24).all()
    norms = read_results(out, "stats_norms")
    assert len(norms) == 24 * 2 and norms.id.nunique() == 24
    # a different argument into the same directory is refused, with exit code 2 and one line
    refused = cli_main(args[3:-1] + ["--k", "3", "--no-progress", "--stats", "--stats-rank", "2"])
    assert refused == 2
    message = capsys.readouterr().err
    assert "holds a run with different arguments" in message and "k was 2, now 3" in message
    assert len(message.strip().splitlines()) == 1


def test_stats_match_gradient_stats(tmp_path, tiny):
    model, tok = tiny
    data = write_jsonl(tmp_path / "in.jsonl", 6)
    out = project_dataset(data, tmp_path / "out", model=model, tokenizer=tok, k=2, layers=[0], batch_size=3,
                          shard_size=4, stats=True, stats_rank=2, progress=False)
    records = [json.loads(line) for line in open(data)]
    direct = gradient_stats(model, tok, records, layers=[0], rank=2, batch_size=3, impl="torch")
    summary = read_results(out, "stats_summary").set_index(["layer", "module"])
    for key, module_stats in direct.summed.items():
        assert summary.loc[key, "frobenius"] == pytest.approx(module_stats.frobenius, rel=1e-3)
        assert summary.loc[key, "top_singular_value"] == pytest.approx(float(module_stats.singular_values[0]),
                                                                       rel=1e-3)
    norms = read_results(out, "stats_norms")
    rows = read_results(out, columns=["id", "layer", "module", "grad_norm"]).drop_duplicates(["id", "layer", "module"])
    merged = norms.merge(rows, on=["id", "layer", "module"])
    assert len(merged) == 12
    torch.testing.assert_close(torch.tensor(merged.norm.to_numpy()), torch.tensor(merged.grad_norm.to_numpy()),
                               rtol=1e-4, atol=0)


def test_bad_records_stop_or_are_skipped(tmp_path, tiny):
    model, tok = tiny
    lines = [json.dumps({"id": "a", "prompt": "The capital of France is", "target": "Paris"}),
             "{not json",
             json.dumps({"id": "b", "prompt": "Toyota was founded in"}),
             json.dumps({"id": "c", "prompt": "   ", "target": "x"}),
             json.dumps({"id": "a", "prompt": "A cat is an", "target": "animal"}),
             "",
             json.dumps({"id": "d", "prompt": "A cat is an", "target": "animal"})]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    kwargs = dict(model=model, tokenizer=tok, k=2, layers=[0], progress=False)
    with pytest.raises(BadRecord, match=r"bad\.jsonl:2: malformed JSON"):
        project_dataset(data, tmp_path / "stop", **kwargs)
    out = project_dataset(data, tmp_path / "skip", skip_bad=True, **kwargs)
    assert list(read_results(out, "records").id) == ["a", "d"]
    rejected = read_results(out, "rejected")
    assert list(rejected.line) == [2, 3, 4, 5]
    reasons = list(rejected.reason)
    assert reasons[0].startswith("malformed JSON") and reasons[1].startswith("missing field 'target'")
    assert reasons[2].startswith("empty prompt") and reasons[3] == "duplicate id 'a' (first on line 1)"
    assert [json.loads(line)["line"] for line in (out / "rejected.jsonl").read_text().splitlines()] == [2, 3, 4, 5]
    # the command line: one line, file and line number, exit code 2
    code = cli_main(["project-dataset", "--input", str(data), "--output", str(tmp_path / "cli"), "--model",
                     "/nonexistent/model", "--no-progress"])
    assert code == 2


def test_counterfact_json_and_parquet_inputs(tmp_path, tiny):
    model, tok = tiny
    from blens_fast.default_model import load_counterfact

    cf = load_counterfact()[:3]
    cf_path = tmp_path / "counterfact.json"
    cf_path.write_text(json.dumps(cf))
    out = project_dataset(cf_path, tmp_path / "cf", model=model, tokenizer=tok, k=2, layers=[1], progress=False,
                          target_field="ground_truth", id_field="case_id", modules=["mlp.out"])
    records = read_results(out, "records")
    assert list(records.id) == [str(r["case_id"]) for r in cf] and list(records.target) == [r["ground_truth"] for r in cf]
    rows = read_results(out)
    assert set(rows.module) == {"mlp.out"} and set(rows.list) == {"ff2_bottom", "ff2_top"}
    # the object is scored with its leading space: the target token is " French", not "French"
    assert tok.decode([int(records.target_token_id[0])]) == " " + cf[0]["ground_truth"].split()[0][:len(
        tok.decode([int(records.target_token_id[0])])) - 1]
    table = pa.table({"question": [p for p, _ in FACTS[:4]], "answer": [t for _, t in FACTS[:4]]})
    pq.write_table(table, tmp_path / "in.parquet")
    out = project_dataset(tmp_path / "in.parquet", tmp_path / "pq", model=model, tokenizer=tok, k=2, layers=[0],
                          prompt_field="question", target_field="answer", progress=False)
    assert list(read_results(out, "records").id) == ["1", "2", "3", "4"]  # ids default to the record number


def test_refusals_and_reruns(tmp_path, tiny):
    model, tok = tiny
    data = write_jsonl(tmp_path / "in.jsonl", 3)
    kwargs = dict(model=model, tokenizer=tok, layers=[0], progress=False)
    out = project_dataset(data, tmp_path / "out", k=2, **kwargs)
    before = read_results(out)
    messages = []
    project_dataset(data, out, k=2, log=messages.append, **kwargs)  # complete: nothing to do
    assert "already complete" in messages[0]
    pd.testing.assert_frame_equal(read_results(out), before)
    with pytest.raises(ValueError, match="different arguments.*k was 2, now 3"):
        project_dataset(data, out, k=3, **kwargs)
    with pytest.raises(ValueError, match="different arguments.*input.sha256"):
        write_jsonl(data, 4)
        project_dataset(data, out, k=2, **kwargs)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty and holds no blens project-dataset run"):
        project_dataset(data, tmp_path / "other", k=2, **kwargs)
    with pytest.raises(ValueError, match="module 'attn.q' has no lens list"):
        project_dataset(data, tmp_path / "x", modules=["attn.q"], **kwargs)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        project_dataset(tmp_path / "missing.jsonl", tmp_path / "y", **kwargs)
    with pytest.raises(ValueError, match="table='bogus' is not one of"):
        read_results(out, "bogus")


def test_batches_respect_size_and_token_budget():
    recs = []
    for i, n in enumerate([5, 3, 9, 3, 7, 2]):
        example = bulk.Example("p", "t", tuple(range(n)), (1,))
        recs.append(bulk.Record(index=i, line=i + 1, id=str(i), prompt="p", target="t", example=example))
    batches = bulk._batches(recs, 3, None)
    assert [[r.index for r in b] for b in batches] == [[5, 1, 3], [0, 4, 2]]
    batches = bulk._batches(recs, 4, 16)
    assert all(len(b) * max(r.example.num_tokens for r in b) <= 16 or len(b) == 1 for b in batches)
    assert sorted(r.index for b in batches for r in b) == list(range(6))


def test_torchrun_two_processes_give_the_same_result(tmp_path, tiny_checkpoint):
    """2 gloo processes split the shards; the merged result equals one process's, row for row."""
    data = write_jsonl(tmp_path / "in.jsonl", 12)
    common = ["--input", str(data), "--model", str(tiny_checkpoint), "--k", "2", "--layers", "1", "--shard-size", "3",
              "--batch-size", "2", "--no-progress", "--stats", "--stats-rank", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("BLENS_FAULT", None)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(29500 + os.getpid() % 1000), "-m", "blens_fast.cli", "project-dataset",
                          "--output", str(tmp_path / "two")] + common, env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert cli_main(["project-dataset", "--output", str(tmp_path / "one")] + common) == 0  # one process, one thread
    segments = [json.loads(p.read_text()) for p in (tmp_path / "two" / "manifest").glob("seg-*.json")]
    assert sorted(s["rank"] for s in segments) == [0, 1] and all(s["shards"] for s in segments)
    pd.testing.assert_frame_equal(read_results(tmp_path / "two"), read_results(tmp_path / "one"))
    pd.testing.assert_frame_equal(read_results(tmp_path / "two", "records"), read_results(tmp_path / "one", "records"))
    a = read_results(tmp_path / "two", "stats_summary")
    b = read_results(tmp_path / "one", "stats_summary")
    pd.testing.assert_frame_equal(a, b, rtol=1e-5)
