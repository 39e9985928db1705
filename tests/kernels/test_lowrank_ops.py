"""The fused low-rank accumulation (C++ CPU, Triton, CUDA) against the float64 reference and dense gradients."""
import pytest
import torch

from blens_fast.capture import capture
from blens_fast.ops import lowrank as ops
from blens_fast.ops.lowrank_reference import dense_sum_reference, sketch_update_reference
from tests.helpers import autograd_loss, make_tiny_model

# (row counts per example, p, q, s1, s2): odd sizes, an empty example, p and q smaller than a tile, s > p
CASES = [
    ((5, 0, 12, 6), 37, 51, 9, 19),
    ((1,), 3, 5, 17, 35),
    ((33, 2), 64, 40, 16, 33),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def cpu_op():
    if not ops._has_kernel("CPU"):
        pytest.skip(f"the C++ extension is unavailable: {ops._kernel_check('CPU')(torch.device('cpu'))}")
    return True


def make_case(lengths, p, q, s1, s2, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    a = torch.randn(n, p, generator=g).to(dtype)
    b = (0.1 * torch.randn(n, q, generator=g)).to(dtype)
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    right = torch.randn(q, s1, generator=g)
    left_t = torch.randn(p, s2, generator=g)
    y = torch.randn(p, s1, generator=g)
    w = torch.randn(s2, q, generator=g)
    return [t.to(device) for t in (a, b)] + [offsets] + [t.to(device) for t in (right, left_t, y, w)]


def impls():
    out = ["torch", "cpu", "triton"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[1:])) + f"-{len(c[0])}ex")
def test_matches_float64_reference(request, impl, dtype, case):
    if impl == "cpu":
        request.getfixturevalue("cpu_op")
    if impl == "triton" and dtype != torch.float32 and case[1] == 64:
        pytest.skip("one large case per dtype is enough under the Triton interpreter")
    device = "cuda" if impl in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
    a, b, offsets, right, left_t, y, w = make_case(*case, dtype, device)
    y_ref, w_ref = y.clone().cpu(), w.clone().cpu()
    norms_ref = sketch_update_reference(a.cpu(), b.cpu(), offsets, right.cpu(), left_t.cpu(), y_ref, w_ref)
    norms = ops.sketch_update(a, b, offsets, right, left_t, y, w, impl=impl)
    assert norms.dtype == torch.float64 and norms.shape == (len(case[0]),)
    # the inputs are exact in float32, so every impl is held to float32 accumulation error
    scale = norms_ref.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(norms.cpu(), norms_ref, rtol=2e-5, atol=2e-5 * scale.item())
    for got, ref in ((y, y_ref), (w, w_ref)):
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    if 0 in case[0]:
        assert norms[list(case[0]).index(0)] == 0


@pytest.mark.parametrize("impl", impls())
def test_empty_batch_and_same_as_torch(request, impl):
    if impl == "cpu":
        request.getfixturevalue("cpu_op")
    device = "cuda" if impl in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
    a, b, _, right, left_t, y, w = make_case((0,), 8, 6, 4, 5, torch.float32, device)
    y0, w0 = y.clone(), w.clone()
    norms = ops.sketch_update(a, b, torch.tensor([0, 0]), right, left_t, y, w, impl=impl)
    assert norms.tolist() == [0.0]
    assert torch.equal(y, y0) and torch.equal(w, w0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_against_dense_gradients_of_a_tiny_model(request, tokenizer, arch):
    """Per-example norms equal ||module.weight.grad||_F and the sketches equal dense G @ right and left_t^T G."""
    # the tiny model runs on the CPU: Triton takes CPU tensors only through the interpreter (no GPU here)
    impls_here = ["torch"] + (["triton"] if not torch.cuda.is_available() else []) + (
        ["cpu"] if request.getfixturevalue("cpu_op") else [])
    model = make_tiny_model(arch)
    prompts, targets = ["The capital of France is", "A cat is an"], ["Paris", "animal"]
    cap = capture(model, tokenizer, prompts, targets, layers=[0], modules=["mlp.out"])
    xs, ds = cap.x[(0, "mlp.out")], cap.delta[(0, "mlp.out")]
    a, b = torch.cat(xs), torch.cat(ds)
    offsets = torch.tensor([0, xs[0].shape[0], a.shape[0]])
    module = model.get_submodule({"gpt2": "transformer.h.0.mlp.c_proj", "llama": "model.layers.0.mlp.down_proj"}[arch])
    dense_per_example = []
    for prompt, target in zip(prompts, targets):  # the weight's own gradient, one example at a time
        model.zero_grad()
        with torch.enable_grad():
            autograd_loss(model, tokenizer, prompt, target).backward()
        grad = module.weight.grad.double()  # weight layout; x^T delta is [in, out]
        dense_per_example.append(grad if arch == "gpt2" else grad.T)
    model.zero_grad(set_to_none=True)
    dense_sum = dense_sum_reference(a, b)  # in [in, out] terms: X^T Delta
    g = torch.Generator().manual_seed(1)
    right = torch.randn(b.shape[1], 5, generator=g)
    left_t = torch.randn(a.shape[1], 11, generator=g)
    for impl in impls_here:
        y = torch.zeros(a.shape[1], 5)
        w = torch.zeros(11, b.shape[1])
        norms = ops.sketch_update(a, b, offsets, right, left_t, y, w, impl=impl)
        expected = torch.stack([d.double().norm() for d in dense_per_example])
        torch.testing.assert_close(norms.sqrt(), expected, rtol=1e-5, atol=0)
        torch.testing.assert_close(y.double(), dense_sum @ right.double(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(w.double(), left_t.double().T @ dense_sum, rtol=1e-4, atol=1e-5)


def test_argument_checks():
    a, b, offsets, right, left_t, y, w = make_case((3, 2), 6, 7, 4, 5, torch.float32)
    with pytest.raises(ValueError, match="a has 5 rows but b has 4"):
        ops.sketch_update(a, b[:4], offsets, right, left_t, y, w)
    with pytest.raises(ValueError, match="offsets must start at 0 and end at the row count 5"):
        ops.sketch_update(a, b, torch.tensor([0, 3, 4]), right, left_t, y, w)
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.sketch_update(a, b, torch.tensor([0, 4, 3, 5]), right, left_t, y, w)
    with pytest.raises(TypeError, match="offsets must be a 1-D int64"):
        ops.sketch_update(a, b, offsets.int(), right, left_t, y, w)
    with pytest.raises(ValueError, match="right has 6 rows but b has 7 columns"):
        ops.sketch_update(a, b, offsets, right[:6], left_t, y, w)
    with pytest.raises(ValueError, match=r"y has shape \(6, 3\): expected \(6, 4\)"):
        ops.sketch_update(a, b, offsets, right, left_t, y[:, :3].contiguous(), w)
    with pytest.raises(TypeError, match="y must be float32"):
        ops.sketch_update(a, b, offsets, right, left_t, y.double(), w)
    with pytest.raises(ValueError, match="impl='gpu' is not one of"):
        ops.sketch_update(a, b, offsets, right, left_t, y, w, impl="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="impl='cuda' cannot run sketch_update here: it takes cuda tensors"):
            ops.sketch_update(a, b, offsets, right, left_t, y, w, impl="cuda")


def test_auto_picks_a_path(cpu_op):
    assert ops.SKETCH.resolve("auto", torch.device("cpu")).name == "cpu"
    assert ops.SKETCH.resolve("triton", torch.device("cpu")).name == "triton"  # TRITON_INTERPRET=1 here


def test_cuda_kernel_loads_after_the_cpu_extension(monkeypatch):
    """With ``_C`` already loaded (the op registered, no CUDA kernel yet), a CUDA machine still loads ``_C_cuda``."""
    import importlib

    from blens_fast.ops import _extension

    imported = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib, "import_module", lambda name: imported.append(name) or object())
    monkeypatch.setattr(_extension, "_LOADED", {"cpu": object()})  # the C++ extension is loaded already
    monkeypatch.setattr(_extension, "_ERRORS", {})
    assert _extension.unavailable("cuda") is None
    assert imported == ["blens_fast._C_cuda"]


@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_the_op_and_its_fake_pass_opcheck(request, impl):
    """The dispatch runs inside the torch.library op blens_fast::sketch_update, registered like the projection's, with
    its fake beside it: schema (y and w written in place), fake tensors and AOT dispatch agree with the real run."""
    if impl == "cpu":
        request.getfixturevalue("cpu_op")
    args = make_case((3, 0, 4), 5, 4, 3, 2, torch.float32)
    torch.library.opcheck(torch.ops.blens_fast.sketch_update.default, (*args, impl))
