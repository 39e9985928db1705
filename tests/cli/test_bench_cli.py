"""`blens bench` from the command line: the shared options, and a 16-bit run on the shipped model that agrees."""
import json
import re

import pytest

from blens_fast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bfloat16_bench_on_the_shipped_model_exits_0_and_stores_per_row_ranks(tmp_path, capsys):
    code = main(["bench", "--dtype", "bfloat16", "--model", "default", "--prompts", "3", "--naive-prompts", "1",
                 "--threads", "1", "--quiet", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr()
    report = json.loads((tmp_path / "bench_cpu_default_bfloat16.json").read_text())
    (run,) = report["runs"]
    assert run["agree"] and run["agreement"]["gradient_rank_equal"] == 1.0
    ranks = run["ranks"]
    gradients = ranks["gradient_ranks"]
    assert len(gradients["naive"]) == 1 and len(gradients["naive"][0]) == 4  # 1 prompt x 4 layers x 2 modules
    assert gradients["naive"] == gradients["blens_fast"]
    for name in ("ff1_top", "ff2_bottom", "ff2_top"):  # one row per layer and position of the prompt compared
        rows = ranks["target_ranks"][name]
        assert len(rows["naive"]) == len(rows["blens_fast"]) == len(rows["same_vectors"]) == len(rows["degenerate"])
        assert len(rows["naive"]) > 0 and len(rows["naive"]) % 4 == 0
        assert rows["naive"] == rows["same_vectors"]


def test_help_shows_the_shared_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--device", "--dtype", "--threads", "--out", "--quiet", "--depth", "--batch-size",
                   "--max-tokens", "--k", "--unit-norm", "--impl", "tiny-llama"):
        assert option in text, option
    for gone in ("--layers", "--no-progress", "--normalized"):
        assert gone not in text, gone


def test_bench_output_has_no_profiler_lines_and_counts_in_words(tmp_path, capfd):
    """Issue 24: the CPU memory pass's profiler logs nothing on stderr (its C++ side writes to the file descriptor),
    and one of anything is singular ("measured on 1 prompt")."""
    assert main(["bench", "--model", "tiny", "--prompts", "2", "--naive-prompts", "1", "--batch-size", "1",
                 "--threads", "1", "--out", str(tmp_path)]) == 0
    captured = capfd.readouterr()
    assert "profiler" not in captured.err and "USDT" not in captured.err, captured.err
    assert "measured on 1 prompt, scaled" in captured.out
    text = captured.out + (tmp_path / "bench_cpu_tiny.md").read_text()
    assert not re.search(r"\b1 (prompts|threads|layers)\b", text), re.search(r".{40}\b1 (prompts|threads|layers)\b.{9}",
                                                                             text)
