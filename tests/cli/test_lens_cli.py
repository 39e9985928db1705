"""`blens lens` and what every subcommand shares: the parent parser, bad input as one line and exit code 2."""
import re
import subprocess
import sys

import pytest

from blens_fast import __version__
from blens_fast.cli import COMMANDS, build_parser, main

PROMPT = "The mother tongue of Danielle Darrieux is"


def test_command_writes_files(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "lens"
    code = main(["lens", "--prompt", PROMPT, "--target", "French", "--model", str(tiny_checkpoint), "--k", "4",
                 "--layers", "0-1", "--out", str(out), "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "layer 0" in printed and "layer 1" in printed and "ff1_top" in printed
    assert {p.name for p in out.iterdir()} >= {"lens.png", "lens.html", "lens_tokens.csv"}


@pytest.mark.parametrize("extra,match", [
    (["--prompt", "", "--target", "x"], "--prompt\\[0\\] is empty"),
    (["--prompt", "a", "--target", ""], "--target\\[0\\] is empty"),
    (["--prompt", "a", "--target", "b", "--k", "0"], "--k=0 is out of range"),
    (["--prompt", "a", "--target", "b", "--layers", "9"], "layer 9 is out of range"),
    (["--prompt", "a", "--target", "b", "--layers", "x"], "--layers='x'"),
    (["--prompt", "a", "--target", "b", "--device", "cuda:7" if False else "tpu"], "--device='tpu' is not a device"),
    (["--prompt", "a", "--target", "b", "--dtype", "int8"], "--dtype='int8'"),
    (["--prompt", "a", "--target", "b", "--threads", "0"], "--threads 0"),
])
def test_command_bad_input_exits_2(tiny_checkpoint, capsys, extra, match):
    assert main(["lens", "--model", str(tiny_checkpoint), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("blens lens: error:")
    assert re.search(match, err.splitlines()[-1])


def test_cuda_without_a_gpu_is_a_clear_error(tiny_checkpoint, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["lens", "--prompt", "a", "--target", "b", "--model", str(tiny_checkpoint), "--device", "cuda"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err


def test_unwritable_out_fails_before_any_work(tiny_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, blocker / "below"):
        assert main(["lens", "--prompt", "a", "--target", "b", "--model", str(tiny_checkpoint), "--out",
                     str(out)]) == 2
        err = capsys.readouterr().err
        assert "is a file, not a folder" in err and "Traceback" not in err


def test_command_model_errors(tmp_path, capsys):
    assert main(["lens", "--prompt", "a", "--target", "b", "--model", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{")
    assert main(["lens", "--prompt", "a", "--target", "b", "--model", str(tmp_path)]) == 2
    assert "config.json' is damaged (not valid JSON" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert main(["lens", "--prompt", "a", "--target", "b", "--model", str(tmp_path)]) == 2
    assert "only safetensors" in capsys.readouterr().err


def test_broken_weights_file_is_a_clear_error(tiny_checkpoint, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["lens", "--prompt", "a", "--target", "b", "--model", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "is not a readable safetensors file" in err and "Traceback" not in err


def test_version_and_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "blens_fast", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"blens_fast {__version__}"


def test_every_subcommand_shows_the_shared_options():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
    for name, command in sub.choices.items():
        text = command.format_help()
        for option in ("--model", "--device", "--dtype", "--threads", "--out", "--quiet"):
            assert option in text, (name, option)
