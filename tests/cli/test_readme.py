"""The README runs: every ```python block in order in one namespace against the shipped model, and every line of its
```bash blocks (and every `blens ...` command quoted in its text) at small sizes, in a temporary working folder.

A shell line runs as written, with its size options made small (:data:`SMALL`) and its placeholders filled in
(:func:`placeholders`): `blens` lines in this process; `make` lines as a dry run (`make test` inside the tests would
run the tests again); `pip install` lines as a dry run without an index (everything is installed here already);
`torchrun` and `python` lines parse here and run for real in the slow test. A line of any other kind, or one with
`...` or `[optional]` parts, fails the test: the README shows commands that run.
"""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from blens_fast.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
#: size options of the README's commands -> the small values the test runs them at
SMALL = {"--steps": "2", "--n": "3", "--prompts": "2", "--naive-prompts": "1", "--depth": "1", "--tokens": "8",
         "--k": "3"}
#: the random models of `blens bench` at real dimensions -> their tiny counterparts
SMALL_MODELS = {"gpt2-small": "tiny", "gpt-j": "tiny-gptj"}
#: options appended to the README's `python` programs, by module or script name, to run them at small sizes
SMALL_PROGRAMS = {
    "train_default_model": ["--epochs", "1", "--max-records", "4", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
              "--batch-size", "4", "--eval-every", "100", "--out", "train_checkpoints", "--model-dir", "trained"],
    "default_model_quality": ["--model-dir", "trained", "--out", "quality"],
}


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.M | re.S)


def shell_lines() -> list[list[str]]:
    """Every line of the bash blocks as argv, comments dropped."""
    lines = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                assert "..." not in line and not re.search(r"\[-", line), f"README shell line is not a command: {line}"
                lines.append(shlex.split(line))
    return lines


def quoted_commands() -> list[list[str]]:
    """The `blens SUBCOMMAND --option ...` commands quoted in the README's text (bare names are references)."""
    text = re.sub(r"^```.*?^```", "", README.read_text(encoding="utf-8"), flags=re.M | re.S)
    spans = re.findall(r"`(blens [^`]+)`", text.replace("\n", " "))
    return [shlex.split(span)[1:] for span in spans if " --" in span]


def small(argv: list[str], replacements: dict[str, str]) -> list[str]:
    """``argv`` with the values of size options made small and placeholders replaced."""
    out = []
    for previous, word in zip(["", *argv], argv):
        if previous in SMALL:
            word = SMALL[previous]
        elif previous == "--model":
            word = SMALL_MODELS.get(word, word)
        out.append(replacements.get(word, word))
    return out


def placeholders(namespace: dict, tmp_path: Path) -> dict[str, str]:
    """What the README's placeholders stand for here: a checkpoint folder, an output folder, a calibration file."""
    return {"path/to/folder": namespace["folder"], "DIR": str(tmp_path / "dir"), "PATH": str(tmp_path / "cal.json"),
            "$OUT": str(tmp_path / "dir")}


def run_blens(argv: list[str], replacements: dict, capsys) -> None:
    argv = small(argv, replacements) + ["--threads", "1", "--quiet"]
    if "--n" not in argv and any(a.option_strings == ["--n"] for a in subcommand(argv[0])._actions):
        argv += ["--n", SMALL["--n"]]  # a reader of records at its default size reads them all
    assert main(argv) == 0, (argv, capsys.readouterr().err)


def subcommand(name: str):
    """The parser of ``blens NAME``."""
    return next(a for a in build_parser()._actions if a.dest == "command").choices[name]


def check_make(argv: list[str]) -> None:
    assert len(argv) == 2, argv
    done = subprocess.run(["make", "-n", "-C", str(ROOT), argv[1]], capture_output=True, text=True)
    assert done.returncode == 0, (argv, done.stderr)


def check_pip(argv: list[str]) -> None:
    assert argv[:2] == ["pip", "install"], argv
    if "-e" in argv:  # an editable install of this folder: it must be a package folder (never built by the tests)
        assert argv[-1] == "." and (ROOT / "setup.py").is_file(), argv
        return
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", *argv[2:]], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, (argv, done.stderr[-2000:])


def program(argv: list[str]) -> tuple[list[str], str]:
    """A `python -m MODULE ...` or `python SCRIPT ...` line as the argv to run here and the program's short name."""
    assert argv[0] == "python", argv
    if argv[1] == "-m":
        return [sys.executable, *argv[1:]], argv[2].rsplit(".", 1)[-1]
    return [sys.executable, str(ROOT / argv[1]), *argv[2:]], Path(argv[1]).stem


def torchrun_cli(argv: list[str]) -> list[str]:
    """The `blens` arguments of a `torchrun ... -m blens_fast.cli -- ARGS` line (torchrun reads options such as
    `--n` after the module as abbreviations of its own unless `--` ends its options)."""
    assert argv[0] == "torchrun" and "-m" in argv, argv
    at = argv.index("-m")
    assert argv[at + 1:at + 3] == ["blens_fast.cli", "--"], argv
    return argv[at + 3:]


def test_readme_python_blocks_and_commands_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    python = blocks("python")
    assert len(python) >= 6
    namespace: dict = {}
    for i, block in enumerate(python):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as error:  # noqa: BLE001 - name the block that broke
            pytest.fail(f"README python block {i + 1} failed: {type(error).__name__}: {error}\n{block}")
    replacements = placeholders(namespace, tmp_path)
    lines = shell_lines()
    kinds = {argv[0] for argv in lines}
    assert kinds <= {"blens", "make", "pip", "python", "torchrun"}, f"README shell lines of unknown kind: {kinds}"
    assert {argv[1] for argv in lines if argv[0] == "blens"} >= {"lens", "rank", "edit", "imprint-shift",
                                                                 "project-dataset"}
    for argv in lines:
        if argv[0] == "blens":
            run_blens(argv[1:], replacements, capsys)
        elif argv[0] == "make":
            check_make(argv)
        elif argv[0] == "pip":
            check_pip(argv)
        elif argv[0] == "torchrun":
            from torch.distributed.run import get_args_parser

            launched = get_args_parser().parse_args(argv[1:])  # torchrun's own reading of the line
            assert launched.module and launched.training_script == "blens_fast.cli", argv
            assert launched.training_script_args == torchrun_cli(argv), argv
            build_parser().parse_args(small(torchrun_cli(argv), replacements))
        else:
            assert program(argv)[1] in SMALL_PROGRAMS, f"no small sizes for the README line {shlex.join(argv)}"
    quoted = quoted_commands()
    assert {argv[0] for argv in quoted} >= {"eval-counterfact", "bench"}
    for argv in quoted:
        if argv[0].startswith("-"):  # blens --version
            with pytest.raises(SystemExit) as done:
                main(argv)
            assert done.value.code == 0
        else:
            run_blens(argv, replacements, capsys)


@pytest.mark.slow
def test_readme_programs_run_at_small_sizes(tmp_path, tiny_checkpoint):
    """The `torchrun` and `python` lines of the README, run for real (at small sizes, in a temporary folder)."""
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    replacements = {"path/to/folder": str(tiny_checkpoint), "DIR": str(tmp_path / "dir")}
    ran = []
    for argv in shell_lines():
        if argv[0] == "torchrun":
            at = argv.index("-m")
            command = [sys.executable, "-m", "torch.distributed.run", "--master_port",
                       str(29500 + os.getpid() % 1000), *small(argv[1:at], {}), "-m", "blens_fast.cli", "--",
                       *small(torchrun_cli(argv), replacements), "--threads", "1", "--quiet"]
        elif argv[0] == "python":
            command, name = program(argv)
            command += SMALL_PROGRAMS[name]
        else:
            continue
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, (shlex.join(argv), done.stderr[-3000:])
        ran.append(argv[0])
    assert set(ran) == {"torchrun", "python"}
    assert json.loads((tmp_path / "quality" / "default_model_quality.json").read_text())["results"]



def test_the_layout_names_every_module_and_folder_of_the_package():
    """The README's "Layout" section is the map of the code: every module and folder of blens_fast, and every file of
    its subpackages but the subcommands (named by their commands), is on it."""
    section = README.read_text(encoding="utf-8").split("\n## Layout\n", 1)[1]
    named = set(re.findall(r"[\w.]+/?", re.search(r"^```\n(.*?)^```", section, flags=re.M | re.S)[1]))
    package = ROOT / "blens_fast"
    expected = {p.name for p in package.glob("*.py")}
    for folder in (p for p in package.iterdir() if p.is_dir() and p.name[0] not in "_."):
        expected.add(folder.name + "/")
        if folder.name != "commands":
            expected |= {p.name for p in folder.glob("*.py")} - {"__init__.py"}
    missing = sorted(name for name in expected if name not in named and name.removesuffix("/") + "/" not in named)
    assert not missing, f"the README's Layout does not name {missing}"
