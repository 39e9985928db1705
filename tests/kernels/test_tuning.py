"""blens_fast.ops.tuning: impl="auto" from a table measured on the device (synthetic tables, no GPU needed)."""
import json

import pytest
import torch

from blens_fast.ops import tuning

DEVICE = "NVIDIA H200"


def _entries():
    rows = []
    for d, v in ((768, 50257), (4096, 50400)):
        for n in (1024, 4096, 16384):
            for k in (10, 100):
                # synthetic: cuda fastest at GPT-J dims, triton at GPT-2 dims except N=16384 k=100 (torch)
                times = {"cuda": 2.0 if d == 4096 else 3.0, "triton": 2.5, "torch": 9.0}
                if (d, n, k) == (768, 16384, 100):
                    times["torch"] = 1.0
                rows.append(tuning.make_entry("topk", d=d, v=v, n=n, k=k, dtype=torch.bfloat16, times_ms=times,
                                              extra_ms={"cuda:simple": 50.0, "gemm": 0.5}))
    rows.append(tuning.make_entry("topk", d=4096, v=50400, n=4096, k=10, dtype=torch.float32,
                                  times_ms={"cuda": 9.0, "triton": 3.0}))
    return rows


@pytest.fixture
def tables(tmp_path, monkeypatch):
    monkeypatch.setenv("BLENS_FAST_TUNING_TABLES", str(tmp_path))
    tuning.write_table(DEVICE, _entries(), meta={"source": "synthetic"})
    return tmp_path


def facts(**kw):
    base = dict(d=4096, v=50400, n=4096, k=10, dtype=torch.bfloat16)
    base.update(kw)
    return base


def test_slug_and_path(tmp_path):
    assert tuning.device_slug("NVIDIA H200") == "nvidia_h200"
    assert tuning.device_slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    assert tuning.table_path("NVIDIA H200", tmp_path) == tmp_path / "nvidia_h200.json"


def test_exact_and_nearest_shapes(tables):
    assert tuning.measured_impl("topk", DEVICE, **facts()) == "cuda"
    assert tuning.measured_impl("topk", DEVICE, **facts(d=768, v=50257)) == "triton"
    assert tuning.measured_impl("topk", DEVICE, **facts(d=768, v=50257, n=16384, k=100)) == "torch"
    # nearest in log space: d=1024 is nearer 768 than 4096; N=12000 nearer 16384; k=64 nearer 100
    assert tuning.measured_impl("topk", DEVICE, **facts(d=1024, v=50257, n=12000, k=64)) == "torch"
    assert tuning.measured_impl("topk", DEVICE, **facts(d=3000, v=32000, n=300, k=5)) == "cuda"


def test_dtype_op_and_device_must_match(tables):
    assert tuning.measured_impl("topk", DEVICE, **facts(dtype=torch.float32)) == "triton"
    assert tuning.measured_impl("topk", DEVICE, **facts(dtype="torch.float32")) == "triton"
    assert tuning.measured_impl("topk", DEVICE, **facts(dtype=torch.float16)) is None
    assert tuning.measured_impl("lowrank", DEVICE, **facts()) is None
    assert tuning.measured_impl("topk", "NVIDIA A100-SXM4-80GB", **facts()) is None
    assert tuning.measured_impl("topk", "", **facts()) is None


def test_missing_facts_and_extra_facts(tables):
    assert tuning.measured_impl("topk", DEVICE, d=4096, v=50400, n=4096, dtype=torch.bfloat16) is None
    assert tuning.measured_impl("topk", DEVICE, **facts(), prologue=True, top=True) == "cuda"
    assert tuning.measured_impl("topk", DEVICE, **facts(n=0)) == "cuda"  # no rows: still the nearest shape


def test_only_dispatch_names_are_answers(tables):
    # extra_ms (kernel variants, the GEMM alone) are faster but never an answer
    entry = tuning.nearest_entry("topk", DEVICE, d=4096, v=50400, n=4096, k=10, dtype=torch.bfloat16)
    assert entry["extra_ms"]["gemm"] < min(entry["times_ms"].values())
    assert entry["best"] == "cuda"


def test_no_table(tmp_path, monkeypatch):
    monkeypatch.setenv("BLENS_FAST_TUNING_TABLES", str(tmp_path / "absent"))
    assert tuning.measured_impl("topk", DEVICE, **facts()) is None


def test_malformed_tables_never_match(tmp_path, monkeypatch):
    monkeypatch.setenv("BLENS_FAST_TUNING_TABLES", str(tmp_path))
    path = tuning.table_path(DEVICE)
    path.write_text("not json")
    assert tuning.measured_impl("topk", DEVICE, **facts()) is None
    path.write_text(json.dumps({"format": 99, "entries": []}))
    assert tuning.measured_impl("topk", DEVICE, **facts()) is None
    bad = {"format": tuning.FORMAT, "device_name": DEVICE,
           "entries": [{"op": "topk"}, {"op": "topk", "dtype": "bfloat16", "d": 4096, "v": 50400, "n": 4096,
                                        "k": 10, "times_ms": {"cuda": float("nan"), "triton": 4.0}}]}
    path.write_text(json.dumps(bad))
    assert tuning.measured_impl("topk", DEVICE, **facts()) == "triton"


def test_write_merges_and_replaces(tables):
    path = tuning.table_path(DEVICE)
    before = json.loads(path.read_text())
    assert before["meta"] == {"source": "synthetic"} and len(before["entries"]) == 13
    new = tuning.make_entry("topk", d=4096, v=50400, n=4096, k=10, dtype=torch.bfloat16,
                            times_ms={"cuda": 5.0, "triton": 1.0})
    tuning.write_table(DEVICE, [new])
    after = json.loads(path.read_text())
    assert len(after["entries"]) == 13
    assert tuning.measured_impl("topk", DEVICE, **facts()) == "triton"
    tuning.write_table(DEVICE, [new], merge=False)
    assert len(json.loads(path.read_text())["entries"]) == 1


def test_the_projection_dispatch_reads_the_table(tables, monkeypatch):
    """On a GPU, topk's auto order starts with the table's fastest implementation for the facts ``topk_logits``
    passes (no GPU needed: the device's name is stubbed)."""
    from blens_fast.ops.registry import AUTO_ORDER
    from blens_fast.ops.topk import TOPK

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: DEVICE)
    gpu = torch.device("cuda")
    assert TOPK.auto_order(gpu, **facts()) == ("cuda", *AUTO_ORDER["cuda"])
    assert TOPK.auto_order(gpu, **facts(d=768, v=50257)) == ("triton", *AUTO_ORDER["cuda"])
    assert TOPK.auto_order(gpu, **facts(dtype=torch.float16)) == AUTO_ORDER["cuda"]  # no entry for float16


class _CudaExtension:
    """A stand-in for ``blens_fast._C_cuda`` on a GPU whose build has the ``mma`` and ``simple`` variants."""

    def __init__(self):
        self.calls = []

    def topk_variants(self):
        return ["mma", "simple"]

    def topk_logits_variant(self, *args):
        self.calls.append(args[12])  # the variant argument
        return [None] * 6


def test_a_measured_table_chooses_among_the_cuda_variants(tables, monkeypatch):
    """Each variant of the CUDA kernel is an implementation (``cuda:<variant>``): the table can name one, ``auto``
    takes it where it can run and passes over it where it cannot (float32 weights, unaligned rows, a variant the
    GPU or build lacks), and the named variant is the one the binding is asked for. No GPU needed: the device name,
    the extension and the device context are stubbed."""
    import contextlib

    from blens_fast.ops import _extension, topk

    ext = _CudaExtension()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: DEVICE)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(_extension, "_LOADED", {"cuda": ext})
    monkeypatch.setattr(_extension, "_ERRORS", {})
    entry = tuning.make_entry("topk", d=4096, v=50400, n=4096, k=10, dtype=torch.bfloat16,
                              times_ms={"cuda:mma": 1.0, "cuda": 1.2, "triton": 2.0},
                              extra_ms={"triton:fixed": 3.0})
    tuning.write_table(DEVICE, [entry], merge=False)
    gpu = torch.device("cuda")
    assert {"cuda:simple", "cuda:mma", "cuda:wgmma"} <= set(topk.TOPK.choices)
    assert topk.TOPK.resolve("auto", gpu, **facts(), aligned_rows=True).name == "cuda:mma"
    assert topk.TOPK.resolve("auto", gpu, **facts(), aligned_rows=False).name != "cuda:mma"
    with pytest.raises(ValueError, match="'mma' variant needs weight rows aligned to 16 bytes"):
        topk.TOPK.resolve("cuda:mma", gpu, **facts(), aligned_rows=False)
    with pytest.raises(ValueError, match="'mma' variant takes bfloat16 or float16 weights"):
        topk.TOPK.resolve("cuda:mma", gpu, **facts(dtype=torch.float32))
    with pytest.raises(ValueError, match=r"'wgmma' variant cannot run on this GPU or build \(usable: mma, simple"):
        topk.TOPK.resolve("cuda:wgmma", gpu, **facts())
    assert topk.TOPK.resolve("cuda:simple", gpu, **facts(dtype=torch.float32)).name == "cuda:simple"
    for name in ("cuda:mma", "cuda:simple", "cuda"):
        topk.TOPK.implementations[name].run(None, None, None, 10, True, False, None, None, None, None)
    assert ext.calls == ["mma", "simple", "auto"]


def test_aligned_rows_mirror_the_bindings_rule():
    from blens_fast.ops.topk import _aligned_rows

    w = torch.zeros(5, 64, dtype=torch.bfloat16)
    assert _aligned_rows(w)
    assert not _aligned_rows(torch.zeros(5, 68, dtype=torch.bfloat16)[:, :60])  # a row stride of 68 elements
    assert not _aligned_rows(w[:, 1:])  # rows start 2 bytes into 16
    assert _aligned_rows(torch.zeros(64, 5, dtype=torch.bfloat16).T)  # copied by the binding: d = 64
    assert not _aligned_rows(torch.zeros(60, 5, dtype=torch.bfloat16).T)
