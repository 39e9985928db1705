"""Hostile training lens folders: a symbolic link planted in ``out=`` (where the lens writes its tables) or in the
folder ``blens training-lens-report`` reads and draws into is refused, naming it, and nothing outside changes."""
import pytest
import torch

import blens_fast as bl
from blens_fast import cli

from ..helpers import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def train_two_steps(tokenizer, out):
    model = make_tiny_model("gpt2").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = tokenizer(["The Eiffel Tower is in Paris"], return_tensors="pt")
    with bl.training_lens(model, tokenizer, every=1, k=3, rank=2, out=out, flush_every=1):
        for _ in range(2):
            model(**batch, labels=batch["input_ids"]).loss.backward()
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("planted", ["rows", "run.json", "timeline_mlp.out.png"])
def test_a_link_in_the_lens_folder_is_refused_before_training(tokenizer, tmp_path, canary, planted):
    out = tmp_path / "tlens"
    out.mkdir()
    (out / planted).symlink_to(canary.root if planted == "rows" else canary.path())
    with pytest.raises(ValueError, match=f"symbolic links.*{planted}"):
        train_two_steps(tokenizer, out)
    canary.check()


def test_the_report_refuses_a_folder_with_a_planted_link(tokenizer, tmp_path, canary, capsys):
    out = tmp_path / "tlens"
    train_two_steps(tokenizer, out)
    (out / "timeline_mlp.out.png").unlink()
    (out / "timeline_mlp.out.png").symlink_to(canary.path())
    assert cli.main(["training-lens-report", str(out)]) == 2
    err = capsys.readouterr().err
    assert "symbolic links" in err and "timeline_mlp.out.png" in err and "Traceback" not in err, err
    canary.check()
