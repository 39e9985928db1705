"""The C++ projection's results of a row depend on that row alone: bit for bit the same top-k / bottom-k lists,
logits, log-sum-exp, target logits and ranks for 1, 2 or 3 threads, whichever other rows share the call (single rows,
odd slices, a permutation), on the AVX2 and the scalar code, for float32, bfloat16 and float16 and for the forced
native 16-bit GEMM path. The inputs have exact ties (duplicated weight rows, the targets among them), odd sizes
(d = 95: vector tails; V = 9001: three log-sum-exp segments, 2 or 3 vocabulary splits depending on the threads)."""
import pytest
import torch

from blens_fast.ops import _extension
from blens_fast.ops.topk import CpuTuning, Prologue, check_projection, check_targets, run_projection
from tests.helpers import threads

N, D, V, K = 37, 95, 9001, 13
FIELDS = ("top.values", "top.indices", "bottom.values", "bottom.indices", "logsumexp", "target_logits",
          "target_rank_top", "target_rank_bottom")


def operands(dtype, seed=0):
    """Hidden rows, weight and bias with exact ties: 40 weight rows repeat earlier ones, and half the targets are
    rows with a duplicate (below and above them in the vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, D, generator=g) * 2).to(dtype)
    weight = torch.randn(V, D, generator=g) / D ** 0.5
    copies = torch.randint(0, V, (40,), generator=g)
    weight[copies] = weight[torch.randint(0, V, (40,), generator=g)]
    bias = torch.randn(V, generator=g)
    bias[copies] = 0.5
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::2] = copies[: (N + 1) // 2]
    return hidden, weight.to(dtype), bias, targets


def project_rows(hidden, weight, bias, targets, tuning, prologue_kind):
    """The public one-pass projection on the C++ path (with the final-norm prologue of project() when asked)."""
    hidden, weight, bias, k, lead = check_projection(hidden, weight, bias, K, "cpu", top=True, bottom=True)
    prologue = None
    if prologue_kind:
        g = torch.Generator().manual_seed(3)
        prologue = Prologue.build(hidden, prologue_kind, 1e-5, False, torch.randn(D, generator=g),
                                  torch.randn(D, generator=g) if prologue_kind == "layernorm" else None)
    return run_projection(hidden, weight, bias, k, "cpu", lead, top=True, bottom=True,
                          targets=check_targets(targets, lead, weight.shape[0], weight.device), prologue=prologue,
                          tuning=tuning)


def field(result, name):
    obj = result
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def assert_same_rows(result, reference, rows, label):
    for name in FIELDS:
        got, want = field(result, name), field(reference, name)[rows]
        differing = int((got != want).reshape(len(got), -1).any(1).sum())
        assert torch.equal(got, want), f"{label}: {name} differs in {differing} rows"


@pytest.mark.parametrize("prologue_kind", [None, "layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype,gemm_mode", [(torch.float32, 0), (torch.bfloat16, 1), (torch.float16, 1),
                                             (torch.bfloat16, 2), (torch.float16, 2)],
                         ids=["float32", "bfloat16-exact", "float16-exact", "bfloat16-native", "float16-native"])
def test_rows_do_not_depend_on_threads_or_on_the_other_rows(dtype, gemm_mode, prologue_kind):
    """gemm_mode 2 forces the native 16-bit GEMM (oneDNN's brgemm; called a row at a time where the CPU has no
    native 16-bit dot products, as here on an AVX2 CPU)."""
    hidden, weight, bias, targets = operands(dtype)
    tuning = CpuTuning(gemm_mode=gemm_mode)
    with threads(1):
        reference = project_rows(hidden, weight, bias, targets, tuning, prologue_kind)
    batches = {"all rows": torch.arange(N), "row 0": torch.tensor([0]), "row 5": torch.tensor([5]),
               "rows 3-19": torch.arange(3, 20), "rows 20-36": torch.arange(20, N),
               "reversed": torch.arange(N - 1, -1, -1)}
    for n_threads in (1, 2, 3):
        with threads(n_threads):
            for label, rows in batches.items():
                result = project_rows(hidden[rows], weight, bias, targets[rows], tuning, prologue_kind)
                assert_same_rows(result, reference, rows, f"{n_threads} threads, {label}")


def test_block_sizes_change_no_list_logit_or_rank():
    """Blocks of 5 rows x 67 columns instead of the default 512 x 1024: the same lists, logits and ranks (the
    log-sum-exp is summed per block, so its last bit may move with the block size)."""
    hidden, weight, bias, targets = operands(torch.float32, seed=1)
    reference = project_rows(hidden, weight, bias, targets, CpuTuning(), None)
    small = project_rows(hidden, weight, bias, targets, CpuTuning(block_rows=5, block_vocab=67), None)
    for name in FIELDS:
        if name != "logsumexp":
            assert torch.equal(field(small, name), field(reference, name)), name
    assert torch.allclose(small.logsumexp, reference.logsumexp, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_vector_and_scalar_code_give_the_same_bits(dtype):
    """simd=False runs the portable code (the scalar twin of every vector step, the same fused multiply-adds and
    exp polynomial): the same bits as the AVX2 code, for the projection and the target logits."""
    cpu = _extension.extension("cpu")
    hidden, weight, bias, targets = operands(dtype, seed=2)
    g = torch.Generator().manual_seed(4)
    a, c, norm_w = torch.rand(N, generator=g) + 0.5, torch.randn(N, generator=g), torch.randn(D, generator=g)
    prologue = (a, c, norm_w, None)
    tau = cpu.target_logits(hidden, weight, bias, *prologue, targets, simd=True)
    assert torch.equal(cpu.target_logits(hidden, weight, bias, *prologue, targets, simd=False), tau)
    with threads(2):
        fast = cpu.topk_logits(hidden, weight, bias, *prologue, K, True, True, targets, tau, gemm_mode=1, simd=True)
        slow = cpu.topk_logits(hidden, weight, bias, *prologue, K, True, True, targets, tau, gemm_mode=1, simd=False)
    for got, want in zip(slow, fast):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_sits_at_its_rank_in_the_full_ordering(dtype):
    """The target's logit is the pass's own logit of that column (bit for bit), so its rank is its position in the
    kernel's own ordering of all V logits, exact ties with its duplicates included (lower index first)."""
    hidden, weight, bias, targets = operands(dtype, seed=5)
    hidden, weight = hidden[:8], weight[:3001]
    targets = torch.randint(0, 3001, (8,), generator=torch.Generator().manual_seed(6))
    weight[targets[0] - 7 if targets[0] >= 7 else targets[0] + 7] = weight[targets[0]]
    full = run_projection(*check_projection(hidden, weight, bias[:3001], 3001, "cpu", top=True, bottom=True)[:4],
                          "cpu", (8,), top=True, bottom=True, targets=targets, prologue=None)
    for row in range(8):
        position = int((full.top.indices[row] == targets[row]).nonzero())
        assert int(full.target_rank_top[row]) == position + 1, row
        assert full.top.values[row, position] == full.target_logits[row]
        position = int((full.bottom.indices[row] == targets[row]).nonzero())
        assert int(full.target_rank_bottom[row]) == position + 1, row
