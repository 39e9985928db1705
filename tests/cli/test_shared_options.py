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
