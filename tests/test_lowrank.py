"""LowRankGradient against dense linear algebra."""
import pytest
import torch

from blens_fast import LowRankGradient
from blens_fast.lowrank import norms, numerical_rank, ranks_and_norms, spectra


def factors(t, d_in, d_out, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, d_in, generator=g, dtype=dtype), torch.randn(t, d_out, generator=g, dtype=dtype)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_dense_layout_and_shape(layout):
    x, d = factors(5, 7, 11)
    g = LowRankGradient(x, d, layout)
    expected = x.T @ d if layout == "in_out" else d.T @ x
    assert g.shape == tuple(expected.shape)
    torch.testing.assert_close(g.dense(), expected)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_matvec_rmatvec_norm_svd(layout):
    x, d = factors(6, 9, 13)
    g = LowRankGradient(x, d, layout)
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
    with pytest.raises(ValueError, match="expected 9 rows|expected 13 rows"):
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
    g = LowRankGradient(x, d, "in_out")
    assert g.rank() == torch.linalg.matrix_rank(g.dense()).item() == 5


def test_small_singular_values_survive():
    """A Gram-matrix route loses singular values below sqrt(eps) of the largest; the QR route keeps them."""
    t, n = 6, 40
    q1, _ = torch.linalg.qr(torch.randn(n, t, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n + 10, t, dtype=torch.float64))
    sigma = torch.logspace(0, -11, t, dtype=torch.float64)
    x = (q1 * sigma).T.contiguous()  # X^T D = q1 diag(sigma) q2^T
    d = q2.T.contiguous()
    g = LowRankGradient(x, d, "in_out")
    torch.testing.assert_close(g.svdvals(), sigma, rtol=1e-6, atol=0)
    assert g.rank() == t


def test_addition_concatenates_factors():
    a = LowRankGradient(*factors(3, 5, 7, seed=1), "in_out")
    b = LowRankGradient(*factors(2, 5, 7, seed=2), "in_out")
    total = a + b
    assert total.num_tokens == 5
    torch.testing.assert_close(total.dense(), a.dense() + b.dense())
    with pytest.raises(ValueError, match="cannot add"):
        a + LowRankGradient(*factors(2, 5, 7), "out_in")


def test_constructor_checks():
    with pytest.raises(ValueError, match="x has 3 rows but delta has 2"):
        LowRankGradient(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="layout='rows'"):
        LowRankGradient(torch.zeros(3, 4), torch.zeros(3, 4), "rows")


def test_half_precision_factors_use_float32_tolerance():
    x, d = factors(6, 64, 96, dtype=torch.float32)
    g = LowRankGradient(x.bfloat16(), d.bfloat16())
    assert g.rank() == 6 == torch.linalg.matrix_rank(g.to(torch.float32).dense()).item()


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_spectra_and_norms_batched_equal_one_at_a_time(layout):
    """Zero-padded batched QR/SVD gives every gradient's own singular values (T below, equal to and above the
    smaller dimension; a rank-deficient one) and norms; ranks follow matrix_rank's rule."""
    g = torch.Generator().manual_seed(4)
    grads = []
    for t in (1, 5, 9, 13, 4):
        x, d = torch.randn(t, 9, generator=g, dtype=torch.float64), torch.randn(t, 11, generator=g, dtype=torch.float64)
        grads.append(LowRankGradient(x, d, layout))
    x = torch.randn(6, 9, generator=g, dtype=torch.float64)
    grads.append(LowRankGradient(torch.cat([x, x]), torch.randn(12, 11, generator=g, dtype=torch.float64), layout))
    for batched, grad in zip(spectra(grads), grads):
        torch.testing.assert_close(batched, grad.svdvals(), rtol=1e-10, atol=1e-12)
        assert numerical_rank(batched, grad.shape, grad.x.dtype) == grad.rank()
    torch.testing.assert_close(norms(grads), torch.stack([grad.norm() for grad in grads]), rtol=1e-12, atol=0)
    assert spectra([]) == [] and norms([]).shape == (0,) and all(t.shape == (0,) for t in ranks_and_norms([]))
    grads += [LowRankGradient(torch.zeros(3, 9, dtype=torch.float64), torch.zeros(3, 11, dtype=torch.float64), layout),
              LowRankGradient(torch.zeros(0, 9, dtype=torch.float64), torch.zeros(0, 11, dtype=torch.float64), layout)]
    ranks, frobenius = ranks_and_norms(grads)
    assert ranks.dtype == torch.long and ranks.tolist() == [grad.rank() for grad in grads] == [1, 5, 9, 9, 4, 6, 0, 0]
    torch.testing.assert_close(frobenius, torch.stack([grad.norm() for grad in grads]), rtol=1e-12, atol=0)
    assert ranks_and_norms(grads, 1e-6)[0].tolist() == [grad.rank(1e-6) for grad in grads]
    # float32's eps for float64 factors: what matrix_rank says of the float32 dense gradient
    assert ranks_and_norms(grads, dtype=torch.float32)[0].tolist() == [
        numerical_rank(grad.svdvals(), grad.shape, torch.float32) for grad in grads]
    with pytest.raises(ValueError, match="one module at a time"):
        spectra([grads[0], LowRankGradient(torch.ones(2, 3), torch.ones(2, 4), layout)])


def test_ranks_and_norms_in_chunks_equal_one_batch(monkeypatch):
    """Cut into small batches (as on a CPU, to keep buffers cache-sized) or in one: the same ranks and norms."""
    from blens_fast import lowrank

    g = torch.Generator().manual_seed(7)
    grads = [LowRankGradient(torch.randn(t, 9, generator=g, dtype=torch.float64),
                             torch.randn(t, 11, generator=g, dtype=torch.float64)) for t in (3, 1, 12, 7, 0, 5, 9)]
    monkeypatch.setitem(lowrank._BATCH_BYTES, "cpu", 1 << 40)
    whole = ranks_and_norms(grads)
    monkeypatch.setitem(lowrank._BATCH_BYTES, "cpu", 2 * 12 * (9 + 11) * 8)  # two of the longest per batch
    assert len(lowrank._chunks(grads)) == 4
    chunked = ranks_and_norms(grads)
    assert torch.equal(whole[0], chunked[0]) and whole[0].tolist() == [g_.rank() for g_ in grads]
    torch.testing.assert_close(whole[1], chunked[1], rtol=1e-13, atol=0)
