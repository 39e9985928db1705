"""Links planted in the package's own folders: the JIT build of the C++ extension under the cache folder and the
measured tuning tables. Neither writes, reads or builds through a link, and a canary outside stays as it was."""
import json

import pytest
import torch
from torch.utils import cpp_extension

from blens_fast.ops import _extension, tuning

DEVICE = "NVIDIA H200"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BLENS_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def compiler(monkeypatch):
    """A stand-in for torch's JIT build: it writes its build file into the build folder, as ninja does."""
    calls = []

    def load(*, build_directory, **kwargs):
        calls.append(build_directory)
        with open(f"{build_directory}/build.ninja", "w") as f:
            f.write("rule cxx\n")

    monkeypatch.setattr(cpp_extension, "load", load)
    return calls


def test_the_jit_build_refuses_a_linked_build_folder(cache, compiler, canary):
    version = f"torch-{torch.__version__.replace('+', '_')}"
    (cache / version).mkdir(parents=True)
    (cache / version / "blens_fast_C").symlink_to(canary.root)
    with pytest.raises(ValueError, match="blens_fast_C' is a symbolic link"):
        _extension._jit_build_cpu()
    assert compiler == []
    canary.check()


def test_the_jit_build_refuses_a_linked_folder_above_it_or_a_link_inside_it(cache, compiler, canary):
    cache.mkdir()
    version = f"torch-{torch.__version__.replace('+', '_')}"
    (cache / version).symlink_to(canary.root)
    with pytest.raises(ValueError, match=f"{version}' is a symbolic link"):
        _extension._jit_build_cpu()
    (cache / version).unlink()
    (cache / version / "blens_fast_C").mkdir(parents=True)
    (cache / version / "blens_fast_C" / "build.ninja").symlink_to(canary.path())
    with pytest.raises(ValueError, match=r"holds symbolic links \('build.ninja' -> "):
        _extension._jit_build_cpu()
    assert compiler == []
    canary.check()
    (cache / version / "blens_fast_C" / "build.ninja").unlink()
    _extension._jit_build_cpu()  # a plain folder builds
    assert compiler == [str(cache / version / "blens_fast_C")]


def test_a_tuning_table_is_neither_written_nor_read_through_a_link(tmp_path, monkeypatch, canary):
    tables = tmp_path / "tables"
    monkeypatch.setenv("BLENS_FAST_TUNING_TABLES", str(tables))
    entry = tuning.make_entry("topk", d=64, v=512, n=16, k=4, dtype=torch.float32, times_ms={"cuda": 1.0})
    canary.path("table.json").write_text(json.dumps({"format": tuning.FORMAT, "device_name": DEVICE,
                                                     "entries": [entry]}))
    canary.refresh()
    tables.mkdir()
    tuning.table_path(DEVICE).symlink_to(canary.path("table.json"))
    assert tuning.measured_impl("topk", DEVICE, d=64, v=512, n=16, k=4, dtype=torch.float32) is None
    with pytest.raises(ValueError, match="nvidia_h200.json' is a symbolic link"):
        tuning.write_table(DEVICE, [entry])
    canary.check()
    tuning.table_path(DEVICE).unlink()
    tuning.write_table(DEVICE, [entry])  # a plain file is read as before
    assert tuning.measured_impl("topk", DEVICE, d=64, v=512, n=16, k=4, dtype=torch.float32) == "cuda"
