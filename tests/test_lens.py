"""The Backward Lens report and the `blens lens` command on tiny random models."""
import re

import pytest
import torch

import blens_fast
from blens_fast.adapters import get_adapter
from blens_fast.cli import main
from blens_fast.lens import LISTS, lens
from conftest import make_tiny_model

PROMPT, TARGET = "The mother tongue of Danielle Darrieux is", " French"


def full_logits(model, vectors):
    view = get_adapter(model).lens(model)
    logits = view.normalize(vectors.double()).double() @ view.weight.double().T
    return logits + view.bias.double() if view.bias is not None else logits


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gptj"])
def test_report_matches_full_logits(arch, tokenizer):
    model = make_tiny_model(arch)
    k = 7
    report = lens(model, tokenizer, PROMPT, TARGET, k=k, impl="torch")
    cap = blens_fast.capture(model, tokenizer, PROMPT, TARGET)
    in_module = "mlp.up" if arch == "llama" else "mlp.in"
    target_id = tokenizer(TARGET).input_ids[0]
    assert report.target_token_id == target_id and report.target_token == TARGET
    for name, (part, factor, largest) in LISTS.items():
        module = in_module if part == "in" else "mlp.out"
        for li, layer in enumerate(report.layers):
            vectors = (cap.x if factor == "x" else cap.delta)[(layer, module)][0]
            logits = full_logits(model, vectors)
            # a stable sort keeps the lower token id first among ties (rows of zero VJP tie everywhere)
            expected_values, expected_indices = logits.sort(dim=-1, descending=largest, stable=True)
            expected_values, expected_indices = expected_values[:, :k], expected_indices[:, :k]
            assert report.indices[name].shape == (len(report.layers), report.num_positions, k)
            torch.testing.assert_close(report.indices[name][li], expected_indices)
            torch.testing.assert_close(report.logits[name][li].double(), expected_values, rtol=1e-5, atol=1e-5)
            probs = logits.softmax(-1).gather(1, expected_indices)
            torch.testing.assert_close(report.probs[name][li].double(), probs, rtol=1e-4, atol=1e-7)
            # exact up to float32 rounding: tokens within 1e-4 of the target's logit may fall either way
            margin = (logits - logits[:, target_id : target_id + 1]) * (1 if largest else -1)
            margin[:, target_id] = -1.0
            rank = report.target_rank[name][li]
            assert ((margin > 1e-4).sum(1) + 1 <= rank).all() and (rank <= (margin > -1e-4).sum(1) + 1).all()


def test_tables_plots_and_html(tokenizer, tmp_path):
    model = make_tiny_model("gpt2")
    report = lens(model, tokenizer, PROMPT, TARGET, layers=[0, -1], k=3)
    assert report.layers == (0, 1)
    frame = report.to_pandas()
    assert list(frame.columns) == ["layer", "module", "position", "input_token", "list", "rank", "token_id", "token",
                                   "logit", "prob"]
    assert len(frame) == len(LISTS) * 2 * report.num_positions * 3
    assert set(frame["list"]) == set(LISTS)
    first = frame[(frame["list"] == "ff2_bottom") & (frame.layer == 1) & (frame.position == 0)]
    assert first["logit"].is_monotonic_increasing  # bottom lists ascend
    ranks = report.target_rank_table()
    assert len(ranks) == len(LISTS) * 2 * report.num_positions and ranks.target_rank.min() >= 1
    assert set(report.gradients.columns) == {"layer", "module", "tokens", "rank", "norm"}
    text = report.format()
    assert "layer 1" in text and "ff2_bottom" in text and repr(" French") in text
    written = report.save(tmp_path / "out")
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = written["html"].read_text()
    assert "data:image/png;base64," in page and "Target rank" in page
    for name in ("tokens", "target_ranks", "gradients"):
        assert written[name].stat().st_size > 0


def test_normalized_variant_differs_only_in_scale(tokenizer):
    model = make_tiny_model("llama")  # RMSNorm without bias: unit-normalising changes nothing
    plain = lens(model, tokenizer, PROMPT, TARGET, k=5, impl="torch")
    unit = lens(model, tokenizer, PROMPT, TARGET, k=5, normalized=True, impl="torch")
    torch.testing.assert_close(plain.indices["ff1_top"], unit.indices["ff1_top"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "k=0 is out of range"),
    (dict(k=50258), "k=50258 is out of range"),
    (dict(layers=[5]), "layer 5 is out of range"),
])
def test_lens_bad_input(tokenizer, kwargs, match):
    model = make_tiny_model("gpt2")
    with pytest.raises(ValueError, match=match):
        lens(model, tokenizer, PROMPT, TARGET, **kwargs)


def test_command_writes_files(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "lens"
    code = main(["lens", "--prompt", PROMPT, "--target", "French", "--model", str(tiny_checkpoint), "--k", "4",
                 "--layers", "0-1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "layer 0" in printed and "layer 1" in printed and "ff1_top" in printed
    assert {p.name for p in out.iterdir()} >= {"lens.png", "lens.html", "lens_tokens.csv"}


@pytest.mark.parametrize("extra,match", [
    (["--prompt", "", "--target", "x"], "prompts\\[0\\] is empty"),
    (["--prompt", "a", "--target", ""], "targets\\[0\\] is empty"),
    (["--prompt", "a", "--target", "b", "--k", "0"], "k=0 is out of range"),
    (["--prompt", "a", "--target", "b", "--layers", "9"], "layer 9 is out of range"),
    (["--prompt", "a", "--target", "b", "--layers", "x"], "--layers 'x'"),
])
def test_command_bad_input_exits_2(tiny_checkpoint, capsys, extra, match):
    assert main(["lens", "--model", str(tiny_checkpoint), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("blens lens: error:")
    assert re.search(match, err.splitlines()[-1])


def test_command_model_errors(tmp_path, capsys):
    assert main(["lens", "--prompt", "a", "--target", "b", "--model", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert main(["lens", "--prompt", "a", "--target", "b", "--model", str(tmp_path)]) == 2
    assert "only safetensors" in capsys.readouterr().err
