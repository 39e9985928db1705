"""The reference pipeline (blens_fast.lens_reference) against capture + lens on tiny models of several architectures,
its rank rule, and 16-bit benches that agree for the right reason."""
import pytest
import torch

from blens_fast import bind, capture
from blens_fast.bench import BenchConfig, run_bench
from blens_fast.lens import lens_lists
from blens_fast.lens_reference import RankRule, backward, reference_lens
from blens_fast.lists import LENS_MODULES, LIST_NAMES

from ..helpers import ARCHITECTURES, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, TARGET = "The mother tongue of Danielle Darrieux is", " French"


def assert_close(actual, expected):
    """Equal up to float32 rounding of differently ordered sums (a padded batch against one prompt)."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def ctx(request, tokenizer):
    return bind(make_tiny_model(request.param), tokenizer)


def test_gradient_ranks_and_norms_equal_those_of_the_factors(ctx):
    found = reference_lens(ctx, PROMPT, TARGET, k=3)
    cap = capture(ctx, [PROMPT], [TARGET], modules=found.modules)
    for mi, module in enumerate(found.modules):
        ranks, norms = cap.ranks_and_norms([module], dtype=torch.float32)[module]
        assert torch.equal(found.ranks[:, mi], ranks[:, 0]), module
        torch.testing.assert_close(found.norms[:, mi], norms[:, 0], rtol=1e-5, atol=0)
    assert all(p.grad is None for p in ctx.model.parameters())


def test_dense_gradients_and_vectors_equal_the_capture(ctx):
    layers = ctx.check_layers(None)
    modules = LENS_MODULES
    ctx.model.zero_grad(set_to_none=True)
    found = backward(ctx, PROMPT, TARGET, layers)
    try:
        cap = capture(ctx, [PROMPT], [TARGET], modules=modules)
        for layer in layers:
            for module in modules:
                found_parts = ctx.module_parts(module)  # a gated MLP's mlp.in: gate and up side by side
                dense = found_parts.join({part: ctx.grad_io(layer, part) for part in found_parts.parts})
                assert_close(dense, cap.gradient(layer, module, 0).dense())
    finally:
        ctx.model.zero_grad(set_to_none=True)
    assert_close(found.x, torch.stack([cap.x[(layer, modules[0])][0] for layer in layers]))
    assert_close(found.delta, torch.stack([cap.delta[(layer, "mlp.out")][0] for layer in layers]))
    assert found.input_ids == cap.examples[0].input_ids  # its own tokenization reads what the package's does


@pytest.mark.parametrize("unit_norm", [False, True])
def test_token_lists_equal_the_fused_lens_on_nondegenerate_rows(ctx, unit_norm):
    found = reference_lens(ctx, PROMPT, TARGET, k=8, unit_norm=unit_norm)
    fused = lens_lists(ctx, capture(ctx, [PROMPT], [TARGET]), k=8, unit_norm=unit_norm, impl="auto")
    for name in LIST_NAMES:
        reference = found.lists[name]
        indices, values, _, target_ranks, degenerate = fused[name]
        assert torch.equal(reference.degenerate, degenerate), name
        keep = ~reference.degenerate
        assert keep.sum() >= len(found.layers)  # at least the last position of every layer
        assert torch.equal(reference.indices[keep], indices[keep]), name
        torch.testing.assert_close(reference.values[keep], values[keep], rtol=1e-4, atol=1e-5)
        gap = (reference.target_rank - target_ranks).abs()
        assert (gap[keep] <= reference.target_slack[keep]).all(), name


def test_rank_rule_resolves_a_rounded_gradient_and_is_matrix_rank_in_float32():
    torch.manual_seed(0)
    x, delta = torch.randn(6, 64, dtype=torch.float64), torch.randn(6, 256, dtype=torch.float64)
    exact = x.T @ delta
    rounded = exact.to(torch.bfloat16).float()  # what autograd leaves in a bfloat16 weight's .grad
    norm = torch.linalg.matrix_norm(rounded)
    assert int(torch.linalg.matrix_rank(rounded)) == 64  # rounding noise: full rank by matrix_rank's default
    rule = RankRule.for_gradient(torch.bfloat16, rounded.shape)
    assert rule.matrix_rank(rounded, norm) == 6
    assert int(rule.count(torch.linalg.svdvals(exact))) == 6
    single = exact.float()
    rule32 = RankRule.for_gradient(torch.float32, single.shape)
    assert rule32.matrix_rank(single, torch.linalg.matrix_norm(single)) == int(torch.linalg.matrix_rank(single))


@pytest.mark.parametrize("model", ["tiny", "tiny-llama"])
def test_bfloat16_bench_agrees_on_gradient_ranks_and_the_same_vectors(model):
    report = run_bench(BenchConfig(model=model, dtype="bfloat16", prompts=(2,), naive_prompts=2, threads=1,
                                   progress=False), log=lambda *_: None)
    (run,) = report["runs"]
    agreement = run["agreement"]
    assert run["agree"], agreement
    assert agreement["gradient_rank_equal"] == 1.0
    assert agreement["same_vectors_topk_tokens_equal"] == 1.0 and agreement["same_vectors_target_rank_equal"] == 1.0
    ranks = run["ranks"]["gradient_ranks"]
    assert ranks["naive"] == ranks["blens_fast"]
    flat = torch.tensor(ranks["blens_fast"]), torch.tensor(ranks["blens_fast_without_floor"])
    assert (flat[1] >= flat[0]).all() and (flat[0] >= 1).all()  # the factors resolve at least the floor's rank
