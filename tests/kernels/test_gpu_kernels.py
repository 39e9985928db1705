"""The GPU projection kernels against the torch reference, on a GPU (skipped without one).

* every CUDA variant of ``blens_fast._C_cuda.topk_logits_variant`` ("simple", "mma", "wgmma" where the device and
  the build have them) and the autotuned Triton kernel's every configuration;
* exact checks on integer inputs (every logit exact in float32, many ties): top-k, bottom-k, the target counts and
  the log-sum-exp must equal the float64 reference's, lower index first among ties;
* odd sizes (N and V not multiples of any tile, d not a multiple of the k step, d not a multiple of 8 through a
  padded weight view), k = 1 .. 256 (non-powers of two), bias, the norm prologue, float32 hidden states with 16-bit
  weights, forced vocabulary splits and block groups (the cross-split threshold), N x V > 2^31;
* random inputs: a valid top-k of the float64 truth within the fair bar (the same-dtype torch error + eps).

Run on the GPU machine: ``python -m pytest -q tests/kernels/test_gpu_kernels.py`` (the tests stage of benchmarks/gpu_check.sh).
"""
import importlib

import pytest
import torch

from blens_fast.ops import topk_reference

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _ext():
    try:
        return importlib.import_module("blens_fast._C_cuda")
    except ImportError as exc:  # pragma: no cover - GPU machines build it
        pytest.skip(f"blens_fast._C_cuda is not built: {exc}")


def _variants():
    if not CUDA:
        return ["simple", "mma", "wgmma"]
    try:
        return list(_ext().topk_variants())
    except Exception:  # noqa: BLE001 - collected before the skip
        return ["simple"]


VARIANTS = _variants()
FAST = [v for v in VARIANTS if v != "simple"]


def integer_inputs(n, d, v, dtype=torch.bfloat16, seed=0, pad_to=None):
    """Integer-valued hidden / weight (exact products and sums in float32), on the GPU. ``pad_to``: the weight is a
    view of a wider buffer (row stride pad_to), as a d not divisible by 8 needs for the fast variants."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-2, 3, (n, d), generator=g).to(dtype).cuda()
    w = torch.randint(-2, 3, (v, d), generator=g).to(dtype)
    if pad_to is not None:
        buf = torch.zeros(v, pad_to, dtype=dtype)
        buf[:, :d] = w
        w = buf.cuda()[:, :d]
    else:
        w = w.cuda()
    return h, w


def truth_lists(x, w, b, k, targets, top=True, bottom=True, chunk=4096):
    """Exact reference on float32 logits (integer inputs: exact) chunk by chunk, on the GPU."""
    parts, taus = [], []
    wf = w.float()
    for start in range(0, x.shape[0], chunk):
        xs = x[start:start + chunk].float()
        with _no_tf32():
            logits = xs @ wf.T
        if b is not None:
            logits = logits + b.float()
        t = targets[start:start + chunk]
        tau = logits.gather(1, t[:, None])[:, 0]
        taus.append(tau)
        parts.append(topk_reference.select(logits, k, top=top, bottom=bottom, target_ids=t, target_logits=tau))
        del logits
    return topk_reference.cat_selections(parts), torch.cat(taus)


class _no_tf32:
    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.old


def run_cuda(variant, h, w, b, k, top, bottom, targets=None, tau=None, prologue=(None, None, None, None), splits=0,
             group=0):
    out = _ext().topk_logits_variant(h, w, b, *prologue, k, top, bottom, targets, tau, variant, splits, group)
    return topk_reference.Selection(*out)


def assert_exact(res: topk_reference.Selection, ref: topk_reference.Selection, what):
    for field in ("top_indices", "top_values", "bottom_indices", "bottom_values", "target_counts"):
        a, r = getattr(res, field), getattr(ref, field)
        if r is None:
            assert a is None, (what, field)
            continue
        assert a is not None, (what, field)
        bad = (a.cpu() != r.cpu()).reshape(a.shape[0], -1).any(1).nonzero().flatten()
        assert bad.numel() == 0, (f"{what}: {field} differs in {bad.numel()} rows, first {bad[:5].tolist()}: "
                                  f"got {a[bad[0]].tolist()[:12]} want {r[bad[0]].tolist()[:12]}")
    err = (res.logsumexp.double() - ref.logsumexp.double()).abs().max().item()
    assert err <= 1e-4 * (1 + ref.logsumexp.abs().max().item()), (what, "logsumexp", err)


# -- CUDA variants ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n,d,v,k", [(300, 64, 1037, 1), (300, 72, 1037, 17), (129, 136, 2000, 100),
                                     (77, 48, 777, 256), (1000, 96, 5000, 33)])
def test_cuda_exact_ties(variant, n, d, v, k):
    h, w = integer_inputs(n, d, v, seed=k)
    g = torch.Generator().manual_seed(k + 1)
    b = torch.randint(-1, 2, (v,), generator=g).float().cuda()
    targets = torch.randint(0, v, (n,), generator=g).cuda()
    targets[:3] = torch.tensor([0, v - 1, min(128, v - 1)])
    ref, tau = truth_lists(h, w, b, k, targets)
    for top, bottom in ((True, True), (True, False), (False, True)):
        res = run_cuda(variant, h, w, b, k, top, bottom, targets, tau)
        want = topk_reference.Selection(ref.top_values if top else None, ref.top_indices if top else None,
                               ref.bottom_values if bottom else None, ref.bottom_indices if bottom else None,
                               ref.logsumexp, ref.target_counts)
        assert_exact(res, want, f"{variant} n={n} d={d} v={v} k={k} top={top} bottom={bottom}")
    counts_only = run_cuda(variant, h, w, b, k, False, False, targets, tau)
    assert torch.equal(counts_only.target_counts.cpu(), ref.target_counts.cpu())


@pytest.mark.parametrize("variant", FAST)
@pytest.mark.parametrize("splits,group", [(3, 0), (7, 1), (2, 2), (1, 1)])
def test_fast_forced_splits_and_groups(variant, splits, group):
    """Several splits (the published cross-split thresholds prune) and block groups: still exact."""
    n, d, v, k = 700, 64, 3000, 50
    h, w = integer_inputs(n, d, v, seed=splits * 10 + group)
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(5)).cuda()
    ref, tau = truth_lists(h, w, None, k, targets)
    res = run_cuda(variant, h, w, None, k, True, True, targets, tau, splits=splits, group=group)
    assert_exact(res, ref, f"{variant} splits={splits} group={group}")


@pytest.mark.parametrize("variant", FAST)
def test_fast_odd_d_padded_weight_and_strided_hidden(variant):
    """d = 77 (not a multiple of 8): weight rows from a padded buffer, hidden a strided view (through the pre-pass)."""
    n, d, v, k = 150, 77, 1500, 10
    h, w = integer_inputs(n, d, v, seed=3, pad_to=80)
    hs = torch.zeros(n, 90, dtype=h.dtype, device="cuda")
    hs[:, :d] = h
    hs = hs[:, :d]
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(6)).cuda()
    ref, tau = truth_lists(h, w, None, k, targets)
    assert_exact(run_cuda(variant, hs, w, None, k, True, True, targets, tau), ref, f"{variant} d=77 padded")
    with pytest.raises(RuntimeError, match="aligned"):  # a plain V x 77 weight cannot take the 16-byte loads
        run_cuda(variant, h, w.contiguous(), None, k, True, True)
    # auto falls back to the simple kernel for it, with the same results
    auto = topk_reference.Selection(*_ext().topk_logits(h, w.contiguous(), None, None, None, None, None, k, True, True,
                                               targets, tau))
    assert_exact(auto, ref, "auto on an unaligned weight")


@pytest.mark.parametrize("variant", VARIANTS)
def test_prologue_exact(variant):
    """x = (h * a - c) * norm_w + norm_b chosen to stay integer: exact; float32 hidden with 16-bit weights."""
    n, d, v, k = 260, 64, 1200, 20
    h, w = integer_inputs(n, d, v, seed=11)
    g = torch.Generator().manual_seed(12)
    a = torch.randint(1, 3, (n,), generator=g).float().cuda()
    c = torch.randint(-1, 2, (n,), generator=g).float().cuda()
    nw = torch.randint(-1, 2, (d,), generator=g).float().cuda()
    nb = torch.randint(-1, 2, (d,), generator=g).float().cuda()
    x = ((h.float() * a[:, None] - c[:, None]) * nw + nb).to(w.dtype)
    targets = torch.randint(0, v, (n,), generator=g).cuda()
    ref, tau = truth_lists(x, w, None, k, targets)
    for hidden in (h, h.float()):
        res = run_cuda(variant, hidden, w, None, k, True, True, targets, tau, prologue=(a, c, nw, nb))
        assert_exact(res, ref, f"{variant} prologue hidden {hidden.dtype}")
    res = run_cuda(variant, x.float(), w, None, k, True, True, targets, tau)  # float32 hidden, no prologue
    assert_exact(res, ref, f"{variant} float32 hidden")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_random_fair_bar(variant, dtype):
    """Random inputs, random prologue: a valid top-k / bottom-k of the float64 truth within the same-dtype error."""
    n, d, v, k = 333, 256, 4099, 10
    g = torch.Generator().manual_seed(21)
    h = torch.randn(n, d, generator=g).cuda()
    w = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype).cuda()
    b = torch.randn(v, generator=g).cuda()
    a = (torch.rand(n, generator=g) + 0.5).cuda()
    c = (torch.randn(n, generator=g) * 0.1).cuda()
    nw = (torch.rand(d, generator=g) + 0.5).cuda()
    nb = (torch.randn(d, generator=g) * 0.1).cuda()
    x = ((h * a[:, None] - c[:, None]) * nw + nb).to(dtype)
    truth = x.double() @ w.double().T + b.double()
    same_dtype = ((x @ w.T).float() + b - truth).abs().max().item()
    tol = same_dtype + 1e-4 * (1 + truth.abs().max().item())
    res = run_cuda(variant, h, w, b, k, True, True, prologue=(a, c, nw, nb))
    for values, indices, largest in ((res.top_values, res.top_indices, True),
                                     (res.bottom_values, res.bottom_indices, False)):
        picked = truth.gather(1, indices)
        assert (values.double() - picked).abs().max().item() <= tol
        kth = torch.topk(truth, k, dim=1, largest=largest).values[:, -1:]
        assert ((picked >= kth - tol) if largest else (picked <= kth + tol)).all()
    assert (res.logsumexp.double() - torch.logsumexp(truth, 1)).abs().max().item() <= tol


def test_variants_and_auto():
    ext = _ext()
    names = list(ext.topk_variants())
    major, _ = torch.cuda.get_device_capability()
    assert names[-1] == "simple"
    if major >= 8:
        assert "mma" in names
    w16 = torch.zeros(256, 64, dtype=torch.bfloat16, device="cuda")
    assert ext.topk_auto_variant(w16) == names[0]
    assert ext.topk_auto_variant(w16.float()) == "simple"
    print(f"\nCUDA projection variants here: {names}; auto for bf16: {ext.topk_auto_variant(w16)}")


@pytest.mark.parametrize("variant", FAST)
def test_large_n_times_v(variant):
    """N x V > 2^31 (small d): offsets and the split merge at scale; exact on integer inputs."""
    n, d, v, k = 45000, 16, 50257, 10
    h, w = integer_inputs(n, d, v, seed=31)
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(32)).cuda()
    assert n * v > 2 ** 31
    ref, tau = truth_lists(h, w, None, k, targets)
    assert_exact(run_cuda(variant, h, w, None, k, True, True, targets, tau), ref, f"{variant} N x V > 2^31")


# -- Triton: every configuration of the autotuning space, and the autotuned path ------------------------------------
def _triton_configs():
    try:
        from blens_fast.ops.triton.topk import TUNE_CONFIGS, _prune_configs
    except Exception:  # noqa: BLE001 - no triton: nothing to parametrize
        return []

    out = []
    for k in (10, 100):
        kp = 1 << (k - 1).bit_length()
        for cfg in _prune_configs(TUNE_CONFIGS, KP=kp):
            kw = cfg.kwargs
            out.append(pytest.param(k, dict(block_m=kw["BLOCK_M"], block_n=kw["BLOCK_N"], block_k=kw["BLOCK_K"],
                                            group_m=kw["GROUP_M"], num_warps=cfg.num_warps,
                                            num_stages=cfg.num_stages),
                                    id=f"k{k}-{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}-g{kw['GROUP_M']}-"
                                       f"w{cfg.num_warps}-s{cfg.num_stages}"))
    return out


@pytest.mark.parametrize("k,config", _triton_configs())
def test_triton_each_config_exact(k, config):
    """Top-k only, bf16, d = 64, no bias: the constexprs and specialisations the roofline benchmark compiles, so
    these compiles are the benchmark's too (Triton's cache). N = 2100: more row tiles than GROUP_M = 16 at
    BLOCK_M = 128, so the grouped order has several groups."""
    from blens_fast.ops.triton.topk import triton_topk

    n, d, v = 2100, 64, 5003
    h, w = integer_inputs(n, d, v, seed=k)
    targets = torch.zeros(n, dtype=torch.long, device="cuda")
    ref, _ = truth_lists(h, w, None, k, targets, bottom=False)
    tv, ti, bv, bi, lse, counts = triton_topk(h, w, k=k, top=True, bottom=False, **config)
    res = topk_reference.Selection(tv, ti, None, None, lse, None)
    assert_exact(res, topk_reference.Selection(ref.top_values, ref.top_indices, None, None, ref.logsumexp, None),
                 f"triton {config}")


def test_triton_autotuned_path_exact():
    """Through triton.autotune (k = 10, top only: the per-config tests' compiles are reused)."""
    from blens_fast.ops.triton import topk as ttopk

    n, d, v, k = 3000, 64, 6007, 10
    h, w = integer_inputs(n, d, v, seed=41)
    targets = torch.zeros(n, dtype=torch.long, device="cuda")
    ref, _ = truth_lists(h, w, None, k, targets, bottom=False)
    tv, ti, bv, bi, lse, counts = ttopk.triton_topk(h, w, k=k, top=True, bottom=False, autotune=True)
    assert ttopk.last_config() is not None
    assert_exact(topk_reference.Selection(tv, ti, None, None, lse, None),
                 topk_reference.Selection(ref.top_values, ref.top_indices, None, None, ref.logsumexp, None),
                 f"triton autotuned {ttopk.last_config()}")
    print(f"\nTriton autotuned config for N={n}, d={d}, V={v}, k={k}: {ttopk.last_config()}")
