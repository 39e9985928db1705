"""project-dataset at GPT-2-small dimensions (d=768, 4d=3072, V=50,257; random init, float32, 2 layers): 20
CounterFact records with --stats, SIGKILLed mid-run and resumed, read back whole."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads
import pytest
import torch
import transformers

from blens_fast.bulk import read_results
from blens_fast.counterfact import load as load_counterfact

pytestmark = pytest.mark.realistic

ROOT = Path(__file__).resolve().parents[2]
RECORDS = 20


@pytest.fixture(scope="module")
def gpt2_small_dims(tmp_path_factory, tokenizer):
    """A random-init GPT-2 small with 2 of its 12 layers, saved as a local checkpoint."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    path = tmp_path_factory.mktemp("gpt2_small_dims")
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def test_stats_run_killed_and_resumed(tmp_path, gpt2_small_dims):
    records = load_counterfact("counterfact", n=RECORDS)
    data = tmp_path / "counterfact-20.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "blens_fast.cli", "project-dataset", "--records", str(data), "--out", str(out),
               "--model", str(gpt2_small_dims), "--stats", "--batch-size", "4", "--threads", "1", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "BLENS_FAULT": "after_stats:3"}
    killed = subprocess.run(command, env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert len(read_results(out, "records", partial=True)) == 16  # shards of 8 records (the minimum): 2 of 3 done
    del env["BLENS_FAULT"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming: 2 of 3 shards done, 1 to compute" in done.stderr
    got = read_results(out, "records")
    assert list(got.id) == [str(r["id"]) for r in records] and list(got.target) == [r["target"] for r in records]
    rows = read_results(out)
    assert set(rows.id) == set(got.id) and set(rows.layer) == {0, 1} and len(rows) == 3 * 2 * 10 * got.tokens.sum()
    pd.testing.assert_frame_equal(pads.dataset(out / "rows").to_table().to_pandas(), rows)
    summary = read_results(out, "stats_summary")
    assert len(summary) == 4 and (summary.examples == RECORDS).all() and (summary.tokens == got.tokens.sum()).all()
    assert set(zip(summary.rows, summary.cols)) == {(768, 3072), (3072, 768)}
    norms = read_results(out, "stats_norms")
    assert len(norms) == 4 * RECORDS and (norms.norm > 0).all()
