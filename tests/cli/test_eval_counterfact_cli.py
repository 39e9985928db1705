"""`blens eval-counterfact`: the table, calibration files, and bad input as one line and exit code 2."""
import json
import re

import pytest

from blens_fast import cli
from tests.pipeline.test_edit import tiny


@pytest.fixture()
def model_dir(tokenizer, tmp_path):
    model = tiny("gpt2")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_command_writes_the_table_and_rejects_bad_input(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["eval-counterfact", "--model", str(model_dir), "--n", "2", "--layer", "1",
                     "--scale", "0.5", "--out", str(out), "--quiet", "--no-fluency", "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"unedited: argmax efficacy [\d.]+%, paraphrase [\d.]+%, neighborhood [\d.]+%; "
                        r"P\(new\) > P\(true\) efficacy [\d.]+%, paraphrase [\d.]+%, neighborhood [\d.]+% \(\d+ s\)",
                        printed[0]), printed[0]
    assert re.fullmatch(r"forward shift \(paper: key a_n\): argmax efficacy .*; skipped \d of 2 edits.*; "
                        r"revert failures 0 \(\d+ s\)", printed[1]), printed[1]
    saved = json.loads((out / "counterfact_eval.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["none", "forward_shift"]
    assert all(r["revert_failures"] == 0 for r in saved["rows"])
    assert "MEMIT-style" in (out / "counterfact_eval.md").read_text()
    for argv, message in [(["--n", "0"], "--n"), (["--model", str(tmp_path / "nowhere")], "no such folder"),
                          (["--method", "rome"], "--method"), (["--scale", "-1"], "scale")]:
        args = ["eval-counterfact", "--model", str(model_dir), "--layer", "1", "--n", "1", "--quiet",
                "--out", str(out)]
        assert cli.main(args + argv) == 2
        assert message in capsys.readouterr().err


def test_the_summary_counts_skipped_edits(tokenizer, tmp_path, capsys):
    """A random Llama's uncalibrated default edit changes nothing (the target is out of reach of the last layer's
    shift); the terminal says so, and the Python call warns once per edit, naming the fact and why."""
    import warnings

    import blens_fast
    from blens_fast.editing import EditSkipped
    from tests.helpers import make_tiny_model

    folder = tmp_path / "llama"
    make_tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ctx = blens_fast.load_model(folder)
    prompt = "The mother tongue of Danielle Darrieux is"
    with pytest.warns(EditSkipped, match=rf"the edit changes nothing.*{prompt!r} -> ' English': no shift at layer 1 "
                                         r"up to 10 x the residual's norm makes it the model's top prediction"):
        applied = blens_fast.edit(ctx, prompt, " English")
    assert applied.info["skipped"] == [True] and applied.updates == ()
    with warnings.catch_warnings():
        warnings.simplefilter("error", EditSkipped)  # the harness counts skips instead of warning per record
        assert cli.main(["eval-counterfact", "--model", str(folder), "--n", "2", "--out", str(tmp_path / "out"),
                         "--quiet", "--no-fluency", "--threads", "1", "--no-baseline"]) == 0
    (line,) = capsys.readouterr().out.splitlines()[:1]
    assert re.search(r"; skipped 2 of 2 edits \(left the model unchanged\); revert failures 0", line), line
