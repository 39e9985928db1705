"""blens_fast.ops.topk: every implementation against the pure-torch reference.

Values are checked against a float64 ground truth with ml-cross-entropy's fair bar: a kernel's error
may not exceed the same-dtype torch error plus a small epsilon. Index sets must be a valid top-k of
the truth (every selected logit within tolerance of the k-th value); on integer inputs (exact logits,
many ties) indices and values must equal the reference exactly, lower index first.
Triton runs through TRITON_INTERPRET=1 (set in conftest.py) on small shapes only.
"""
import pytest
import torch

from blens_fast.ops import reference
from blens_fast.ops.topk import CpuTuning, TopBottomK, TopK, available_impls, topk_bottomk_logits, topk_logits
from tests.helpers import check_topk

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
FUSED = ["cpu", "triton"] + (["cuda"] if CUDA else [])
ALL = ["torch", "naive"] + FUSED
KS = [1, 2, 5, 10, 17, 64, 100]


def device_for(impl):
    return "cuda" if impl in ("cuda",) or (impl == "triton" and CUDA) else "cpu"


def make(n, d, v, dtype=torch.float32, bias=False, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * scale).to(dtype).to(device)
    w = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype).to(device)
    b = torch.randn(v, generator=g).to(device) if bias else None
    return h, w, b


def truth_logits(h, w, b):
    logits = h.double() @ w.double().T
    return logits + b.double() if b is not None else logits


def sorted_truth(h, w, b, k, largest):
    """The exact selection of float64 logits by a stable sort (equal values keep the lower index first): the tie
    rule written independently of the package's references."""
    logits = truth_logits(h, w, b).cpu()
    values, indices = torch.sort(logits, dim=-1, descending=largest, stable=True)
    return values[:, :k], indices[:, :k]


def truth_counts(logits, targets):
    """(greater, less, equal with a lower index) of each row against its target's logit, the target skipped."""
    tau = logits.gather(1, targets[:, None])
    cols = torch.arange(logits.shape[1])[None, :]
    other = cols != targets[:, None]
    return ((logits > tau) & other).sum(1), ((logits < tau) & other).sum(1), ((logits == tau) & (cols < targets[:, None])).sum(1)


def same_dtype_error(h, w, b, truth):
    """Error of torch's own same-dtype matmul against the float64 truth (the fair bar)."""
    return (reference.logits_block(h, w, b).double() - truth).abs().max().item() if h.numel() else 0.0


def check(res: TopK, h, w, b, k, largest, eps=1e-4):
    """A valid top-k of the float64 truth, with ml-cross-entropy's fair bar: the error of torch's same-dtype
    GEMM plus ``eps``."""
    n = h.shape[0]
    assert res.values.shape == (n, k) and res.indices.shape == (n, k) and res.logsumexp.shape == (n,)
    assert res.values.dtype == torch.float32 and res.indices.dtype == torch.int64
    assert res.logsumexp.dtype == torch.float32 and res.largest == largest
    if n == 0:
        return
    truth = truth_logits(h, w, b).cpu()
    tol = same_dtype_error(h, w, b, truth.to(h.device)) + eps * (1 + truth.abs().max().item())
    check_topk(res.values, res.indices, res.logsumexp, truth, k, largest, tol)

# -- correctness -------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["torch", "naive", "cpu"] + (["cuda"] if CUDA else []))
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_random_shapes(impl, k, largest, bias):
    # V (1001) is not a multiple of any tile size, d (123) neither
    h, w, b = make(67, 123, 1001, bias=bias, device=device_for(impl), seed=k)
    check(topk_logits(h, w, b, k=k, largest=largest, impl=impl), h, w, b, k, largest)


TRITON_FAST = [(1, True, False), (17, False, True), (100, True, True), (5, False, False)]


@pytest.mark.parametrize("k,largest,bias", TRITON_FAST)
def test_random_shapes_triton(k, largest, bias):
    h, w, b = make(37, 48, 601, bias=bias, device=device_for("triton"), seed=k)
    check(topk_logits(h, w, b, k=k, largest=largest, impl="triton"), h, w, b, k, largest)


@pytest.mark.slow
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_random_shapes_triton_full(k, largest, bias):
    h, w, b = make(67, 123, 1001, bias=bias, device=device_for("triton"), seed=k)
    check(topk_logits(h, w, b, k=k, largest=largest, impl="triton"), h, w, b, k, largest)


def test_triton_small_tiles_and_splits():
    """Several row tiles, several vocabulary tiles per split and a split merge."""
    from blens_fast.ops.triton.topk import triton_topk

    h, w, b = make(40, 40, 333, bias=True, device=device_for("triton"))
    for largest in (True, False):
        tv, ti, bv, bi, lse, _ = triton_topk(h, w, b, k=5, top=largest, bottom=not largest, splits=3, block_m=16,
                                             block_n=32, block_k=16)
        values, indices = (tv, ti) if largest else (bv, bi)
        check(TopK(values, indices, lse, largest), h, w, b, 5, largest)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(impl, dtype):
    h, w, b = make(33, 64, 777, dtype=dtype, bias=True, device=device_for(impl), scale=2.0)
    for largest in (True, False):
        check(topk_logits(h, w, b, k=10, largest=largest, impl=impl), h, w, b, 10, largest, eps=2e-3)


@pytest.mark.parametrize("impl", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_ties(impl, dtype):
    """Integer inputs: exact logits with many ties; lower index wins, everywhere."""
    g = torch.Generator().manual_seed(1)
    dev = device_for(impl)
    h = torch.randint(-2, 3, (29, 8), generator=g).to(dtype).to(dev)
    w = torch.randint(-2, 3, (517, 8), generator=g).to(dtype).to(dev)
    b = torch.randint(-1, 2, (517,), generator=g).float().to(dev)
    for k in (1, 17, 64):
        for largest in (True, False):
            values, indices = sorted_truth(h, w, b, k, largest)
            res = topk_logits(h, w, b, k=k, largest=largest, impl=impl)
            assert torch.equal(res.indices.cpu(), indices), (impl, k, largest)
            assert torch.equal(res.values.cpu().double(), values)


# -- one pass: top-k, bottom-k and target ranks together ----------------------------------------
def exact_lists_check(res: TopBottomK, h, w, b, k, targets, top=True, bottom=True):
    """Against float64 truth on exact (integer) inputs, written independently: everything must be equal."""
    logits = truth_logits(h, w, b).cpu()
    targets = targets.cpu()
    tau = logits.gather(1, targets[:, None])[:, 0]
    for name, wanted, largest in (("top", top, True), ("bottom", bottom, False)):
        part = getattr(res, name)
        if not wanted:
            assert part is None
            continue
        values, indices = sorted_truth(h, w, b, k, largest)
        assert torch.equal(part.indices.cpu(), indices)
        assert torch.equal(part.values.cpu().double(), values)
    assert torch.allclose(res.logsumexp.cpu().double(), torch.logsumexp(logits, 1), atol=1e-4)
    greater, less, equal_lower = truth_counts(logits, targets)
    assert torch.equal(res.target_rank_top.cpu(), greater + equal_lower + 1)
    assert torch.equal(res.target_rank_bottom.cpu(), less + equal_lower + 1)
    assert torch.equal(res.target_logits.cpu().double(), tau)


@pytest.mark.parametrize("impl", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_exact_ties(impl, dtype):
    """Integer inputs (exact logits, many ties, some targets tied with other tokens): top-k, bottom-k, logsumexp
    and both target ranks equal the reference exactly, and a target in a list sits at position rank - 1."""
    g = torch.Generator().manual_seed(2)
    dev = device_for(impl)
    h = torch.randint(-2, 3, (31, 8), generator=g).to(dtype).to(dev)
    w = torch.randint(-2, 3, (517, 8), generator=g).to(dtype).to(dev)
    b = torch.randint(-1, 2, (517,), generator=g).float().to(dev)
    targets = torch.randint(0, 517, (31,), generator=g)
    targets[:3] = torch.tensor([0, 516, 258])  # first and last columns, and a tile boundary region
    for k, top, bottom in ((1, True, True), (17, True, True), (64, True, False), (5, False, True)):
        res = topk_bottomk_logits(h, w, b, k=k, top=top, bottom=bottom, targets=targets.to(dev), impl=impl)
        exact_lists_check(res, h, w, b, k, targets, top, bottom)
    res = topk_bottomk_logits(h, w, b, k=517, targets=targets.to(dev), impl=impl) if impl not in ("cuda", "triton") \
        else topk_bottomk_logits(h, w, b, k=200, targets=targets.to(dev), impl=impl)
    for row, t in enumerate(targets.tolist()):
        for part, ranks in ((res.top, res.target_rank_top), (res.bottom, res.target_rank_bottom)):
            where = (part.indices[row].cpu() == t).nonzero().flatten().tolist()
            if where:
                assert where[0] == int(ranks[row]) - 1


@pytest.mark.parametrize("impl", ALL)
@pytest.mark.parametrize("k,bias", [(1, False), (10, True), (33, True)])
def test_one_pass_random(impl, k, bias):
    """Random float inputs, odd sizes: each list is a valid top-k / bottom-k of the float64 truth, the log-sum-exp
    matches, and the target ranks equal the float32 reference's (no near-ties at these sizes)."""
    dev = device_for(impl)
    h, w, b = make(45, 77, 1003, bias=bias, device=dev, seed=k)
    targets = torch.randint(0, 1003, (45,), generator=torch.Generator().manual_seed(k)).to(dev)
    res = topk_bottomk_logits(h, w, b, k=k, targets=targets, impl=impl)
    check(res.top, h, w, b, k, True)
    check(res.bottom, h, w, b, k, False)
    assert torch.equal(res.top.logsumexp, res.bottom.logsumexp)
    logits = truth_logits(h, w, b).cpu()
    greater, less, equal_lower = truth_counts(logits, targets.cpu())
    assert torch.equal(res.target_rank_top.cpu(), greater + equal_lower + 1)
    assert torch.equal(res.target_rank_bottom.cpu(), less + equal_lower + 1)
    truth = logits.gather(1, targets.cpu()[:, None])[:, 0]
    assert (res.target_logits.cpu().double() - truth).abs().max() < 1e-4


@pytest.mark.parametrize("impl", ALL)
def test_one_pass_leading_dims_and_ranks_only(impl):
    dev = device_for(impl)
    h, w, b = make(6, 16, 300, bias=True, device=dev)
    res = topk_bottomk_logits(h.reshape(2, 3, 16), w, b, k=4, targets=7, impl=impl)
    assert res.top.values.shape == (2, 3, 4) and res.target_rank_bottom.shape == (2, 3)
    assert res.target_ids.tolist() == [[7] * 3] * 2
    ranks_only = topk_bottomk_logits(h, w, b, k=4, top=False, bottom=False, targets=[7] * 6, impl=impl)
    assert ranks_only.top is None and ranks_only.bottom is None
    assert torch.equal(ranks_only.target_rank_top, res.target_rank_top.reshape(6))
    empty = topk_bottomk_logits(h[:0], w, b, k=4, targets=torch.zeros(0, dtype=torch.long), impl=impl)
    assert empty.top.values.shape == (0, 4) and empty.target_rank_top.shape == (0,)
    frame = res.to_pandas()
    assert set(frame["list"]) == {"top", "bottom"} and len(frame) == 2 * 6 * 4 and "target_rank" in frame


def test_one_pass_argument_errors():
    h, w, b = make(4, 16, 50)
    with pytest.raises(ValueError, match="targets have shape \\(3,\\) but the vectors' rows have shape \\(4,\\)"):
        topk_bottomk_logits(h, w, targets=[1, 2, 3])
    with pytest.raises(ValueError, match="target id 50 is out of range.*V=50"):
        topk_bottomk_logits(h, w, targets=[1, 2, 3, 50])
    with pytest.raises(TypeError, match="targets must be integer token ids"):
        topk_bottomk_logits(h, w, targets=torch.zeros(4))
    with pytest.raises(ValueError, match="nothing to compute"):
        topk_bottomk_logits(h, w, top=False, bottom=False)
    with pytest.raises(TypeError, match="bottom must be a bool"):
        topk_bottomk_logits(h, w, bottom="yes")


def test_reference_tie_rule():
    """The package's own reference keeps the rule too (it is what impl='torch' runs)."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]])
    v, i = reference.select_topk(logits, 2, largest=True)
    assert i.tolist() == [[1, 2]] and v.tolist() == [[3.0, 3.0]]
    v, i = reference.select_topk(logits, 4, largest=True)
    assert i.tolist() == [[1, 2, 4, 3]]
    v, i = reference.select_topk(-logits, 2, largest=False)
    assert i.tolist() == [[1, 2]]


@pytest.mark.parametrize("impl", ALL)
def test_n_zero_one_and_leading_dims(impl):
    dev = device_for(impl)
    h, w, b = make(6, 16, 300, bias=True, device=dev)
    empty = topk_logits(h[:0], w, b, k=7, impl=impl)
    assert empty.values.shape == (0, 7) and empty.logsumexp.shape == (0,)
    one = topk_logits(h[:1], w, b, k=7, impl=impl)
    check(one, h[:1], w, b, 7, True)
    batched = topk_logits(h.reshape(2, 3, 16), w, b, k=4, largest=False, impl=impl)
    assert batched.values.shape == (2, 3, 4) and batched.logsumexp.shape == (2, 3)
    flat = topk_logits(h, w, b, k=4, largest=False, impl=impl)
    assert torch.equal(batched.indices.reshape(6, 4), flat.indices)
    single = topk_logits(h[0], w, b, k=3, impl=impl)
    assert single.values.shape == (3,) and single.logsumexp.shape == ()


@pytest.mark.parametrize("impl", ALL)
def test_k_equals_v_and_noncontiguous(impl):
    dev = device_for(impl)
    g = torch.Generator().manual_seed(3)
    big = torch.randn(9, 64, generator=g).to(dev)
    h = big[:, ::2]                        # stride 2 along d
    w = torch.randn(32, 200, generator=g).to(dev).T  # V x d with strides (1, V)
    assert not h.is_contiguous() and not w.is_contiguous()
    check(topk_logits(h, w, k=10, impl=impl), h, w, None, 10, True)
    if impl in ("cuda", "triton"):
        return  # the GPU kernels stop at k <= 256
    full = topk_logits(h, w, k=200, largest=False, impl=impl)
    check(full, h, w, None, 200, False)


def test_cpu_vocab_splits_and_blocks():
    """Small N makes the C++ kernel split the vocabulary; tiny blocks force many compactions."""
    h, w, b = make(3, 32, 5003, bias=True)
    for largest in (True, False):
        check(topk_logits(h, w, b, k=17, largest=largest, impl="cpu"), h, w, b, 17, largest)
    tiny_blocks = CpuTuning(block_rows=5, block_vocab=67)
    h, w, b = make(23, 32, 1001, bias=True)
    for k in (1, 64, 300):
        check(topk_logits(h, w, b, k=k, impl="cpu", tuning=tiny_blocks), h, w, b, k, True)
    # the one pass through the same blocks and splits: equal to the chunked torch reference
    targets = torch.arange(23) * 43
    for n in (23, 2):
        res = topk_bottomk_logits(h[:n], w, b, k=64, targets=targets[:n], impl="cpu", tuning=tiny_blocks)
        ref = topk_bottomk_logits(h[:n], w, b, k=64, targets=targets[:n], impl="torch")
        for name in ("top", "bottom"):
            assert torch.equal(getattr(res, name).indices, getattr(ref, name).indices)
        assert torch.equal(res.target_rank_top, ref.target_rank_top)
        assert torch.equal(res.target_rank_bottom, ref.target_rank_bottom)
        assert torch.allclose(res.logsumexp, ref.logsumexp, atol=1e-5)


@pytest.mark.parametrize("impl", ALL)
def test_vocabulary_spanning_many_blocks_and_a_large_logit_range(impl):
    """Several vocabulary blocks (and splits) in every impl, with logits far apart across blocks, so that the online
    log-sum-exp must rescale its running sum when a later block holds the row's maximum."""
    dev = device_for(impl)
    h, w, b = make(7, 24, 4099, bias=True, device=dev, seed=5)
    b = b.clone()
    b[-50:] += 60.0  # the maximum arrives in the last block
    b[:50] -= 60.0
    for largest in (True, False):
        res = topk_logits(h, w, b, k=13, largest=largest, impl=impl)
        check(res, h, w, b, 13, largest)


@pytest.mark.parametrize("d", [96, 95])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tuning", [CpuTuning(), CpuTuning(gemm_mode=1), CpuTuning(gemm_mode=2)],
                         ids=["auto", "upcast", "native"])
def test_16_bit_logits_are_float32_sums_of_exact_products(dtype, tuning, d):
    """One contract for every impl and every CPU: logits are the float32 sums of the exact products of the 16-bit
    inputs, never rounded to 16 bits. gemm_mode=2 forces the native 16-bit GEMM path whatever this CPU has (a GEMM
    rounding its output to bf16 errs by up to ~0.06 here, far above the float32 bar). On a CPU with AMX the native
    path packs the weight block in 64-column slices, the last one narrower (3001 = 2 x 1024 + 953), and an odd d
    is never packed (oneDNN's bf16 kernel for an odd inner dimension executes an illegal instruction)."""
    h, w, b = make(41, d, 3001, dtype=dtype, bias=True, scale=3.0, seed=11)
    truth = truth_logits(h, w, b).cpu()
    bar = 2e-5 * (1 + truth.abs().max().item())
    for impl in ("cpu", "torch"):
        res = topk_bottomk_logits(h, w, b, k=10, impl=impl, tuning=tuning)
        for part, largest in ((res.top, True), (res.bottom, False)):
            assert (part.values.double() - truth.gather(1, part.indices)).abs().max().item() <= bar, (impl, largest)
            values, indices = sorted_truth(h, w, b, 10, largest)
            assert torch.equal(part.indices, indices), (impl, largest)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the Triton interpreter
@pytest.mark.parametrize("impl", ALL)
def test_nan_rows_raise(impl):
    dev = device_for(impl)
    h, w, _ = make(5, 16, 300, device=dev)
    h[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite logits \(rows 3\)"):
        topk_logits(h, w, k=5, impl=impl)
    h[3, 2] = float("inf")
    with pytest.raises(ValueError, match="rows 3"):
        topk_logits(h, w, k=5, impl=impl)


@pytest.mark.parametrize("impl", ALL)
def test_masked_vocabulary(impl):
    """A -inf bias masks tokens: finite rows, the masked tokens never selected (unless k forces it)."""
    dev = device_for(impl)
    h, w, _ = make(4, 16, 300, device=dev)
    b = torch.zeros(300, device=dev)
    b[::2] = float("-inf")
    res = topk_logits(h, w, b, k=10, impl=impl)
    assert (res.indices % 2 == 1).all()
    assert torch.isfinite(res.logsumexp).all()


# -- errors ------------------------------------------------------------------------------------
def test_argument_errors():
    h, w, b = make(4, 16, 50)
    with pytest.raises(ValueError, match="hidden has 16 features but weight has 8 columns"):
        topk_logits(h, w[:, :8])
    with pytest.raises(ValueError, match="k=51 is out of range.*V=50"):
        topk_logits(h, w, k=51)
    with pytest.raises(ValueError, match="k=0"):
        topk_logits(h, w, k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        topk_logits(h, w, k=2.0)
    with pytest.raises(TypeError, match="hidden is torch.int64"):
        topk_logits(h.long(), w)
    with pytest.raises(TypeError, match="hidden is torch.float16 but weight is torch.float32"):
        topk_logits(h.half(), w)
    with pytest.raises(ValueError, match=r"bias has shape \(49,\) but weight has 50 rows"):
        topk_logits(h, w, bias=torch.zeros(49))
    with pytest.raises(ValueError, match="impl='fast' is not one of"):
        topk_logits(h, w, impl="fast")
    with pytest.raises(ValueError, match="weight must be 2-D"):
        topk_logits(h, w[None])
    with pytest.raises(ValueError, match="hidden is on meta but weight is on cpu"):
        topk_logits(h.to("meta"), w)
    if not CUDA:
        with pytest.raises(ValueError, match="impl='cuda' cannot run topk here: it takes cuda tensors"):
            topk_logits(h, w, impl="cuda")
    with pytest.raises(ValueError, match="supports k <= 256"):
        topk_logits(*make(2, 4, 300, device=device_for("triton"))[:2], k=257, impl="triton")


def test_available_and_auto():
    impls = available_impls("cpu")
    assert {"torch", "naive", "cpu"} <= set(impls) and "cuda" not in impls
    h, w, b = make(5, 16, 300, bias=True)
    auto = topk_logits(h, w, b, k=7)
    ref = topk_logits(h, w, b, k=7, impl="torch")
    assert torch.equal(auto.indices, ref.indices)


# -- TopK helpers ------------------------------------------------------------------------------
class _Tok:
    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def test_topk_helpers():
    h, w, b = make(3, 16, 100, bias=True)
    res = topk_logits(h, w, b, k=4, impl="torch")
    truth = torch.softmax(truth_logits(h, w, b), dim=1)
    assert torch.allclose(res.probs().double(), truth.gather(1, res.indices), atol=1e-6)
    assert res.decode(_Tok())[1][0] == f"<{res.indices[1, 0].item()}>"
    df = res.to_pandas()
    assert list(df.columns) == ["row", "rank", "token_id", "logit", "prob"] and len(df) == 12
    assert df.loc[5, "token_id"] == res.indices[1, 1].item()
    assert "token" in res.to_pandas(_Tok()).columns
    both = TopK.cat([res[:1], res[1:]])
    assert torch.equal(both.indices, res.indices) and len(both) == 3 and res.k == 4


@pytest.mark.slow
def test_cpu_64bit_offsets():
    """N * V beyond 2**31 on the C++ path (tiny d keeps it affordable)."""
    n, v = 44_000, 50_000
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, 2, generator=g)
    w = torch.randn(v, 2, generator=g)
    res = topk_logits(h, w, k=3, impl="cpu")
    rows = torch.tensor([0, n // 2, n - 1])
    ref = reference.naive_lists(h[rows], w, None, k=3, top=True, bottom=False)
    assert torch.equal(res.indices[rows], ref.top_indices)


@pytest.mark.slow
def test_triton_compiles_for_sm80_sm90():
    """The Triton kernel lowers to PTX/cubin for A100 and H100 (no GPU needed)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "blens_fast.ops.triton.compile_check"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_available_implementations_default_to_the_cpu():
    from blens_fast.ops.topk import TOPK

    assert TOPK.available() == TOPK.available("cpu") == available_impls() == available_impls("cpu")
    assert {"torch", "naive"} <= set(TOPK.available())


def test_auto_puts_the_measured_implementation_first_on_gpus_only(monkeypatch):
    """On a CUDA device the table's fastest implementation (asked with the operation, the GPU's name and the facts)
    goes before AUTO_ORDER; CPUs never ask; an unknown device type gets the reference. No GPU needed: the device
    name is stubbed."""
    from blens_fast.ops.registry import AUTO_ORDER, Implementation, Operation

    asked = []

    def measured(op, device_name, **facts):
        asked.append((op, device_name, facts))
        return facts.get("best")

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU at {device}")
    implementations = [Implementation("torch", None, ("cpu", "cuda")), Implementation("cuda", None, ("cuda",))]
    op = Operation("demo", implementations, measured=measured)
    gpu = torch.device("cuda", 1)
    assert op.auto_order(gpu, best="torch", n=3) == ("torch", *AUTO_ORDER["cuda"])
    assert asked == [("demo", "GPU at cuda:1", {"best": "torch", "n": 3})]
    assert op.auto_order(gpu, best=None) == AUTO_ORDER["cuda"]  # no table entry
    assert op.auto_order(torch.device("cpu"), best="torch") == AUTO_ORDER["cpu"]
    assert len(asked) == 2
    assert op.auto_order(torch.device("meta")) == ("torch",)
    assert Operation("demo", implementations).auto_order(gpu) == AUTO_ORDER["cuda"]  # no table hook
    # resolve: the facts reach the table; names without an implementation here (triton) are passed over
    assert AUTO_ORDER["cuda"][0] not in op.implementations
    assert op.resolve("auto", "cuda:1", best="torch").name == "torch"
    assert op.resolve("auto", "cuda:1").name == "cuda"
    # nothing in the order usable for the device: the reference, which says why it cannot when asked by name
    assert op.resolve("auto", "meta").name == "torch"
    with pytest.raises(ValueError, match=r"^impl='torch' cannot run demo here: it takes cpu or cuda tensors, got "
                                         r"tensors on meta$"):
        op.resolve("torch", "meta")


def test_extension_checks_ask_for_their_own_extension():
    from blens_fast.ops.registry import extension_unavailable

    assert extension_unavailable("cpu")(torch.device("cpu")) is None  # built by the install (or JIT-built)
    if not torch.cuda.is_available():
        assert extension_unavailable("cuda")(torch.device("cuda")) == "no CUDA device is available"


@pytest.mark.parametrize(("value", "interpreting"), [(None, False), ("0", False), ("", False), ("1", True)])
def test_cpu_tensors_reach_the_gpu_kernel_language_only_when_interpreted(monkeypatch, value, interpreting):
    from blens_fast.ops.registry import triton_interpreting, triton_unavailable

    pytest.importorskip("triton")
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert triton_interpreting() is interpreting
    reason = triton_unavailable(torch.device("cpu"))
    assert (reason is None) is interpreting
    assert interpreting or "TRITON_INTERPRET=1" in reason
    assert triton_unavailable(torch.device("cuda")) is None  # importable: CUDA tensors are Triton's own


def test_reference_logits_of_16_bit_weights_over_several_upcast_blocks():
    """The torch reference upcasts a 16-bit weight UPCAST_ROWS vocabulary rows at a time: every block is written."""
    g = torch.Generator().manual_seed(4)
    vocab = 2 * reference.UPCAST_ROWS + 5
    h = torch.randn(3, 4, generator=g).to(torch.bfloat16)
    w = torch.randn(vocab, 4, generator=g).to(torch.bfloat16)
    b = torch.randn(vocab, generator=g)
    truth = h.double() @ w.double().T + b.double()
    logits = reference.logits_block(h, w, b)
    assert logits.dtype == torch.float32 and logits.shape == (3, vocab)
    torch.testing.assert_close(logits.double(), truth, rtol=1e-6, atol=1e-6)


def test_reference_in_chunks_equals_one_block():
    """The torch reference cut into row chunks (the last one short) gives exactly what one block gives (integer
    inputs: exact logits), for more rows than the hidden size."""
    g = torch.Generator().manual_seed(8)
    h = torch.randint(-3, 4, (40, 8), generator=g).float()
    w = torch.randint(-3, 4, (300, 8), generator=g).float()
    targets = torch.randint(0, 300, (40,), generator=g)
    tau = reference.logits_block(h, w).gather(1, targets[:, None])[:, 0]
    whole = reference.naive_lists(h, w, None, k=5, top=True, bottom=True, target_ids=targets, target_logits=tau)
    chunks = reference.chunked_lists(h, w, None, k=5, top=True, bottom=True, target_ids=targets, target_logits=tau,
                                     chunk_rows=16)
    for field, value in zip(reference.Lists._fields, whole):
        assert torch.equal(getattr(chunks, field), value), field


def test_reference_computes_only_the_lists_asked_for():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(9))
    top_only = reference.select_lists(logits, 4, top=True, bottom=False)
    bottom_only = reference.select_lists(logits, 4, top=False, bottom=True)
    assert top_only.bottom_values is None and top_only.bottom_indices is None and top_only.target_counts is None
    assert bottom_only.top_values is None and bottom_only.top_indices is None
    assert torch.equal(top_only.top_indices, logits.topk(4).indices)
    assert torch.equal(bottom_only.bottom_indices, logits.topk(4, largest=False).indices)


@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_the_op_and_its_fake_pass_opcheck(impl):
    """The projection's torch.library op blens_fast::topk_bottomk and its fake (lists, counts and the log-sum-exp of
    every shape) agree with the real run under torch.library.opcheck."""
    h, w, b = make(6, 16, 50, bias=True)
    targets = torch.arange(6)
    tau = (h @ w.T + b)[torch.arange(6), targets]
    args = (h, w, b, None, None, None, None, "", 0.0, False, targets, tau, 3, True, True, impl, 0, 0, 0)
    torch.library.opcheck(torch.ops.blens_fast.topk_bottomk.default, args)
