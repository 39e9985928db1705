"""`blens training-lens-report DIR`: redraws a training lens's timelines from its Parquet tables."""
import pytest
import torch

import blens_fast as bl
from blens_fast.cli import main

from ..helpers import make_tiny_model


@pytest.fixture(scope="module")
def lens_folder(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("tlens")
    model = make_tiny_model("gpt2").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = tokenizer(["The Eiffel Tower is in Paris"], return_tensors="pt")
    with bl.training_lens(model, tokenizer, every=1, k=3, rank=2, out=out,
                          track=[("The Eiffel Tower is in", " Paris")]):
        for _ in range(2):
            model(**batch, labels=batch["input_ids"]).loss.backward()
            opt.step()
            opt.zero_grad()
    for path in out.glob("timeline_*"):
        path.unlink()
    return out


def test_report_redraws_the_timelines(lens_folder, tmp_path, capsys):
    assert main(["training-lens-report", str(lens_folder)]) == 0
    assert {p.name for p in lens_folder.glob("timeline_*")} == {
        "timeline_mlp.in.png", "timeline_mlp.in.html", "timeline_mlp.out.png", "timeline_mlp.out.html"}
    printed = capsys.readouterr().out
    assert "mlp.out" in printed and "gradient" in printed
    assert main(["training-lens-report", str(lens_folder), "--out", str(tmp_path / "elsewhere")]) == 0
    html = (tmp_path / "elsewhere" / "timeline_mlp.out.html").read_text()
    assert "data:image/png;base64," in html and "ff2_bottom" in html


def test_report_of_a_folder_without_a_lens_exits_2(tmp_path, capsys):
    assert main(["training-lens-report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("blens training-lens-report: error:") and "no run.json" in err
