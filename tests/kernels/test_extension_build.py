"""The C++ extension is built one way: setup.py and the JIT build of ops/_extension.py compile the same sources with
the compiler flags of blens_fast/ops/build_flags.py, and the JIT build of the current sources works."""
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools
from torch.utils import cpp_extension

from blens_fast.ops import _extension, build_flags

ROOT = Path(__file__).resolve().parents[2]


def test_setup_and_the_jit_build_use_one_set_of_flags_and_sources(monkeypatch, tmp_path):
    jit = {}
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: jit.update(kwargs))
    monkeypatch.setenv("BLENS_FAST_CACHE", str(tmp_path))
    _extension._jit_build_cpu()
    built = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: built.update(kwargs))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"), run_name="setup")
    cpu = next(ext for ext in built["ext_modules"] if ext.name == "blens_fast._C")
    assert cpu.extra_compile_args["cxx"] == jit["extra_cflags"] == build_flags.CPU_CXX_FLAGS
    assert cpu.extra_link_args == jit["extra_ldflags"] == build_flags.CPU_LINK_FLAGS
    assert "-ffp-contract=off" in build_flags.CPU_CXX_FLAGS  # the kernel's scalar and vector code agree only so
    assert sorted(str(ROOT / s) for s in cpu.sources) == sorted(jit["sources"])
    assert {Path(s).name for s in jit["sources"]} >= {"topk_kernel.cpp", "topk_binding.cpp", "lowrank_kernel.cpp", "lowrank_binding.cpp"}


@pytest.mark.slow
def test_the_jit_build_compiles_the_sources_into_a_working_module(tmp_path):
    """About 2 minutes on 2 cores: a plain source checkout builds _C on first use. In its own process: the module
    registers the same torch.library ops as blens_fast._C."""
    script = """
import torch
from blens_fast.ops import _extension
module = _extension._jit_build_cpu()
hidden, weight = torch.randn(3, 16), torch.randn(40, 16)
indices = module.topk_logits(hidden, weight, None, None, None, None, None, 4, True, False, None, None)[1]
expected = torch.sort(hidden.double() @ weight.double().T, dim=1, descending=True, stable=True).indices[:, :4]
assert torch.equal(indices, expected), (indices, expected)
"""
    env = {**os.environ, "BLENS_FAST_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
