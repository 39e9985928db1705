"""gradient_stats: per-example norms and the streaming rank-r summed gradient against dense sums."""
import pytest
import torch

from blens_fast.capture import capture
from blens_fast.stats import GradientStats, StatsAccumulator, gradient_stats, sketch_sizes
from tests.helpers import make_tiny_model, prompt_target_ids

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["The capital of France is", "Danielle Darrieux speaks", "The Eiffel tower is in", "Python is a",
           "Ten plus two is", "My favourite colour is"]
TARGETS = ["Paris", "French", "Paris", "language", "twelve", "blue"]


def dense_sum(model, tokenizer, prompts, targets, key):
    cap = capture(model, tokenizer, prompts, targets, layers=[key[0]], modules=[key[1]])
    grads = [cap.gradient(key[0], key[1], i) for i in range(len(prompts))]
    return sum(g.dense().double() for g in grads), torch.stack([g.norm() for g in grads])


def assert_same_subspace(u, u_dense, rtol):
    # columns equal up to sign
    cos = (u.double() * u_dense.double()).sum(0).abs()
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_exact_when_the_sum_has_low_rank(tokenizer, arch):
    """The last layer's summed gradient has rank <= k here, so the sketch reconstructs it exactly."""
    model = make_tiny_model(arch)
    records = [{"id": f"r{i}", "prompt": p, "target": t} for i, (p, t) in enumerate(zip(PROMPTS[:2], TARGETS[:2]))]
    stats = gradient_stats(model, tokenizer, records, layers=[1], modules=["mlp.in", "mlp.out"], rank=3,
                           batch_size=1, impl="torch")
    assert isinstance(stats, GradientStats) and stats.ids == ("r0", "r1")
    for key, summed in stats.summed.items():
        dense, norms = dense_sum(model, tokenizer, PROMPTS[:2], TARGETS[:2], key)
        assert summed.shape == tuple(dense.shape)
        rank = torch.linalg.matrix_rank(dense.float()).item()
        assert rank <= stats.sketch[0]
        u, s, vh = torch.linalg.svd(dense)
        r = min(3, rank)
        torch.testing.assert_close(summed.singular_values[:r], s[:r], rtol=1e-5, atol=1e-7 * s[0].item())
        assert_same_subspace(summed.u[:, :r], u[:, :r], 1e-4)
        assert_same_subspace(summed.v[:, :r], vh[:r].T, 1e-4)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        torch.testing.assert_close(summed.dense(), best, rtol=1e-4, atol=1e-5 * s[0].item())
        assert summed.frobenius == pytest.approx(dense.norm().item(), rel=1e-5)
        assert summed.residual <= 1e-5 * dense.norm().item()
        torch.testing.assert_close(stats.norms[key], norms, rtol=1e-5, atol=0)
        assert summed.sum_of_norms == pytest.approx(norms.sum().item(), rel=1e-5)


def test_streaming_sketch_tolerance_on_a_full_rank_sum():
    """A sum of rank > k: the rank-r part and the norm estimate are within their documented tolerances."""
    g = torch.Generator().manual_seed(0)
    p, q = 60, 90
    basis_u = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64)).Q
    basis_v = torch.linalg.qr(torch.randn(q, p, generator=g, dtype=torch.float64)).Q
    spectrum = 0.6 ** torch.arange(p, dtype=torch.float64)  # fast decay, as summed gradients show
    acc = StatsAccumulator({(0, "mlp.out"): (p, q)}, rank=4, impl="torch")
    total = torch.zeros(p, q, dtype=torch.float64)
    for chunk in torch.randperm(p, generator=g).split(6):  # each example holds 6 of the sum's components ...
        x = basis_u[:, chunk].T * spectrum[chunk, None]
        d = basis_v[:, chunk].T
        noise_x = torch.randn(3, p, generator=g, dtype=torch.float64)  # ... and a pair that cancels in the sum
        noise_d = torch.randn(3, q, generator=g, dtype=torch.float64)
        x, d = torch.cat([x, noise_x, noise_x]), torch.cat([d, noise_d, -noise_d])
        total += x.T @ d
        acc.update_factors((0, "mlp.out"), [x.float()], [d.float()])
    stats = acc.finalize()
    summed = stats.summed[(0, "mlp.out")]
    s = torch.linalg.svdvals(total)
    assert torch.linalg.matrix_rank(total).item() > acc.sizes[0]
    rel = (summed.singular_values - s[:4]).abs() / s[:4]
    assert rel[0] < 1e-3 and rel.max() < 2e-2
    assert summed.frobenius == pytest.approx(total.norm().item(), rel=0.02)
    best_error = (s[4:] ** 2).sum().sqrt().item() / total.norm().item()
    error = (summed.dense() - total).norm().item() / total.norm().item()
    assert error < 1.5 * best_error + 1e-6
    # approximation_error estimates the relative error of the rank-k sketch Q B itself
    k = stats.sketch[0]
    sketch = acc.sketches[(0, "mlp.out")]
    basis = torch.linalg.qr(sketch.y[:, :k].double()).Q
    sketched = total.T if sketch.swap else total
    _, left_t = acc._test(*sketched.shape)
    core = torch.linalg.lstsq(left_t.double().T @ basis, sketch.w.double()).solution
    sketch_error = (basis @ core - sketched).norm().item() / total.norm().item()
    assert sketch_error / 3 < summed.approximation_error < 3 * sketch_error
    assert summed.energy_share == pytest.approx(1 - best_error ** 2, abs=0.01)


def test_merged_states_equal_one_pass(tokenizer):
    model = make_tiny_model("gpt2")
    records = list(zip(PROMPTS, TARGETS))
    keys = {(0, "mlp.in"): (32, 128)}
    whole = StatsAccumulator(keys, rank=2, impl="torch")
    halves = [StatsAccumulator(keys, rank=2, impl="torch") for _ in range(2)]
    for i in range(0, len(records), 2):
        cap = capture(model, tokenizer, [r[0] for r in records[i:i + 2]], [r[1] for r in records[i:i + 2]],
                      layers=[0], modules=["mlp.in"])
        whole.update(cap, [i, i + 1])
        halves[(i // 2) % 2].update(cap, [i, i + 1])
    halves[0].merge(halves[1])
    a, b = whole.finalize(), halves[0].finalize(order=list(range(len(records))))
    torch.testing.assert_close(a.summed[(0, "mlp.in")].singular_values, b.summed[(0, "mlp.in")].singular_values,
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(a.norms[(0, "mlp.in")], b.norms[(0, "mlp.in")])
    # token counts: the one-pass state, the merged state and the tokenizer (counted here) agree
    tokens = sum(len(p) + len(t) - 1 for p, t in (prompt_target_ids(tokenizer, *r) for r in records))
    assert a.summed[(0, "mlp.in")].num_tokens == b.summed[(0, "mlp.in")].num_tokens == tokens
    assert list(b.to_pandas().tokens) == [tokens]
    other = StatsAccumulator(keys, rank=3, impl="torch")
    with pytest.raises(ValueError, match="different settings"):
        other.merge(halves[1])


def test_saved_state_round_trips_and_refuses_damaged_files(tokenizer, tmp_path):
    model = make_tiny_model("gpt2")
    keys = {(1, "mlp.out"): (128, 32)}
    acc = StatsAccumulator(keys, rank=2, impl="torch", seed=3)
    acc.update(capture(model, tokenizer, PROMPTS[:3], TARGETS[:3], layers=[1], modules=["mlp.out"]), ["a", "b", "c"])
    acc.save(tmp_path / "state.safetensors")
    back = StatsAccumulator.load(tmp_path / "state.safetensors", impl="torch")
    assert back.ids == ["a", "b", "c"] and back.sizes == acc.sizes and back.seed == 3
    one, two = acc.finalize(), back.finalize()
    torch.testing.assert_close(two.summed[(1, "mlp.out")].singular_values, one.summed[(1, "mlp.out")].singular_values)
    assert two.summed[(1, "mlp.out")].num_tokens == one.summed[(1, "mlp.out")].num_tokens
    torch.testing.assert_close(two.norms[(1, "mlp.out")], one.norms[(1, "mlp.out")])
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="bad.safetensors' is not a readable blens_fast statistics state"):
        StatsAccumulator.load(tmp_path / "bad.safetensors")


def test_impls_agree_and_tables(tokenizer):
    # Triton runs on CUDA tensors, or on CPU tensors through the interpreter where there is no GPU
    model = make_tiny_model("gpt_neox").to("cuda" if torch.cuda.is_available() else "cpu")
    records = list(zip(PROMPTS[:3], TARGETS[:3]))
    ref = gradient_stats(model, tokenizer, records, layers=[0], rank=2, batch_size=2, impl="torch")
    fast = gradient_stats(model, tokenizer, records, layers=[0], rank=2, batch_size=2, impl="triton")
    for key in ref.summed:
        torch.testing.assert_close(fast.summed[key].singular_values, ref.summed[key].singular_values, rtol=1e-4,
                                   atol=0)
        torch.testing.assert_close(fast.norms[key], ref.norms[key], rtol=1e-5, atol=0)
    summary = ref.to_pandas()
    assert list(summary[["layer", "module"]].itertuples(index=False, name=None)) == [(0, "mlp.in"), (0, "mlp.out")]
    assert {"frobenius", "energy_share", "residual", "coherence", "top_singular_value"} <= set(summary.columns)
    assert (summary.examples == 3).all()
    spectrum = ref.to_pandas("spectrum")
    assert len(spectrum) == 4
    assert spectrum.groupby(["layer", "module"]).energy_share.apply(lambda e: e.is_monotonic_increasing).all()
    assert ((spectrum.energy_share > 0) & (spectrum.energy_share <= 1)).all()
    norms = ref.to_pandas("norms")
    assert len(norms) == 6 and list(norms.id[:3]) == [0, 1, 2]
    with pytest.raises(ValueError, match="table='rows' is not one of"):
        ref.to_pandas("rows")


def test_argument_errors(tokenizer):
    model = make_tiny_model("gpt2")
    with pytest.raises(ValueError, match="rank=0 is out of range"):
        gradient_stats(model, tokenizer, [("a b", "c")], rank=0)
    with pytest.raises(ValueError, match="sketch_size=2 is smaller than rank=3"):
        sketch_sizes(3, sketch_size=2)
    with pytest.raises(ValueError, match=r"records\[0\] has no 'target' field"):
        gradient_stats(model, tokenizer, [{"prompt": "x"}])
    with pytest.raises(ValueError, match="records is empty"):
        gradient_stats(model, tokenizer, [])
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        gradient_stats(model, tokenizer, [("a b", "c")], layers=[5])
    assert sketch_sizes(8) == (17, 35, 8)


def test_a_state_keeps_explicit_sizes_and_defaults(tokenizer, tmp_path):
    """Non-default sketch sizes survive save/load; a state read back merges with a live one (same settings); a state
    written before gradients were (in, out) everywhere (its modules name a weight layout) reads the same;
    from_state defaults to the CPU and the automatic kernel choice."""
    model = make_tiny_model("gpt2")
    keys = {(0, "mlp.in"): (32, 128)}
    acc = StatsAccumulator(keys, rank=2, sketch_size=6, cosketch_size=7, residual_size=3, impl="torch", seed=1)
    acc.update(capture(model, tokenizer, PROMPTS[:2], TARGETS[:2], layers=[0], modules=["mlp.in"]), ["a", "b"])
    back = StatsAccumulator.load(acc.save(tmp_path / "state.safetensors"), impl="torch")
    assert back.sizes == acc.sizes == (6, 7, 3) and back.impl == "torch"  # the default for rank 2: (5, 11, 8)
    tensors, metadata = acc.state()
    older = {**metadata, "modules": [{**m, "layout": "in_out"} for m in metadata["modules"]]}
    assert torch.equal(StatsAccumulator.from_state(tensors, older).sketches[(0, "mlp.in")].y, acc.sketches[
        (0, "mlp.in")].y)
    restored = StatsAccumulator.from_state(*acc.state())
    assert restored.device == torch.device("cpu") and restored.impl == "auto" and restored.sizes == (6, 7, 3)
    back.merge(acc)
    assert back.ids == ["a", "b", "a", "b"] and back.sketches[(0, "mlp.in")].tokens == 2 * acc.sketches[
        (0, "mlp.in")].tokens


def test_state_of_an_empty_accumulator_and_files_without_statistics(tmp_path):
    from safetensors.torch import save_file

    keys = {(0, "mlp.in"): (32, 128)}
    tensors, metadata = StatsAccumulator(keys, rank=2).state()
    assert tensors["m0.norms_sq"].dtype == torch.float64 and tensors["m0.norms_sq"].numel() == 0
    path = StatsAccumulator(keys, rank=2).save(tmp_path / "empty.safetensors")
    assert StatsAccumulator.load(path).impl == "auto" and StatsAccumulator.load(path).ids == []
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match=r"plain.safetensors' is not a readable .* \(no statistics metadata\)"):
        StatsAccumulator.load(tmp_path / "plain.safetensors")
