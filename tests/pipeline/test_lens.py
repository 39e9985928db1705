"""The Backward Lens report on tiny random models of every architecture, against full float64 logits computed
through the model's own final norm and unembedding (not the package's lens)."""
import pytest
import torch

import blens_fast
from blens_fast.lens import lens
from blens_fast.lists import LIST_NAMES
from tests.helpers import ARCHITECTURES, lens_logits64, make_tiny_model, prompt_target_ids

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT, TARGET = "The mother tongue of Danielle Darrieux is", " French"
#: the paper's reading, written here rather than taken from the code under test: (factor, module part, descending?)
PAPER_LISTS = {"ff1_top": ("x", "in", True), "ff2_bottom": ("delta", "out", False), "ff2_top": ("delta", "out", True)}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_report_matches_full_logits(arch, tokenizer):
    model = make_tiny_model(arch)
    k = 7
    report = lens(model, tokenizer, PROMPT, TARGET, k=k, impl="torch")
    cap = blens_fast.capture(model, tokenizer, PROMPT, TARGET)
    target_id = prompt_target_ids(tokenizer, PROMPT, TARGET)[1][0]
    assert report.target_token_id == target_id and report.target_token == TARGET
    assert set(LIST_NAMES) == set(PAPER_LISTS)
    checked = 0
    for name, (factor, part, descending) in PAPER_LISTS.items():
        module = f"mlp.{part}"  # a gated MLP's mlp.in reads the input gate and up share
        for li, layer in enumerate(report.layers):
            vectors = (cap.x if factor == "x" else cap.delta)[(layer, module)][0]
            logits = lens_logits64(model, vectors)
            live = vectors.abs().amax(-1) > 0  # zero VJP rows have no ranking: flagged, not compared
            assert torch.equal(report.degenerate[name][li], ~live)
            # a stable sort keeps the lower token id first among ties
            expected_values, expected_indices = logits.sort(dim=-1, descending=descending, stable=True)
            expected_values, expected_indices = expected_values[:, :k], expected_indices[:, :k]
            assert report.indices[name].shape == (len(report.layers), report.num_positions, k)
            torch.testing.assert_close(report.indices[name][li][live], expected_indices[live])
            torch.testing.assert_close(report.logits[name][li][live].double(), expected_values[live], rtol=1e-5,
                                       atol=1e-5)
            probs = logits.softmax(-1).gather(1, expected_indices)
            torch.testing.assert_close(report.probs[name][li][live].double(), probs[live], rtol=1e-4, atol=1e-7)
            # exact up to float32 rounding: tokens within 1e-4 of the target's logit may fall either way
            margin = (logits - logits[:, target_id: target_id + 1]) * (1 if descending else -1)
            margin[:, target_id] = -1.0
            rank = report.target_rank[name][li]
            assert ((margin > 1e-4).sum(1) + 1 <= rank)[live].all()
            assert (rank <= (margin > -1e-4).sum(1) + 1)[live].all()
            checked += int(live.sum())
    assert checked > 0


def test_ff2_bottom_is_the_argmin_and_ascends_on_a_live_row(tokenizer):
    """The paper's central reading: a descent step promotes the tokens with the SMALLEST logits of the FF2 VJP."""
    model = make_tiny_model("gpt2")
    report = lens(model, tokenizer, PROMPT, TARGET, k=5)
    cap = blens_fast.capture(model, tokenizer, PROMPT, TARGET)
    last = report.num_positions - 1
    for li, layer in enumerate(report.layers):
        delta = cap.delta[(layer, "mlp.out")][0][last]
        assert delta.abs().max() > 0
        logits = lens_logits64(model, delta[None])[0]
        assert int(report.indices["ff2_bottom"][li, last, 0]) == int(logits.argmin())
        assert int(report.indices["ff2_top"][li, last, 0]) == int(logits.argmax())
        assert bool((report.logits["ff2_bottom"][li, last].diff() >= 0).all())
        assert bool((report.logits["ff2_top"][li, last].diff() <= 0).all())


def test_zero_vectors_are_flagged_not_listed(tokenizer, tmp_path):
    """The last layer's FF2 VJP is exactly zero before the positions the loss scores: flagged in the tables,
    greyed in the heatmap, marked in the text instead of tie-broken tokens."""
    model = make_tiny_model("gpt2")
    report = lens(model, tokenizer, PROMPT, TARGET, k=3)
    flat = report.degenerate["ff2_bottom"][-1]
    assert bool(flat[:-1].all()) and not bool(flat[-1])  # one-token target: only the last position carries a VJP
    assert not bool(report.degenerate["ff1_top"].any())
    frame = report.to_pandas()
    assert frame[(frame.list == "ff2_bottom") & (frame.layer == 1) & (frame.position == 0)].degenerate.all()
    ranks = report.target_rank_table()
    assert ranks[(ranks.list == "ff2_top") & (ranks.layer == 1)].degenerate.tolist()[:-1] == [True] * (
        report.num_positions - 1)
    assert "(zero or all-tied vector)" in report.format(positions="all")


@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_degenerate_means_a_zero_vector_or_all_logits_tied(impl):
    """An unembedding that reads one coordinate into one token (all other logits 0): a row with that token's logit
    above or below the rest is live, whatever ties the rest hold; a constant row (zero after the final LayerNorm:
    every logit tied) and a zero row are degenerate."""
    from blens_fast.lens import factor_lists

    model = make_tiny_model("gpt2", torch.float64)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[7, 0] = 1.0
    ctx = blens_fast.bind(model)
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(4, model.config.n_embd, generator=g, dtype=torch.float64)
    rows[0, 0], rows[1, 0] = 50.0, -50.0  # token 7 on top / at the bottom, the other V - 1 logits tied at 0
    rows[2], rows[3] = 2.0, 0.0
    found = factor_lists(ctx, rows, torch.zeros(4, dtype=torch.long), ["ff2_top", "ff2_bottom"], k=3,
                         unit_norm=False, impl=impl)
    (top, _, flat), (bottom, _, same_flat) = found["ff2_top"], found["ff2_bottom"]
    assert top.indices[0, 0] == 7 and bottom.indices[1, 0] == 7
    assert flat.tolist() == same_flat.tolist() == [False, False, True, True]


@pytest.mark.parametrize("call", ["lens", "analyze"])
def test_the_impl_asked_for_is_the_one_that_runs(tokenizer, call):
    """``impl`` reaches the projection: CUDA kernels asked for CPU tensors are refused with the reason."""
    model = make_tiny_model("gpt2")
    if call == "lens":
        run = lambda impl: lens(model, tokenizer, PROMPT, TARGET, k=3, impl=impl)  # noqa: E731
    else:
        cap = blens_fast.capture(model, tokenizer, PROMPT, TARGET)
        run = lambda impl: blens_fast.analyze(model, tokenizer, cap, k=3, impl=impl)  # noqa: E731
    with pytest.raises(ValueError, match="impl='cuda' cannot run .* it takes cuda tensors"):
        run("cuda")
    run("torch")


def rendered_figures(monkeypatch, module) -> list:
    """The figures ``module`` renders from now on (one entry per PNG made)."""
    from blens_fast import _report

    rendered = []
    monkeypatch.setattr(module, "figure_png", lambda fig, **kw: rendered.append(fig) or _report.figure_png(fig, **kw))
    return rendered


def test_tables_plots_html_and_notebook(tokenizer, tmp_path, monkeypatch):
    import sys

    model = make_tiny_model("gpt2")
    report = lens(model, tokenizer, PROMPT, TARGET, layers=[0, -1], k=3)
    assert report.layers == (0, 1)
    frame = report.to_pandas()
    assert list(frame.columns) == ["layer", "module", "position", "input_token", "list", "rank", "token_id", "token",
                                   "logit", "prob", "degenerate"]
    assert len(frame) == len(LIST_NAMES) * 2 * report.num_positions * 3
    ranks = report.target_rank_table()
    assert len(ranks) == len(LIST_NAMES) * 2 * report.num_positions and ranks.target_rank.min() >= 1
    assert set(report.gradients.columns) == {"layer", "module", "tokens", "rank", "norm"}
    text = report.format()
    assert "layer 1" in text and "ff2_bottom" in text and repr(" French") in text
    rendered = rendered_figures(monkeypatch, sys.modules["blens_fast.lens"])
    written = report.save(tmp_path / "out")
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = written["html"].read_text()
    assert "data:image/png;base64," in page and "Target rank" in page
    assert len(rendered) == 1  # the page embeds the PNG written beside it, rendered once
    for name in ("tokens", "target_ranks", "gradients"):
        assert written[name].stat().st_size > 0
    notebook = report._repr_html_()
    assert notebook.startswith("<div>") and "data:image/png;base64," in notebook


def test_unit_norm_variant_differs_only_in_scale(tokenizer):
    model = make_tiny_model("llama")  # RMSNorm without bias: unit-normalising changes nothing
    plain = lens(model, tokenizer, PROMPT, TARGET, k=5, impl="torch")
    unit = lens(model, tokenizer, PROMPT, TARGET, k=5, unit_norm=True, impl="torch")
    torch.testing.assert_close(plain.indices["ff1_top"], unit.indices["ff1_top"])


def test_last_position_loss_ranks_the_last_target_token(tokenizer):
    """The paper authors' definition: the prompt only, every target token scored at its last position, the ranks of
    the target's last token; the default teacher-forces and ranks the first."""
    model = make_tiny_model("gpt2", torch.float64)
    target = " French and English"
    p, t = prompt_target_ids(tokenizer, PROMPT, target)
    forced = lens(model, tokenizer, PROMPT, target, k=3)
    last = lens(model, tokenizer, PROMPT, target, k=3, loss="last_position")
    assert forced.num_positions == len(p) + len(t) - 1 and forced.target_token_id == t[0]
    assert last.num_positions == len(p) and last.target_token_id == t[-1]
    cap = blens_fast.capture(model, tokenizer, PROMPT, target, loss="last_position")
    grad = cap.gradient(1, "mlp.out")
    ids = torch.tensor([p])
    with torch.enable_grad():
        for param in model.parameters():
            param.grad = None
        logp = model(input_ids=ids).logits[0, -1].log_softmax(-1)
        (-logp[t].sum()).backward()
    torch.testing.assert_close(grad.dense(), model.transformer.h[1].mlp.c_proj.weight.grad, rtol=1e-10, atol=1e-12)


def test_context_and_model_calls_agree(tokenizer):
    model = make_tiny_model("gpt2")
    ctx = blens_fast.bind(model, tokenizer)
    a = lens(ctx, PROMPT, TARGET, k=4)
    b = lens(model, tokenizer, PROMPT, TARGET, k=4)
    assert torch.equal(a.indices["ff2_bottom"], b.indices["ff2_bottom"])
    with pytest.raises(TypeError, match="the tokenizer is missing"):
        lens(model)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "k=0 is out of range"),
    (dict(k=50258), "k=50258 is out of range"),
    (dict(layers=[5]), "layer 5 is out of range"),
    (dict(loss="mean"), "loss='mean' is not one of"),
])
def test_lens_bad_input(tokenizer, kwargs, match):
    model = make_tiny_model("gpt2")
    with pytest.raises(ValueError, match=match):
        lens(model, tokenizer, PROMPT, TARGET, **kwargs)


def test_tokens_are_read_from_the_vocabulary_or_shown_as_ids(tokenizer):
    import dataclasses

    report = lens(make_tiny_model("gpt2"), tokenizer, PROMPT, TARGET, layers=[0], k=3)
    token_id = int(report.indices["ff1_top"][0, -1, 0])
    assert report.token(token_id) == tokenizer.convert_ids_to_tokens(token_id) == report.vocabulary[token_id]
    assert dataclasses.replace(report, vocabulary=()).token(token_id) == str(token_id)


def test_tables_hold_each_cells_own_position_token_and_flag(tokenizer):
    """Row by row, the long tables carry the cell they describe: its position, input token, degenerate flag and
    target rank (the last layer's FF2 rows are degenerate before the last position, so flags vary)."""
    import pandas as pd

    report = lens(make_tiny_model("gpt2"), tokenizer, PROMPT, TARGET, layers=[0, -1], k=3)
    frame, ranks = report.to_pandas(), report.target_rank_table()
    assert frame.index.equals(pd.RangeIndex(len(frame))) and ranks.index.equals(pd.RangeIndex(len(ranks)))
    assert bool(report.degenerate["ff2_bottom"].any()) and not bool(report.degenerate["ff2_bottom"].all())
    for name in LIST_NAMES:
        for li, layer in enumerate(report.layers):
            for position in range(report.num_positions):
                cell = frame[(frame.list == name) & (frame.layer == layer) & (frame.position == position)]
                flag = bool(report.degenerate[name][li, position])
                assert len(cell) == 3 and set(cell.input_token) == {report.tokens[position]}
                assert set(cell.degenerate) == {flag}
                row = ranks[(ranks.list == name) & (ranks.layer == layer) & (ranks.position == position)]
                assert len(row) == 1 and row.input_token.item() == report.tokens[position]
                assert row.target_rank.item() == int(report.target_rank[name][li, position])
                assert row.degenerate.item() == flag


def test_every_table_names_a_gated_ff1_mlp_in(tokenizer, tmp_path):
    """One naming rule for every table (issue 24): on a gated MLP the lens's token rows and gradient rows, the rank
    table, the bulk Parquet rows and the statistics all say ``mlp.in``, whose gradient is gate and up side by side:
    one norm, ``sqrt(||grad gate||^2 + ||grad up||^2)`` from ordinary autograd."""
    import json

    from blens_fast import bind, gradient_stats, project_dataset, rank, read_results
    from tests.helpers import autograd_loss

    model = make_tiny_model("llama", torch.float64)
    autograd_loss(model, tokenizer, PROMPT, TARGET).backward()
    mlps = [block.mlp for block in model.model.layers]
    expected = [(mlp.gate_proj.weight.grad.norm() ** 2 + mlp.up_proj.weight.grad.norm() ** 2).sqrt().item()
                for mlp in mlps]
    model.zero_grad(set_to_none=True)
    ctx = bind(model, tokenizer)
    report = lens(ctx, PROMPT, TARGET, k=3)
    assert set(report.to_pandas().module) == set(report.gradients.module) == {"mlp.in", "mlp.out"}
    table = rank(ctx, [PROMPT], [TARGET], progress=False)
    data = tmp_path / "facts.jsonl"
    data.write_text(json.dumps({"id": "a", "prompt": PROMPT, "target": TARGET}) + "\n", encoding="utf-8")
    rows = read_results(project_dataset(ctx, data, tmp_path / "out", k=3, progress=False))
    stats = gradient_stats(ctx, [(PROMPT, TARGET)], modules=("mlp.in",), progress=False)
    assert set(table.module) == set(rows.module) == {"mlp.in", "mlp.out"} and stats.modules == ("mlp.in",)
    for layer, norm in enumerate(expected):
        ff1 = lambda frame: frame[(frame.layer == layer) & (frame.module == "mlp.in")]  # noqa: E731
        assert ff1(report.gradients).norm.item() == pytest.approx(norm, rel=1e-9)
        assert ff1(table).norm.item() == pytest.approx(norm, rel=1e-9)
        assert len(ff1(rows)) and ((ff1(rows).grad_norm - norm).abs() <= 1e-9 * norm).all()
        assert stats.norms[(layer, "mlp.in")].item() == pytest.approx(norm, rel=1e-5)
        assert stats[(layer, "mlp.in")].shape == (32, 2 * 48)
