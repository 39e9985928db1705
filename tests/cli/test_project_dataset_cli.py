"""blens project-dataset: the shared options, a SIGKILL and a resume, one-line errors with exit code 2 (refusals, bad
records, the lock), and two torchrun ranks that give one process's result and one pass's statistics."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from blens_fast.bulk import read_results
from blens_fast.cli import main as cli_main
from blens_fast.context import load_model
from blens_fast.stats import gradient_stats
from tests.helpers import prompt_target_ids

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
FACTS = [("The capital of France is", "Paris"), ("Toyota was founded in", "Japan"), ("A cat is an", "animal"),
         ("Mozart was born in", "Salzburg")]


def write_jsonl(path, n):
    records = [{"id": f"r{i}", "prompt": FACTS[i % 4][0] + " indeed" * (i % 3), "target": FACTS[i % 4][1]}
               for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path, records


def command(*extra):
    return [sys.executable, "-m", "blens_fast.cli", "project-dataset", *extra]


def environment(**extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    if "BLENS_FAULT" not in extra:
        env.pop("BLENS_FAULT", None)
    return env


def one_line_error(capsys, *fragments):
    message = capsys.readouterr().err
    assert len(message.strip().splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_help_shows_the_shared_options(capsys):
    with pytest.raises(SystemExit):
        cli_main(["project-dataset", "--help"])
    text = capsys.readouterr().out
    for option in ("--model", "--device", "--dtype", "--threads", "--out", "--quiet", "--layers", "--batch-size",
                   "--max-tokens", "--k", "--unit-norm", "--impl", "--shard-size", "--stats", "--skip-bad"):
        assert option in text


def test_sigkill_and_resume_through_the_command_line(tmp_path, tiny_checkpoint, capsys):
    data, _ = write_jsonl(tmp_path / "in.jsonl", 24)
    out = tmp_path / "out"
    args = ["--records", str(data), "--out", str(out), "--model", str(tiny_checkpoint), "--k", "2", "--layers", "0",
            "--shard-size", "6", "--batch-size", "4", "--quiet", "--stats", "--stats-rank", "2"]
    killed = subprocess.run(command(*args), env=environment(BLENS_FAULT="after_stats:2"), capture_output=True,
                            text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    done = subprocess.run(command(*args), env=environment(), capture_output=True, text=True)  # the lock is free
    assert done.returncode == 0, done.stderr[-2000:]
    assert "24 records (0 rejected)" in done.stderr
    records = read_results(out, "records")
    assert records.id.is_unique and len(records) == 24
    assert (read_results(out, "stats_summary").examples == 24).all()
    norms = read_results(out, "stats_norms")
    assert len(norms) == 24 * 2 and norms.id.nunique() == 24
    # a different argument into the same folder is refused, with exit code 2 and one line
    assert cli_main(["project-dataset", *args[:args.index("--k")], "--k", "3", *args[args.index("--layers"):]]) == 2
    one_line_error(capsys, "holds a run with different arguments", "k was 2, now 3")


def test_errors_are_one_line_with_exit_code_2(tmp_path, tiny_checkpoint, capsys):
    data, _ = write_jsonl(tmp_path / "in.jsonl", 2)
    common = ["--records", str(data), "--model", str(tiny_checkpoint), "--layers", "0", "--quiet"]
    assert cli_main(["project-dataset", *common]) == 2
    one_line_error(capsys, "--out is required")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text() + "{not json\n")
    assert cli_main(["project-dataset", *common, "--records", str(bad), "--out", str(tmp_path / "bad")]) == 2
    one_line_error(capsys, "bad.jsonl:3: malformed JSON")
    assert cli_main(["project-dataset", "--records", str(data), "--out", str(tmp_path / "m"), "--model",
                     "/nonexistent/model", "--quiet"]) == 2
    one_line_error(capsys, "/nonexistent/model")
    out = tmp_path / "out"
    assert cli_main(["project-dataset", *common, "--out", str(out)]) == 0
    capsys.readouterr()
    (out / "run.json").write_text((out / "run.json").read_text()[:40])
    assert cli_main(["project-dataset", *common, "--out", str(out)]) == 2
    one_line_error(capsys, "run.json' is damaged")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["project-dataset", *common, "--out", str(out), "--shard-size", "0"])
    assert exit_info.value.code == 2


def test_a_second_process_exits_2_naming_the_holder(tmp_path, tiny_checkpoint, capsys):
    data, _ = write_jsonl(tmp_path / "in.jsonl", 2)
    out = tmp_path / "out"
    out.mkdir()
    hold = ("import sys, time; from pathlib import Path; from blens_fast.bulk.shards import FolderLock\n"
            "with FolderLock(Path(sys.argv[1]), 0):\n    print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True,
                              env=environment())
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = cli_main(["project-dataset", "--records", str(data), "--out", str(out), "--model", str(tiny_checkpoint),
                         "--layers", "0", "--quiet"])
        assert code == 2
        one_line_error(capsys, "is in use by another project-dataset run", f"pid {holder.pid} on host")
    finally:
        holder.kill()
        holder.wait()


def test_torchrun_two_processes_give_one_process_result(tmp_path, tiny_checkpoint, tokenizer):
    """2 gloo processes with the default shard size: both get work, rank 0's progress bar counts its records once, the
    merged result equals one process's row for row, and the merged statistics equal one gradient_stats pass."""
    data, records = write_jsonl(tmp_path / "in.jsonl", 12)
    common = ["--records", str(data), "--model", str(tiny_checkpoint), "--k", "2", "--layers", "1", "--batch-size", "2",
              "--stats", "--stats-rank", "2"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(29500 + os.getpid() % 1000), "-m", "blens_fast.cli", "project-dataset",
                          "--out", str(tmp_path / "two"), *common], env=environment(), capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    counts = [(int(a), int(b)) for a, b in re.findall(r"(\d+)/(\d+) \[", two.stderr)]
    assert counts and all(a <= b == 8 for a, b in counts), two.stderr[-2000:]  # rank 0's 8 records, none twice
    assert "this run: 8 records on rank 0" in two.stderr
    assert cli_main(["project-dataset", "--out", str(tmp_path / "one"), "--quiet", *common]) == 0
    segments = [json.loads(p.read_text()) for p in (tmp_path / "two" / "segments").glob("seg-*.json")]
    assert sorted(s["rank"] for s in segments) == [0, 1] and all(s["shards"] for s in segments)
    for table in ("rows", "records"):
        pd.testing.assert_frame_equal(read_results(tmp_path / "two", table), read_results(tmp_path / "one", table))
    summary = read_results(tmp_path / "two", "stats_summary").set_index(["layer", "module"])
    direct = gradient_stats(load_model(str(tiny_checkpoint)), records, layers=[1], rank=2, impl="torch",
                            progress=False)
    tokens = sum(len(p) + len(t) - 1 for p, t in (prompt_target_ids(tokenizer, r["prompt"], r["target"])
                                                  for r in records))
    for key, module_stats in direct.summed.items():
        assert summary.loc[key, "examples"] == 12 and summary.loc[key, "tokens"] == tokens == module_stats.num_tokens
        assert summary.loc[key, "frobenius"] == pytest.approx(module_stats.frobenius, rel=1e-4)
        assert summary.loc[key, "top_singular_value"] == pytest.approx(float(module_stats.singular_values[0]),
                                                                       rel=1e-4)
