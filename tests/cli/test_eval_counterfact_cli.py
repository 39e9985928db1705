"""`blens eval-counterfact`: the table, calibration files, and bad input as one line and exit code 2."""
import json

import pytest

from blens_fast import bind, cli
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
