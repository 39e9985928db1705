"""The options every subcommand shares mean the same everywhere (issue 24): one rule for --model (an existing folder
wins over a built-in name)."""
import json
import shutil
from pathlib import Path

import pytest

import blens_fast
from blens_fast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def folder_named(tiny_checkpoint, tmp_path, monkeypatch):
    """Copies the tiny 2-layer checkpoint to a folder of the given name in the working directory."""
    monkeypatch.chdir(tmp_path)

    def make(name):
        shutil.copytree(tiny_checkpoint, tmp_path / name)
        return tmp_path / name

    return make


def test_bench_takes_a_folder_over_the_random_model_of_that_name(folder_named, capsys):
    folder_named("tiny")
    assert main(["bench", "--model", "tiny", "--prompts", "1", "--naive-prompts", "1", "--quiet", "--out",
                 "out"]) == 0, capsys.readouterr().err
    (path,) = Path("out").glob("*.json")
    report = json.loads(path.read_text())
    assert report["model"]["random_init"] is False and report["model"]["full_depth"] == 2


def test_every_subcommand_takes_a_folder_over_default(folder_named, capsys):
    folder_named("default")
    assert blens_fast.load_model("default").num_layers == 2
    assert main(["lens", "--model", "default", "--prompt", "The Eiffel Tower is in", "--target", " Paris",
                 "--k", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "layer 1" in printed and "layer 2" not in printed  # the shipped model has 4 layers


def test_a_folder_that_shadows_a_built_in_name_and_is_no_model_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    assert main(["bench", "--model", "tiny", "--prompts", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "wins over the built-in name 'tiny' but holds no config.json" in err and "Traceback" not in err


def test_an_unknown_model_name_lists_the_built_in_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--model", "tinyy", "--prompts", "1", "--quiet"]) == 2
    assert "no such folder (expected a local Hugging Face folder or one of default, gpt2-small" in (
        capsys.readouterr().err)


# -- one record selection for every subcommand that reads records ---------------------------------------------------
READERS = ("project-dataset", "eval-counterfact", "rank")


def option_help(command: str) -> dict[str, str]:
    """``--option -> its help text`` from a subcommand's parser."""
    from blens_fast.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {s: a.help for a in sub._actions for s in a.option_strings}


def test_every_reader_of_records_has_the_same_selection_options():
    helps = {command: option_help(command) for command in READERS}
    for command, found in helps.items():
        assert {"--records", "--start", "--n"} <= set(found), command
        assert "--input" not in found, command
    first, *others = helps.values()
    for other in others:
        assert other["--start"] == first["--start"]
        assert other["--records"].endswith(first["--records"].split(", or ", 1)[1])


def test_start_and_n_select_the_same_records_in_every_reader(tiny_checkpoint, tmp_path, capsys):
    records = blens_fast.counterfact.load(n=6)
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["project-dataset", "--records", str(data), "--start", "2", "--n", "3", "--model",
                 str(tiny_checkpoint), "--k", "1", "--layers", "0", "--quiet", "--out", str(tmp_path / "pd")]) == 0
    ids = list(blens_fast.read_results(tmp_path / "pd", "records").id)
    assert ids == [str(r["id"]) for r in records[2:5]]
    assert main(["eval-counterfact", "--records", str(data), "--start", "2", "--n", "3", "--model",
                 str(tiny_checkpoint), "--layer", "1", "--scale", "0.5", "--no-fluency", "--no-baseline", "--quiet",
                 "--out", str(tmp_path / "ec")]) == 0
    saved = json.loads((tmp_path / "ec" / "counterfact_eval.json").read_text())
    assert saved["meta"]["first_record"] == 2 and saved["meta"]["n"] == 3 and saved["rows"][0]["n"] == 3


@pytest.mark.parametrize("command", READERS)
@pytest.mark.parametrize("extra,message", [
    (["--start", "5", "--n", "3"], "holds 6 records (0..5): --start=5, --n=3 asks for records 5..7"),
    (["--start", "-1"], "--start=-1: expected 0 or more"),
    (["--n", "0"], "--n=0 is out of range: expected at least 1"),
])
def test_a_selection_past_the_end_names_the_records_held(command, extra, message, tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in blens_fast.counterfact.load(n=6)))
    assert main([command, "--records", str(data), *extra, "--model", str(tiny_checkpoint), "--layer" if
                 command == "eval-counterfact" else "--layers", "1", "--quiet", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_checking_a_selection_reads_the_input_only_as_far_as_it_reaches(tmp_path, monkeypatch):
    """``--start 1 --n 2`` of a large input is checked before the model loads by reading its first 3 records, not
    every record (each parsed) of the file."""
    import argparse

    from blens_fast.bulk import records as bulk_records
    from blens_fast.commands._common import selected_source

    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "target": "t"}) + "\n" for i in range(100)))
    read = []
    original = bulk_records._read_file
    monkeypatch.setattr(bulk_records, "_read_file", lambda path: (read.append(r) or r for r in original(path)))
    args = argparse.Namespace(records=str(data), start=1, n=2, prompt_field="prompt", target_field="target",
                              id_field="id")
    source, _ = selected_source(args)
    assert len(read) == 3
    assert [r.prompt for r in source.records()] == ["p1", "p2"]
    with pytest.raises(ValueError, match="holds 100 records"):
        selected_source(argparse.Namespace(**{**vars(args), "start": 99}))
