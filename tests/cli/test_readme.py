"""The README runs: every ```python block in order in one namespace against the shipped model, then every `blens`
line of its ```bash blocks at small sizes (in a temporary working folder)."""
import json
import re
import shlex
from pathlib import Path

import pytest

from blens_fast.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"
#: size options of the README's commands -> the small values the test runs them at
SMALL = {"--steps": "2", "--n": "3", "--prompts": "2", "--naive-prompts": "1", "--depth": "1", "--tokens": "8"}


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.M | re.S)


def commands() -> list[list[str]]:
    """The `blens` lines of the bash blocks, comments and `[optional]` brackets dropped."""
    found = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("blens "):
                found.append(shlex.split(line.replace("[", "").replace("]", ""))[1:])
    return found


def small(argv: list[str], replacements: dict[str, str]) -> list[str]:
    """``argv`` with the values of size options made small and placeholder words replaced."""
    return [SMALL.get(previous, replacements.get(word, word)) for previous, word in zip(["", *argv], argv)]


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
    cli_lines = commands()
    assert {argv[0] for argv in cli_lines} >= {"lens", "imprint-shift", "project-dataset"}
    records = Path("facts.jsonl")
    records.write_text("".join(json.dumps(r) + "\n" for r in namespace["bl"].counterfact.load(n=4)))
    replacements = {"path/to/folder": namespace["folder"], "counterfact": str(records)}
    for argv in cli_lines:
        argv = small(argv, replacements) + ["--threads", "1", "--quiet"]
        assert main(argv) == 0, (argv, capsys.readouterr().err)
