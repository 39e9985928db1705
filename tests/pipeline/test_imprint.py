"""imprint_shift: the paper's imprint and shift, against dense computations with ordinary autograd."""
import pytest
import torch

import blens_fast as bl
from blens_fast.imprint import imprint_fraction, imprint_shift, key_match
from tests.helpers import autograd_loss, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT, TARGET = "The Eiffel Tower is located in the city of", " Rome"
#: FF1 (mlp.in): a gated MLP's gate and up, side by side
FF1 = {"gpt2": ["transformer.h.{}.mlp.c_fc"], "llama": ["model.layers.{}.mlp.gate_proj", "model.layers.{}.mlp.up_proj"],
       "gptj": ["transformer.h.{}.mlp.fc_in"]}
FF2 = {"gpt2": "transformer.h.{}.mlp.c_proj", "llama": "model.layers.{}.mlp.down_proj",
       "gptj": "transformer.h.{}.mlp.fc_out"}


def io(arch, tensor):
    """A weight-shaped tensor in [in, out] terms (GPT-2's Conv1D stores [in, out] already)."""
    return tensor if arch == "gpt2" else tensor.T


def dense_sgd_update(model, tokenizer, arch, layer, lr):
    """-lr x the dense gradient of FF1 and FF2 at ``layer`` from ordinary autograd, in [in, out] terms."""
    for p in model.parameters():
        p.grad = None
    with torch.enable_grad():
        autograd_loss(model, tokenizer, PROMPT, TARGET).backward()
    ff1 = torch.cat([io(arch, model.get_submodule(path.format(layer)).weight.grad) for path in FF1[arch]], 1)
    ff2 = model.get_submodule(FF2[arch].format(layer)).weight.grad
    updates = -lr * ff1.double(), -lr * io(arch, ff2).double()
    for p in model.parameters():
        p.grad = None
    return updates


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gptj"])
def test_one_sgd_step_is_minus_lr_times_the_captured_gradient(arch, tokenizer):
    model = make_tiny_model(arch, torch.float64)
    ctx = bl.bind(model, tokenizer)
    cap = bl.capture(ctx, PROMPT, TARGET)
    weights = {path: model.get_submodule(path.format(1)).weight for path in (*FF1[arch], FF2[arch])}
    before = {m: w.detach().clone() for m, w in weights.items()}
    from blens_fast.imprint import _optimizer_step

    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    _optimizer_step(ctx, ctx.tokenize([PROMPT], [TARGET]), torch.optim.SGD(list(weights.values()), lr=0.7))
    steps = {m: io(arch, w.detach() - before[m]) for m, w in weights.items()}
    for module, paths in (("mlp.in", FF1[arch]), ("mlp.out", [FF2[arch]])):
        torch.testing.assert_close(torch.cat([steps[path] for path in paths], 1),
                                   -0.7 * cap.gradient(1, module).dense(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_report_quantities_equal_the_dense_computation(arch, tokenizer):
    model = make_tiny_model(arch, torch.float64)
    lr = 0.5
    report = imprint_shift(model, tokenizer, PROMPT, TARGET, steps=1, lr=lr, layers=[0, 1], baseline_tokens=300)
    cap = bl.capture(model, tokenizer, PROMPT, TARGET)
    ff1 = "mlp.in"
    target = tokenizer(TARGET)["input_ids"][0]
    unembedding = model.get_output_embeddings().weight.double()
    for li, layer in enumerate([0, 1]):
        d1, d2 = dense_sgd_update(model, tokenizer, arch, layer, lr)
        x = cap.x[(layer, ff1)][0].double()
        projector = x.T @ torch.linalg.pinv(x @ x.T) @ x  # onto span{x_i}, built densely
        assert report.imprint[(layer, ff1)][0].item() == pytest.approx(
            ((projector @ d1).norm() ** 2 / d1.norm() ** 2).item(), rel=1e-8)
        assert report.imprint[(layer, ff1)][0].item() == pytest.approx(1.0, abs=1e-9)  # SGD: exactly in the span
        expected_match = (x @ d1).norm(dim=-1) / (x.norm(dim=-1) * torch.linalg.svdvals(d1)[0])
        torch.testing.assert_close(report.key_match[(layer, ff1)][0].double(), expected_match, rtol=1e-5, atol=1e-7)
        shift = cap.x[(layer, "mlp.out")][0][-1].double() @ d2
        cos = torch.nn.functional.cosine_similarity(shift, unembedding[target], dim=0)
        assert report.shift_cosine[0, li].item() == pytest.approx(cos.item(), rel=1e-4, abs=1e-6)
    assert report.target_prob[0].item() == pytest.approx(torch.exp(-autograd_loss(model, tokenizer, PROMPT,
                                                                                  TARGET)).item(), rel=1e-9)


def test_sgd_imprints_exactly_and_adam_does_not(tokenizer):
    model = make_tiny_model("gpt2")
    sgd = imprint_shift(model, tokenizer, PROMPT, TARGET, steps=2, optimizer="sgd", baseline_tokens=200)
    adam = imprint_shift(model, tokenizer, PROMPT, TARGET, steps=2, optimizer="adam", baseline_tokens=200)
    for key in sgd.imprint:
        assert torch.allclose(sgd.imprint[key], torch.ones(2), atol=1e-5)
        assert adam.imprint[key].max() < 0.95  # Adam's elementwise scaling leaves span{x_i}
    assert sgd.target_prob[-1] > sgd.target_prob[0]


def test_the_model_comes_back_bit_for_bit_and_tables(tokenizer, tmp_path, monkeypatch):
    import sys

    from tests.pipeline.test_lens import rendered_figures

    model = make_tiny_model("llama")
    frozen = model.model.layers[0].mlp.up_proj.weight
    frozen.requires_grad_(False)
    sentinel = torch.ones_like(model.lm_head.weight)
    model.lm_head.weight.grad = sentinel
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    report = imprint_shift(model, tokenizer, PROMPT, TARGET, steps=2, optimizer="adam", lr=1e-2, baseline_tokens=100)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.lm_head.weight.grad is sentinel
    assert set(report.imprint) == {(0, "mlp.in"), (1, "mlp.in")} and report.steps == 2 and len(report.lens) == 3
    frame = report.to_pandas()
    assert set(frame.quantity) == {"target_prob", "imprint", "key_match", "shift_cosine", "shift_baseline_mean",
                                   "shift_baseline_std", "shift_target_rank"}
    assert len(report.lens_ranks()) == 3 * 3 * 2 * report.lens[0].num_positions
    assert list(report.first_entry().columns) == ["layer", "list", "k", "first_step", "rank"]
    rendered = rendered_figures(monkeypatch, sys.modules["blens_fast.imprint"])
    written = report.save(tmp_path)
    assert written["png"].read_bytes()[:4] == b"\x89PNG" and "Imprint and shift" in written["html"].read_text()
    assert len(rendered) == 1  # the page embeds the PNG written beside it, rendered once
    assert "<img" in report._repr_html_()


def test_factor_helpers_on_known_matrices():
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    inside = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    assert imprint_fraction(x, inside) == pytest.approx(1.0)
    outside = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    assert imprint_fraction(x, outside) == pytest.approx(0.0)
    assert imprint_fraction(x, inside + outside) == pytest.approx(30 / 32)
    torch.testing.assert_close(key_match(torch.tensor([[0.0, 0.0, 2.0]]), outside), torch.ones(1))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(optimizer="lbfgs"), ValueError, "optimizer='lbfgs'"),
    (dict(steps=0), ValueError, "steps=0"),
    (dict(lr=-1.0), ValueError, "lr=-1.0"),
    (dict(layers=[9]), ValueError, "layer 9 is out of range"),
])
def test_bad_input(tokenizer, kwargs, error, match):
    with pytest.raises(error, match=match):
        imprint_shift(make_tiny_model("gpt2"), tokenizer, PROMPT, TARGET, **kwargs)


def test_model_wide_rows_are_missing_values_and_the_plot_reads_cleanly(tokenizer):
    """Issue 24: the target's probability has no layer, module or position (missing, not -1 or ''), and neither do
    a layer's quantities a position; in the plot, step and layer axes carry integer ticks only, and lines of equal
    values (SGD imprints exactly 1 at every layer) are drawn side by side instead of on top of each other."""
    import numpy as np
    import pandas as pd

    report = imprint_shift(make_tiny_model("gpt2"), tokenizer, PROMPT, TARGET, steps=3, baseline_tokens=50, k=3)
    frame = report.to_pandas()
    prob = frame[frame.quantity == "target_prob"]
    assert len(prob) == 4 and prob.layer.isna().all() and prob.module.isna().all() and prob.position.isna().all()
    per_layer = frame[frame.quantity.isin(["imprint", "shift_cosine"])]
    assert per_layer.position.isna().all() and per_layer.layer.notna().all()
    assert not (frame.layer == -1).any() and not (frame.position == -1).any() and not (frame.module == "").any()
    assert frame[frame.quantity == "key_match"].position.notna().all()
    entry = report.first_entry(k=1, list_name="ff1_top")
    assert entry.first_step.isna().eq(entry["rank"].isna()).all() and not (entry.first_step == -1).any()
    fig = report._figure()
    try:
        step_axes, heatmap = fig.axes[:3], fig.axes[3]
        for ax in [*step_axes, heatmap]:
            assert all(float(t).is_integer() for t in ax.get_xticks()), ax.get_title()
        assert all(float(t).is_integer() for t in heatmap.get_yticks())
        for ax in step_axes[1:]:
            lines = [line.get_xydata() for line in ax.get_lines() if len(line.get_xdata()) == report.steps]
            assert len(lines) == 2  # two layers (imprint: one FF1 module each)
            for a in range(len(lines)):
                for b in range(a):
                    assert not np.array_equal(lines[a], lines[b])
        imprint = [line.get_ydata() for line in step_axes[1].get_lines()]
        assert np.allclose(imprint, 1.0, atol=1e-5)  # the values the dodge keeps apart are equal indeed
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    assert isinstance(frame.layer.dtype, pd.Int64Dtype)
