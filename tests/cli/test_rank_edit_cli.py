"""`blens rank` and `blens edit`: the two calls the README shows first, thin over bl.rank and bl.edit, with the shared
options (records, layers, edit settings)."""
import json
import re

import pandas as pd
import pytest
import torch

import blens_fast
from blens_fast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "The mother tongue of Danielle Darrieux is"


def test_rank_writes_the_table_of_the_selected_records(tiny_checkpoint, tmp_path, capsys):
    records = [{"id": f"r{i}", "question": r["prompt"], "target": r["target"]}
               for i, r in enumerate(blens_fast.counterfact.load(n=5))]
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["rank", "--model", str(tiny_checkpoint), "--records", str(data), "--prompt-field", "question",
                 "--start", "1", "--n", "3", "--layers", "1", "--modules", "mlp.out", "--batch-size", "2",
                 "--quiet", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "gradient ranks of 3 records" in printed and re.search(r"\n\s+1\s+mlp.out\s+3\s", printed), printed
    table = pd.read_csv(tmp_path / "out" / "rank.csv")
    assert list(table.id) == ["r1", "r2", "r3"] and set(table.layer) == {1} and set(table.module) == {"mlp.out"}
    direct = blens_fast.rank(blens_fast.load_model(tiny_checkpoint), [r["question"] for r in records[1:4]],
                             [r["target"] for r in records[1:4]], layers=[1], modules=("mlp.out",), progress=False)
    assert list(table["rank"]) == list(direct["rank"]) and list(table.tokens) == list(direct.tokens)
    summary = pd.read_csv(tmp_path / "out" / "rank_summary.csv")
    assert summary.loc[0, "rank"] == pytest.approx(direct["rank"].mean())


def test_rank_names_a_bad_record(tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "facts.jsonl"
    data.write_text('{"prompt": "a", "target": "b"}\n{"prompt": "c"}\n')
    assert main(["rank", "--model", str(tiny_checkpoint), "--records", str(data), "--quiet"]) == 2
    assert "facts.jsonl:2: missing field 'target'" in capsys.readouterr().err


def test_edit_shows_before_and_after_and_saves_an_edit_that_applies(tiny_checkpoint, tmp_path, capsys):
    assert main(["edit", "--model", str(tiny_checkpoint), "--prompt", PROMPT, "--target", " English", "--layer", "1",
                 "--scale", "3", "--normalize-key", "--quiet", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "edit: forward_shift_normalized at layer 1, scale 3" in printed, printed
    before, after = (float(re.search(rf"{when}: .*the target: p ([\d.e+-]+)", printed)[1]) for when in ("before",
                                                                                                        "after"))
    assert after > before
    ctx = blens_fast.load_model(tiny_checkpoint)
    untouched = ctx.weight(1, "mlp.out").detach().clone()
    saved = blens_fast.Edit.load(tmp_path / "edit.safetensors").apply(ctx)
    applied = ctx.weight(1, "mlp.out").detach().clone()
    saved.revert()
    assert torch.equal(ctx.weight(1, "mlp.out"), untouched) and not torch.equal(applied, untouched)
    with blens_fast.edit(ctx, PROMPT, " English", layer=1, scale=3.0, normalize_key=True, progress=False):
        assert torch.equal(ctx.weight(1, "mlp.out"), applied)


def test_edit_says_when_it_changes_nothing(tiny_checkpoint, capsys):
    ctx = blens_fast.load_model(tiny_checkpoint)
    top = ctx.vocabulary[int(ctx.lens.logits(
        blens_fast.forward.forward_hidden(ctx, *ctx.pad([ctx.tokenize([PROMPT], ["x"])[0].prompt_ids])).hidden[0, -1]
    ).argmax())]
    assert main(["edit", "--model", str(tiny_checkpoint), "--prompt", PROMPT, "--target", top, "--layer", "1",
                 "--scale", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "edit skipped (the edit changes nothing)" in printed and "the model already predicts it" in printed


def test_edit_and_rank_reject_bad_input_in_one_line(tiny_checkpoint, capsys):
    for argv, message in ((["edit", "--prompt", "", "--target", "x"], "--prompt[0] is empty"),
                          (["edit", "--prompt", "a", "--target", "b", "--scale", "big"], "--scale 'big'"),
                          (["edit", "--prompt", "a", "--target", "b", "--method", "rome"], "invalid choice"),
                          (["rank", "--layers", "0.5"], "--layers='0.5'"),
                          (["rank", "--n", "0"], "--n=0 is out of range")):
        try:
            code = main([*argv, "--model", str(tiny_checkpoint), "--quiet"])
        except SystemExit as parse_error:  # argparse's own errors
            code = parse_error.code
        assert code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
