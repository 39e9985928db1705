"""Hostile output folders: symbolic links (and a hard link, a FIFO) planted where a subcommand writes, reads or
deletes. Every subcommand that writes refuses, naming the entry, and a canary outside the folder stays as it was."""
import json
import os
import shutil
import signal

import pytest
import torch

from blens_fast import cli, edit, project_dataset, read_results
from blens_fast.context import load_model
from blens_fast.editing import whitening

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, TARGET = "The capital of France is", " Paris"
RECORDS = [{"id": "a", "prompt": PROMPT, "target": "Paris"}, {"id": "b", "prompt": "A cat is an", "target": "animal"}]
RUN = dict(k=2, layers=[1], batch_size=2, shard_size=1, progress=False, log=lambda message: None)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_model(str(tiny_checkpoint))


def link(path, target):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path


def records_file(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def fails(argv, capsys, *needles):
    """The subcommand exits 2 with one line naming ``needles``."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


# -- project-dataset ---------------------------------------------------------------------------------------------
def test_a_lock_linked_to_a_victim_is_refused(tiny_checkpoint, tmp_path, canary, capsys):
    """The reported attack: ``ln -s ~/victim.txt out/.lock-r0`` into an otherwise empty folder."""
    out = tmp_path / "out"
    link(out / ".lock-r0", canary.path())
    fails(["project-dataset", "--model", str(tiny_checkpoint), "--records", str(records_file(tmp_path)), "--out",
           str(out), "--k", "2", "--quiet"], capsys, "symbolic link", ".lock-r0")
    canary.check()


def test_a_lock_hard_linked_to_a_victim_is_refused(tiny, tmp_path, canary):
    out = tmp_path / "out"
    out.mkdir()
    os.link(canary.path(), out / ".lock-r0")
    with pytest.raises(ValueError, match=r"\.lock-r0' has 1 other hard link"):
        project_dataset(tiny, RECORDS, out, **RUN)
    canary.check()


@pytest.mark.parametrize("entry", ["segments", "rows", "records", "run.json", "manifest.json"])
def test_a_finished_run_with_a_linked_entry_is_neither_resumed_nor_read(tiny, tmp_path, canary, entry):
    """A ``segments/`` link would make a resume delete files elsewhere, a ``rows/`` link write rows there."""
    out = project_dataset(tiny, RECORDS, tmp_path / "out", **RUN)
    (out / "manifest.json").unlink()  # a resume would now rewrite and delete files
    moved = canary.root / entry
    shutil.move(out / entry, moved) if (out / entry).exists() else moved.write_text("{}")
    link(out / entry, moved)
    canary.refresh()
    with pytest.raises(ValueError, match=f"symbolic links .*'{entry}' ->"):
        project_dataset(tiny, RECORDS, out, **RUN)
    with pytest.raises(ValueError, match=f"symbolic links .*'{entry}' ->"):
        read_results(out, partial=True)
    canary.check()


def test_a_linked_shard_file_is_refused(tiny, tmp_path, canary):
    out = project_dataset(tiny, RECORDS, tmp_path / "out", **RUN)
    shard = out / "rows" / "part-000000.parquet"
    shutil.move(shard, canary.root / shard.name)
    link(shard, canary.root / shard.name)
    canary.refresh()
    with pytest.raises(ValueError, match="'rows/part-000000.parquet' ->"):
        project_dataset(tiny, RECORDS, out, **RUN)
    canary.check()


def test_a_fifo_in_place_of_the_run_file_is_refused_not_waited_on(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "run.json")

    def waited(*_):
        raise TimeoutError("opening the FIFO blocked")

    previous = signal.signal(signal.SIGALRM, waited)
    signal.alarm(60)
    try:
        with pytest.raises(ValueError, match="run.json' is not a regular file"):
            project_dataset(tiny, RECORDS, out, **RUN)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_an_output_folder_that_is_a_file_is_one_error(tiny, tmp_path):
    """Issue 23, defect 6: ``project_dataset(ctx, records, existing_file)`` gave pathlib's FileExistsError."""
    existing = tmp_path / "results.txt"
    existing.write_text("mine")
    with pytest.raises(ValueError, match="output folder .*results.txt' is a file"):
        project_dataset(tiny, RECORDS, existing, **RUN)
    assert existing.read_text() == "mine"


# -- the other subcommands ------------------------------------------------------------------------------------------
def test_lens_out_does_not_write_through_a_link(tiny_checkpoint, tmp_path, canary, capsys):
    out = tmp_path / "out"
    link(out / "lens.png", canary.path())
    fails(["lens", "--model", str(tiny_checkpoint), "--prompt", PROMPT, "--target", TARGET, "--k", "2", "--out",
           str(out)], capsys, "lens.png", "symbolic link")
    canary.check()


def test_imprint_shift_out_does_not_write_through_a_link(tiny_checkpoint, tmp_path, canary, capsys):
    out = tmp_path / "out"
    link(out / "imprint_shift.csv", canary.path())
    fails(["imprint-shift", "--model", str(tiny_checkpoint), "--prompt", PROMPT, "--target", TARGET, "--steps", "1",
           "--k", "2", "--out", str(out)], capsys, "imprint_shift.csv", "symbolic link")
    canary.check()


def test_rank_out_does_not_write_through_a_link(tiny_checkpoint, tmp_path, canary, capsys):
    out = tmp_path / "out"
    link(out / "rank.csv", canary.path())
    fails(["rank", "--model", str(tiny_checkpoint), "--records", str(records_file(tmp_path)), "--layers", "1",
           "--quiet", "--out", str(out)], capsys, "rank.csv", "symbolic link")
    canary.check()


def test_eval_counterfact_out_does_not_read_or_write_through_a_link(tiny_checkpoint, tmp_path, canary, capsys):
    """Its results merge with an earlier counterfact_eval.json in the folder: reading a link would read elsewhere."""
    out = tmp_path / "out"
    (canary.root / "rows.json").write_text(json.dumps({"meta": {}, "rows": []}))
    canary.refresh()
    link(out / "counterfact_eval.json", canary.root / "rows.json")
    fails(["eval-counterfact", "--model", str(tiny_checkpoint), "--n", "1", "--layer", "1", "--scale", "0.5",
           "--no-fluency", "--quiet", "--out", str(out)], capsys, "counterfact_eval.json", "symbolic link")
    canary.check()


def test_bench_out_does_not_write_through_a_link(tmp_path, canary, capsys):
    out = tmp_path / "out"
    link(out / "bench_cpu_tiny.json", canary.path())
    fails(["bench", "--model", "tiny", "--prompts", "1", "--naive-prompts", "1", "--memory-prompts", "1", "--k", "2",
           "--quiet", "--out", str(out)], capsys, "bench_cpu_tiny.json", "symbolic link")
    canary.check()


def test_an_edit_is_not_saved_through_a_link(tiny, tmp_path, canary):
    target = link(tmp_path / "edit.safetensors", canary.path())
    with edit(tiny, PROMPT, TARGET, layer=1, scale=1.0, skip_if_argmax=False) as made:
        with pytest.raises(ValueError, match="edit.safetensors' is a symbolic link"):
            made.save(target)
    canary.check()


# -- the whitening cache ------------------------------------------------------------------------------------------
TEXTS = ["Paris is the capital of France", "The cat sat on the mat"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BLENS_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(whitening, "_CACHE", {})
    return tmp_path / "cache" / "ff2_whitening"


def test_a_linked_whitening_cache_folder_is_not_used(tiny, cache, canary):
    link(cache, canary.root)
    with pytest.warns(UserWarning, match="ff2_whitening' is a symbolic link"):
        found = whitening.ff2_whitening(tiny, 1, TEXTS, progress=False)
    assert found.inverse.shape[0] == found.inverse.shape[1]
    canary.check()


def test_a_linked_or_poisoned_whitening_cache_entry_is_recomputed(tiny, cache, canary):
    """Issue 23, defect 6: a poisoned entry raised safetensors' own error; now it is recomputed, with a warning."""
    first = whitening.ff2_whitening(tiny, 1, TEXTS, progress=False)
    entry = cache / f"{first.key}.safetensors"
    for plant in ("link", "garbage", "nan"):
        whitening._CACHE.clear()
        entry.unlink()
        if plant == "link":
            link(entry, canary.path())
        elif plant == "garbage":
            entry.write_bytes(b"\x00" * 64)
        else:
            from safetensors.torch import save_file

            save_file({"inverse": torch.full(first.inverse.shape, float("nan")), "num_tokens": torch.tensor(5)},
                      str(entry))
        with pytest.warns(UserWarning, match="whitening cache entry .* is damaged"):
            again = whitening.ff2_whitening(tiny, 1, TEXTS, progress=False)
        assert torch.equal(again.inverse, first.inverse) and not entry.is_symlink()
    canary.check()
