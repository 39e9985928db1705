"""LowRankGradient against dense linear algebra."""
import pytest
import torch

from blens_fast import LowRankGradient


def factors(t, d_in, d_out, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, d_in, generator=g, dtype=dtype), torch.randn(t, d_out, generator=g, dtype=dtype)


def test_dense_is_in_out_and_shape():
    x, d = factors(5, 7, 11)
    g = LowRankGradient(x, d)
    expected = sum(torch.outer(x[i], d[i]) for i in range(5))  # d_in x d_out
    assert g.shape == (7, 11) == tuple(expected.shape)
    torch.testing.assert_close(g.dense(), expected)


def test_matvec_rmatvec_norm_svd():
    x, d = factors(6, 9, 13)
    g = LowRankGradient(x, d)
    dense = g.dense()
    v = torch.randn(dense.shape[1], 3, dtype=torch.float64)
    u = torch.randn(dense.shape[0], dtype=torch.float64)
    torch.testing.assert_close(g.matvec(v), dense @ v)
    torch.testing.assert_close(g.rmatvec(u), dense.T @ u)
    torch.testing.assert_close(g.norm(), dense.norm())
    torch.testing.assert_close(g.svdvals(), torch.linalg.svdvals(dense)[:6])
    uu, s, vh = g.svd()
    torch.testing.assert_close(uu @ torch.diag(s) @ vh, dense)
    u2, s2, vh2 = g.svd(2)
    assert u2.shape == (dense.shape[0], 2) and vh2.shape == (2, dense.shape[1])
    best = torch.linalg.svd(dense)
    torch.testing.assert_close(s2, best.S[:2])
    with pytest.raises(ValueError, match="k=7 is out of range"):
        g.svd(7)
    with pytest.raises(ValueError, match="expected 13 rows"):
        g.matvec(torch.randn(4, dtype=torch.float64))


def test_rank_of_generic_and_deficient_factors():
    x, d = factors(8, 20, 30)
    assert LowRankGradient(x, d).rank() == 8
    x[5] = x[2]
    d[5] = d[2]  # the same outer product twice: rank 7
    d[6] = 0  # a position with no gradient: rank 6
    x[7] = 0  # a zero input row: rank 5
    g = LowRankGradient(x, d)
    assert g.rank() == 5 == torch.linalg.matrix_rank(g.dense()).item()
    assert LowRankGradient(torch.zeros(3, 4), torch.zeros(3, 5)).rank() == 0
    assert LowRankGradient(torch.zeros(0, 4), torch.zeros(0, 5)).rank() == 0


def test_float32_rank_uses_float32_tolerance():
    x, d = factors(6, 40, 50, dtype=torch.float32)
    x[3] = x[1] + 1e-9 * torch.randn(40)  # a difference far below float32 resolution
    d[3] = d[1]
    g = LowRankGradient(x, d)
    assert g.rank() == torch.linalg.matrix_rank(g.dense()).item() == 5


def test_small_singular_values_survive():
    """A Gram-matrix route loses singular values below sqrt(eps) of the largest; the QR route keeps them."""
    t, n = 6, 40
    q1, _ = torch.linalg.qr(torch.randn(n, t, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n + 10, t, dtype=torch.float64))
    sigma = torch.logspace(0, -11, t, dtype=torch.float64)
    x = (q1 * sigma).T.contiguous()  # X^T D = q1 diag(sigma) q2^T
    d = q2.T.contiguous()
    g = LowRankGradient(x, d)
    torch.testing.assert_close(g.svdvals(), sigma, rtol=1e-6, atol=0)
    assert g.rank() == t


def test_addition_concatenates_factors():
    a = LowRankGradient(*factors(3, 5, 7, seed=1))
    b = LowRankGradient(*factors(2, 5, 7, seed=2))
    total = a + b
    assert total.num_tokens == 5
    torch.testing.assert_close(total.dense(), a.dense() + b.dense())
    with pytest.raises(ValueError, match="cannot add"):
        a + LowRankGradient(*factors(2, 7, 5))


def test_constructor_checks():
    with pytest.raises(ValueError, match=r"x has shape \(3, 4\) but delta has \(2, 4\)"):
        LowRankGradient(torch.zeros(3, 4), torch.zeros(2, 4))
    for x, delta in ((torch.zeros(4), torch.zeros(4)), (torch.zeros(3, 4), torch.zeros(1, 3, 4))):
        with pytest.raises(ValueError, match=r"^x and delta must be \(\.\.\., T, d\) with the same batch dimensions"):
            LowRankGradient(x, delta)


def test_half_precision_factors_use_float32_tolerance():
    x, d = factors(6, 64, 96, dtype=torch.float32)
    g = LowRankGradient(x.bfloat16(), d.bfloat16())
    assert g.rank() == 6 == torch.linalg.matrix_rank(g.to(torch.float32).dense()).item()


def matrix_rank_rule(dense, dtype):
    """torch.linalg.matrix_rank's default tolerance, with the eps of ``dtype``, on the dense matrix."""
    s = torch.linalg.svdvals(dense.double())
    if s.numel() == 0:
        return 0
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return int((s > s[0] * max(dense.shape) * eps).sum())


def mixed_gradients(seed=4):
    """T below, equal to and above the smaller dimension, a rank-deficient one, a zero one and an empty one."""
    g = torch.Generator().manual_seed(seed)
    grads = []
    for t in (1, 5, 9, 13, 4):
        x, d = torch.randn(t, 9, generator=g, dtype=torch.float64), torch.randn(t, 11, generator=g, dtype=torch.float64)
        grads.append(LowRankGradient(x, d))
    x = torch.randn(6, 9, generator=g, dtype=torch.float64)
    grads.append(LowRankGradient(torch.cat([x, x]), torch.randn(12, 11, generator=g, dtype=torch.float64)))
    grads += [LowRankGradient(torch.zeros(3, 9, dtype=torch.float64), torch.zeros(3, 11, dtype=torch.float64)),
              LowRankGradient(torch.zeros(0, 9, dtype=torch.float64), torch.zeros(0, 11, dtype=torch.float64))]
    return grads


def test_a_batch_equals_dense_linear_algebra_per_gradient():
    """One batch (zero-padded factors + lengths) answers for every gradient what the dense matrix says: singular
    values (zeros past each one's own count), rank by matrix_rank's rule, Frobenius norm, dense() and products."""
    grads = mixed_gradients()
    batch = LowRankGradient.stack(grads)
    assert batch.batch_shape == (len(grads),) and batch.num_tokens.tolist() == [1, 5, 9, 13, 4, 12, 3, 0]
    s = batch.svdvals()
    ranks, frobenius = batch.ranks_and_norms()
    assert ranks.dtype == torch.long
    for i, grad in enumerate(grads):
        dense = grad.dense()
        truth = torch.linalg.svdvals(dense)
        kept = min(grad.num_tokens, 9, 11)
        torch.testing.assert_close(s[i, :kept], truth[:kept], rtol=1e-10, atol=1e-12)
        assert bool((s[i, kept:] == 0).all())
        assert int(ranks[i]) == matrix_rank_rule(dense, torch.float64) == int(batch.rank()[i])
        torch.testing.assert_close(frobenius[i], dense.norm(), rtol=1e-12, atol=0)
        torch.testing.assert_close(batch.norm()[i], dense.norm(), rtol=1e-12, atol=0)
        torch.testing.assert_close(batch.dense()[i], dense)
        torch.testing.assert_close(batch[i].dense(), dense)
    assert [int(r) for r in ranks] == [1, 5, 9, 9, 4, 6, 0, 0]
    assert batch.rank(1e-6).tolist() == [matrix_rank_rule(g.dense(), torch.float64) for g in grads]
    # float32's eps for float64 factors: what matrix_rank says of the float32 dense gradient
    assert batch.rank(dtype=torch.float32).tolist() == [matrix_rank_rule(g.dense(), torch.float32) for g in grads]
    v = torch.randn(batch.shape[1], 2, dtype=torch.float64)
    torch.testing.assert_close(batch.matvec(v), batch.dense() @ v)
    with pytest.raises(ValueError, match="one module at a time"):
        LowRankGradient.stack([grads[0], LowRankGradient(torch.ones(2, 3), torch.ones(2, 4))])


@pytest.mark.parametrize("batch_shape", [(0,), (2, 0), (0, 3)])
def test_an_empty_batch_answers_with_empty_results_of_the_batch_shape(batch_shape):
    """No gradients (an empty selection of a batch): ranks, norms and singular values of shape ``batch_shape``
    (the singular values with their ``min(T, d_in, d_out)`` axis), not an error."""
    batch = LowRankGradient(torch.zeros(*batch_shape, 3, 4, dtype=torch.float64),
                            torch.zeros(*batch_shape, 3, 5, dtype=torch.float64))
    ranks, norms = batch.ranks_and_norms()
    assert ranks.shape == norms.shape == batch.rank().shape == batch.norm().shape == batch_shape
    assert ranks.dtype == torch.long and norms.dtype == torch.float64
    assert batch.svdvals().shape == (*batch_shape, 3) and batch.svdvals().dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_batch_on_the_gpu_answers_as_on_the_cpu():
    """Factors, lengths and each gradient's kept count meet on the factors' device: CUDA ranks and norms equal the
    CPU's (and come back on the CPU)."""
    batch = LowRankGradient.stack(mixed_gradients())
    on_gpu = LowRankGradient(batch.x.cuda(), batch.delta.cuda(), batch.lengths.cuda())
    (ranks, norms), (gpu_ranks, gpu_norms) = batch.ranks_and_norms(), on_gpu.ranks_and_norms()
    assert gpu_ranks.device.type == gpu_norms.device.type == "cpu"
    assert torch.equal(gpu_ranks, ranks)
    torch.testing.assert_close(gpu_norms, norms, rtol=1e-10, atol=0)
    torch.testing.assert_close(on_gpu.svdvals().cpu(), batch.svdvals(), rtol=1e-10, atol=1e-12)


def test_rank_tolerance_scales_with_the_larger_dimension():
    """A singular value planted between ``s_max * min(shape) * eps`` and ``s_max * max(shape) * eps``: below
    matrix_rank's cut-off (which uses max(shape)), so it does not count, for one gradient and in a batch."""
    g = torch.Generator().manual_seed(3)
    q1, _ = torch.linalg.qr(torch.randn(4, 2, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(400, 2, generator=g, dtype=torch.float64))
    eps = torch.finfo(torch.float64).eps
    sigma = torch.tensor([1.0, 50 * eps], dtype=torch.float64)  # 4 * eps < 50 * eps < 400 * eps
    grad = LowRankGradient((q1 * sigma).T.contiguous(), q2.T.contiguous())
    assert grad.shape == (4, 400)
    assert torch.linalg.matrix_rank(grad.dense()).item() == 1
    assert grad.rank() == 1
    assert LowRankGradient.stack([grad, grad]).rank().tolist() == [1, 1]
    assert grad.rank(tol=10 * eps) == 2  # an explicit tolerance below it counts it


def test_batches_cut_into_chunks_equal_one_batch(monkeypatch):
    """Cut into small batches (as on a CPU, to keep buffers cache-sized) or in one: the same ranks and norms."""
    from blens_fast import lowrank

    g = torch.Generator().manual_seed(7)
    grads = [LowRankGradient(torch.randn(t, 9, generator=g, dtype=torch.float64),
                             torch.randn(t, 11, generator=g, dtype=torch.float64)) for t in (3, 1, 12, 7, 0, 5, 9)]
    batch = LowRankGradient.stack(grads)
    monkeypatch.setitem(lowrank._BATCH_BYTES, "cpu", 1 << 40)
    whole = batch.ranks_and_norms()
    monkeypatch.setitem(lowrank._BATCH_BYTES, "cpu", 2 * 12 * (9 + 11) * 8)  # two of the longest per batch
    chunked = batch.ranks_and_norms()
    assert torch.equal(whole[0], chunked[0]) and whole[0].tolist() == [
        matrix_rank_rule(g_.dense(), torch.float64) for g_ in grads]
    torch.testing.assert_close(whole[1], chunked[1], rtol=1e-13, atol=0)


def test_batch_shape_is_kept_and_indexing_gives_single_gradients():
    grads = mixed_gradients()[:6]
    flat = LowRankGradient.stack(grads)
    grid = LowRankGradient(flat.x.reshape(2, 3, *flat.x.shape[1:]), flat.delta.reshape(2, 3, *flat.delta.shape[1:]),
                           flat.lengths.reshape(2, 3))
    ranks, norms = grid.ranks_and_norms()
    assert ranks.shape == norms.shape == (2, 3)
    assert ranks.reshape(-1).tolist() == flat.rank().tolist()
    single = grid[1, 2]
    assert single.batch_shape == () and single.num_tokens == grads[5].num_tokens
    assert isinstance(single.rank(), int) and single.norm().dim() == 0
    with pytest.raises(ValueError, match="lengths has shape"):
        LowRankGradient(flat.x, flat.delta, flat.lengths[:2])


def test_indexing_a_padded_batch():
    """A single gradient taken out of a batch holds its own rows only (no padding, no lengths); a sub-batch keeps
    the padding and its lengths."""
    grads = mixed_gradients()[:6]
    batch = LowRankGradient.stack(grads)
    for i, grad in enumerate(grads):
        single = batch[i]
        assert single.lengths is None
        assert torch.equal(single.x, grad.x) and torch.equal(single.delta, grad.delta)
    part = batch[2:5]
    assert part.lengths.tolist() == batch.lengths[2:5].tolist()
    assert torch.equal(part.x, batch.x[2:5]) and torch.equal(part.delta, batch.delta[2:5])
    with pytest.raises(IndexError, match="no batch dimensions"):
        grads[0][0]


def test_batched_products_and_svd_equal_dense_per_gradient():
    grads = mixed_gradients()[:5]
    batch = LowRankGradient.stack(grads)
    u = torch.randn(batch.shape[0], dtype=torch.float64)
    v = torch.randn(batch.shape[1], dtype=torch.float64)
    out, out_v = batch.rmatvec(u), batch.matvec(v)  # vectors: one result vector per gradient
    assert out.shape == (5, batch.shape[1]) and out_v.shape == (5, batch.shape[0])
    u_all, s_all, vh_all = batch.svd()
    for i, grad in enumerate(grads):
        dense = grad.dense()
        torch.testing.assert_close(out[i], dense.T @ u)
        torch.testing.assert_close(out_v[i], dense @ v)
        torch.testing.assert_close(u_all[i] @ torch.diag(s_all[i]) @ vh_all[i], dense)
    top, s1, vh1 = grads[2].svd(1)  # k=1 is in range
    torch.testing.assert_close(s1, torch.linalg.svdvals(grads[2].dense())[:1])
    assert top.shape == (grads[2].shape[0], 1) and vh1.shape == (1, grads[2].shape[1])


def test_conversion_keeps_lengths_and_converts_both_factors():
    batch = LowRankGradient.stack(mixed_gradients()[:4])
    for converted in (batch.to(torch.float32), batch.to(dtype=torch.float32)):
        assert converted.x.dtype == converted.delta.dtype == torch.float32
        assert torch.equal(converted.lengths, batch.lengths)


def test_product_and_sum_errors_name_the_operand():
    x, d = factors(6, 9, 13)
    g = LowRankGradient(x, d)
    with pytest.raises(ValueError, match=r"^v has shape \(4,\): expected 13 rows \(shape\[1\] of the gradient\)$"):
        g.matvec(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^u has shape \(4,\): expected 9 rows \(shape\[0\] of the gradient\)$"):
        g.rmatvec(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="cannot add gradients of shape"):
        g + LowRankGradient(*factors(6, 9, 12))  # another shape
    with pytest.raises(ValueError, match="index a batch first"):
        g + LowRankGradient.stack([g, g])
    with pytest.raises(ValueError, match="index a batch first"):
        LowRankGradient.stack([g, g]) + g


def test_repr_names_batch_shape_tokens_and_dtype():
    x, d = factors(6, 9, 13)
    g = LowRankGradient(x, d)
    assert repr(g) == "LowRankGradient(shape=(9, 13), tokens=6, dtype=torch.float64)"
    batch = LowRankGradient.stack([g, LowRankGradient(*factors(2, 9, 13))])
    assert repr(batch) == "LowRankGradient(batch=(2,), shape=(9, 13), tokens=6, dtype=torch.float64)"


def test_rank_in_another_dtype_uses_that_dtype_eps():
    """A singular value of 1e-9 (relative): above float64's cut-off, below float32's (4 x 400 gradient)."""
    g = torch.Generator().manual_seed(5)
    q1, _ = torch.linalg.qr(torch.randn(4, 2, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(400, 2, generator=g, dtype=torch.float64))
    grad = LowRankGradient((q1 * torch.tensor([1.0, 1e-9], dtype=torch.float64)).T.contiguous(), q2.T.contiguous())
    assert grad.rank() == 2 and grad.rank(dtype=torch.float32) == 1
    assert LowRankGradient.stack([grad, grad]).rank(dtype=torch.float32).tolist() == [1, 1]


def test_a_sum_leaves_out_the_padding_rows_of_a_single_gradient():
    x, d = factors(5, 7, 11, seed=3)
    padded = LowRankGradient(x, d, torch.tensor(3))  # rows 3 and 4 are padding (not zero here)
    other = LowRankGradient(*factors(2, 7, 11, seed=4))
    total = padded + other
    assert total.num_tokens == 5 and total.lengths is None
    torch.testing.assert_close(total.dense(), x[:3].T @ d[:3] + other.dense())


def test_a_batch_without_lengths_and_a_padded_single_gradient():
    x, d = factors(5, 7, 11, seed=6)
    batch = LowRankGradient(torch.stack([x, 2 * x]), torch.stack([d, d]))  # no padding, no lengths
    assert batch.lengths is None and batch[1].num_tokens == 5
    torch.testing.assert_close(batch[1].dense(), 2 * x.T @ d)
    padded = LowRankGradient(x, d, torch.tensor(3))  # rows 3 and 4 are padding
    s = padded.svdvals()
    assert s.shape == (3,)
    torch.testing.assert_close(s, torch.linalg.svdvals(x[:3].T @ d[:3])[:3])


def count_svds(monkeypatch):
    """Counts the batched core SVDs (one call of ``lowrank._svdvals`` per chunk of a batch) from now on."""
    from blens_fast import lowrank

    calls = []
    real = lowrank._svdvals
    monkeypatch.setattr(lowrank, "_svdvals", lambda *args: calls.append(1) or real(*args))
    return calls


def test_rank_norm_and_svdvals_share_one_svd(monkeypatch):
    """One SVD per gradient (or per batch) however many of rank, norm, svdvals and ranks_and_norms are asked, with any
    tolerance or eps dtype; the answers are those of a gradient asked once."""
    calls = count_svds(monkeypatch)
    x, d = factors(6, 9, 13)
    g = LowRankGradient(x, d)
    s, rank, norm = g.svdvals(), g.rank(), g.norm()
    assert g.ranks_and_norms(1e-3, dtype=torch.float32)[0] == rank and g.rank(tol=1e9) == 0 and len(calls) == 1
    torch.testing.assert_close(s, torch.linalg.svdvals(x.T @ d)[:6], rtol=1e-10, atol=0)
    torch.testing.assert_close(norm, (x.T @ d).norm(), rtol=1e-12, atol=0)
    batch = LowRankGradient.stack(mixed_gradients())
    ranks, norms = batch.ranks_and_norms()
    assert torch.equal(batch.rank(), ranks) and torch.equal(batch.norm(), norms) and batch.svdvals().shape[0] == 8
    assert len(calls) == 2
    assert LowRankGradient(x, d).rank() == rank and len(calls) == 3  # another gradient: its own SVD


def test_a_gradient_is_frozen_so_its_cached_spectrum_cannot_go_stale(monkeypatch):
    """The factors cannot be rebound (the cache can never describe other factors); a converted, indexed or summed
    gradient is a new object with a spectrum of its own."""
    import dataclasses

    calls = count_svds(monkeypatch)
    x, d = factors(5, 7, 11)
    g = LowRankGradient(x, d)
    before = g.svdvals()
    for field, value in (("x", 2 * x), ("delta", d[:2]), ("lengths", torch.tensor(2))):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(g, field, value)
    torch.testing.assert_close(g.to(torch.float32).svdvals(), before, rtol=1e-5, atol=0)
    doubled = g + g  # 10 rows, rank 5: its sixth and seventh singular values are rounding noise
    torch.testing.assert_close(doubled.svdvals()[:5], 2 * before, rtol=1e-10, atol=0)
    batch = LowRankGradient.stack([g, doubled])
    batch.rank()
    torch.testing.assert_close(batch[1].norm(), 2 * g.norm(), rtol=1e-10, atol=0)
    assert len(calls) == 5 and g.svdvals() is not None and len(calls) == 5
