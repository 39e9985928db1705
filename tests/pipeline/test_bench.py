"""`blens bench` end to end on tiny random models: both ways agree, every file is written."""
import json

import pytest
import torch

from blens_fast.bench import BenchConfig, run_bench
from blens_fast.bench.meter import Meter
from blens_fast.bench.run import WayResult, build_model, compare, fast_way, make_prompts
from blens_fast.cli import main
from blens_fast.lens_reference import TokenList
from blens_fast.lists import LIST_NAMES

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_command_writes_json_markdown_and_png(tmp_path, capsys):
    code = main(["bench", "--model", "tiny", "--prompts", "1,2", "--batch-size", "2", "--naive-prompts", "1",
                 "--threads", "1", "--quiet", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    stem = tmp_path / "bench_cpu_tiny"
    for suffix in (".json", ".md", ".png"):
        assert stem.with_suffix(suffix).stat().st_size > 0
    assert not list(tmp_path.glob("*.partial.json"))
    report = json.loads(stem.with_suffix(".json").read_text())
    main_run = next(r for r in report["runs"] if r["main"])
    assert main_run["prompts"] == 2 and main_run["agree"]
    agreement = main_run["agreement"]
    assert agreement["prompts_compared"] == 1
    assert agreement["gradient_rank_equal"] == 1.0
    assert agreement["topk_tokens_equal"] >= 0.99 and agreement["target_rank_equal"] >= 0.95
    naive, fast = main_run["ways"]["naive"], main_run["ways"]["blens_fast"]
    assert naive["extrapolated"] and naive["prompts_run"] == 1 and not fast["extrapolated"]
    for rec in (naive, fast):
        assert set(rec["seconds"]) == {"gradients", "rank", "projection", "end_to_end"}
        assert all(v > 0 for v in rec["peak_bytes_beyond_weights"].values())
    # the naive way keeps a dense gradient for every parameter: more than the weights of the MLPs at least
    assert naive["peak_bytes_beyond_weights"]["gradients"] > fast["peak_bytes_beyond_weights"]["gradients"]
    assert main_run["ratios"]["time"]["end_to_end"] > 0
    assert len(report["runs"]) == 2  # the scaling point N=1 runs blens_fast only
    md = stem.with_suffix(".md").read_text()
    assert "| end to end |" in md and report["torch"] in md and "bench_cpu_tiny.png" in md


def test_compare_counts_tied_rows_by_value():
    def result(indices, values, ranks, slack=(0, 0)):
        lists = {name: TokenList(indices, values, ranks, torch.tensor(slack), torch.zeros(2, dtype=torch.bool))
                 for name in LIST_NAMES}
        return WayResult(torch.ones(1, 1, 2, dtype=torch.long), torch.ones(1, 1, 2, dtype=torch.float64), lists)

    values = torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 0.0]])
    a = result(torch.tensor([[5, 6, 7], [2, 0, 1]]), values, torch.tensor([1, 1]))
    b = result(torch.tensor([[5, 6, 7], [0, 1, 2]]), values, torch.tensor([1, 1]))
    c = result(torch.tensor([[6, 5, 7], [0, 1, 2]]), values, torch.tensor([2, 1]))
    same = compare(a, b)
    assert same["topk_tokens_equal"] == 1.0 and same["rows_with_exact_ties"] == 3
    differ = compare(a, c)
    assert differ["topk_tokens_equal"] == 0.5 and differ["target_rank_equal"] == 0.5
    # a rank one apart counts as equal when one other token's logit lies within rounding of the target's
    banded = compare(result(torch.tensor([[5, 6, 7], [2, 0, 1]]), values, torch.tensor([1, 1]), slack=(1, 0)), c)
    assert banded["target_rank_equal"] == 1.0 and banded["target_rank_exactly_equal"] == 0.5
    ranks_differ = WayResult(torch.zeros(1, 1, 2, dtype=torch.long), b.norms, b.lists)
    assert compare(a, ranks_differ)["gradient_rank_equal"] == 0.0


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["bench", "--model", "tiny", "--prompts", "0", "--out", str(tmp_path)]) == 2
    assert "prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # --layers means layer indices everywhere; bench builds --depth blocks
        main(["bench", "--model", "tiny", "--layers", "2", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    with pytest.raises(ValueError, match="dtype='int8'"):
        BenchConfig(dtype="int8")
    with pytest.raises(ValueError, match="depth=0"):
        BenchConfig(depth=0)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA device"):
        run_bench(BenchConfig(model="tiny", prompts=(1,), device="cuda"))


def test_fast_way_token_budget_keeps_rows_in_order():
    """Captures cut by a padded-token budget give, row for row, what one prompt per capture gives."""
    ctx, info = build_model("tiny")
    examples = ctx.tokenize(*make_prompts(ctx.tokenizer, 7))
    layers = tuple(range(info.depth))
    budget = 2 * max(e.num_tokens for e in examples) - 1  # some captures hold 2 prompts, the longest goes alone
    one, budgeted = (fast_way(ctx, examples, layers, meter=Meter(torch.device("cpu"), "time"),
                              config=BenchConfig(model="tiny", k=3, batch_size=size, max_tokens=tokens, impl="torch",
                                                 progress=False))
                     for size, tokens in ((1, None), (3, budget)))
    assert one.ranks.shape == (7, info.depth, 2) and torch.equal(one.ranks, budgeted.ranks)
    torch.testing.assert_close(one.norms, budgeted.norms, rtol=1e-4, atol=1e-7)
    for name, found in one.lists.items():
        assert found.indices.shape == budgeted.lists[name].indices.shape
        torch.testing.assert_close(found.values, budgeted.lists[name].values, rtol=1e-3, atol=1e-5)
