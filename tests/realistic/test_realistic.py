"""The realistic-size tier: GPT-2-small dimensions (d=768, 4d=3072, V=50,257; random init; float32; 2 layers) through
every public call. Tiny configs hide size bugs (an index built in float32 broke every model with a tensor over 2^24
elements); these tests run what users run. Out of `make test`, in `make test-realistic` and CI."""
import pytest
import torch
import transformers

import blens_fast as bl
from blens_fast.counterfact import fact_texts, load
from tests.helpers import autograd_loss, lens_logits64, threads

pytestmark = pytest.mark.realistic
PROMPTS = ["The mother tongue of Danielle Darrieux is", "The Eiffel Tower is located in the city of",
           "Toko Yasuda, the"]
TARGETS = [" French", " Paris", " guitar"]


@pytest.fixture(scope="module")
def ctx(tokenizer):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(config).eval()
    with threads(2):
        yield bl.bind(model, tokenizer)


def test_capture_matches_autograd_at_real_width(ctx):
    cap = bl.capture(ctx, PROMPTS, TARGETS)
    model = ctx.model
    for p in model.parameters():
        p.grad = None
    for prompt, target in zip(PROMPTS, TARGETS):
        autograd_loss(model, ctx.tokenizer, prompt, target).backward()
    for module, weight in (("mlp.in", model.transformer.h[1].mlp.c_fc.weight),
                           ("mlp.out", model.transformer.h[1].mlp.c_proj.weight)):
        dense = cap.gradient(1, module).dense()
        assert dense.shape == (768, 3072) if module == "mlp.in" else (3072, 768)
        assert ((dense - weight.grad).norm() / weight.grad.norm()).item() < 1e-5
    ranks, norms = cap.ranks_and_norms()["mlp.out"]
    assert ranks.shape == (2, 3) and (ranks[1] == 1).all()  # last layer, one-token targets: rank 1
    model.zero_grad(set_to_none=True)


def test_rank_table_lens_and_project(ctx):
    table = bl.rank(ctx, PROMPTS, TARGETS, progress=False)
    assert len(table) == 3 * 2 * 2 and (table["rank"] <= table["max_rank"]).all()
    report = bl.lens(ctx, PROMPTS[0], TARGETS[0], k=10)
    cap = bl.capture(ctx, PROMPTS[0], TARGETS[0])
    vectors = cap.x[(0, "mlp.in")][0]
    expected = lens_logits64(ctx.model, vectors).topk(10).indices
    assert torch.equal(report.indices["ff1_top"][0], expected)
    for impl in ("cpu", "torch"):
        found = bl.project(ctx, vectors, k=10, impl=impl)
        assert torch.equal(found.indices, expected)


@pytest.mark.parametrize("options", [dict(method="forward_shift", layer=1, scale=0.5),
                                     dict(method="forward_shift", normalize_key=True, layer=1, scale=2.0),
                                     dict(method="forward_shift"),  # the uncalibrated default: auto scale
                                     dict(method="gradient", layer=0, lr=1.0, steps=2)],
                         ids=["paper", "normalised", "default", "gradient"])
def test_every_edit_method_reverts_bit_for_bit(ctx, options):
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    with bl.edit(ctx, PROMPTS[0], " English", skip_if_argmax=False, **options) if options["method"] != "gradient" \
            else bl.edit(ctx, PROMPTS[0], " English", **options) as applied:
        assert applied.updates
    assert all(torch.equal(v, before[k]) for k, v in ctx.model.state_dict().items())


def test_whitened_edit_and_counterfact_evaluation(ctx):
    whitening = bl.editing.ff2_whitening(ctx, 1, fact_texts(load(n=10)), file_cache=False, progress=False)
    assert whitening.inverse.shape == (3072, 3072)
    row = bl.evaluate_counterfact(ctx, load(n=7), n=5, method="forward_shift", whiten=whitening, layer=1, scale=4.0,
                                  progress=False)
    assert row["n"] == 5 and row["revert_failures"] == 0 and row["parameters_restored"]


def test_gradient_stats(ctx):
    stats = bl.gradient_stats(ctx, load(n=6), rank=4, batch_size=3, progress=False)
    summary = stats.to_pandas()
    assert len(summary) == 4 and (summary.examples == 6).all() and (summary.frobenius > 0).all()


def test_projection_beyond_2_to_the_31_logits():
    """N x V > 2^31 (64-bit offsets; a small d keeps it affordable) in the fused CPU kernel, checked on sampled rows
    against float64 logits."""
    n, v = 44_000, 50_000
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, 2, generator=g)
    w = torch.randn(v, 2, generator=g)
    assert n * v > 2 ** 31
    res = bl.topk_logits(h, w, k=3, impl="cpu")
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1])
    expected = (h[rows].double() @ w.double().T).sort(dim=-1, descending=True, stable=True).indices[:, :3]
    assert torch.equal(res.indices[rows], expected)


@pytest.mark.parametrize("impl", ["cpu", "torch"])
def test_16_bit_projection_at_real_vocabulary_size(impl):
    """bfloat16 at GPT-2 dims: on a CPU with AMX the C++ path packs the 50,257-row weight in 64-column slices
    (a narrow last one); exact top/bottom lists against float64 logits of the same 16-bit inputs."""
    from blens_fast.ops.topk import topk_bottomk_logits

    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 768, generator=g).bfloat16()
    w = (0.05 * torch.randn(50257, 768, generator=g)).bfloat16()
    res = topk_bottomk_logits(h, w, k=10, impl=impl)
    truth = h.double() @ w.double().T
    for part, largest in ((res.top, True), (res.bottom, False)):
        wanted = truth.topk(10, largest=largest)
        assert torch.equal(part.indices, wanted.indices), (impl, largest)
        assert (part.values.double() - wanted.values).abs().max().item() < 1e-4


def test_batched_products_with_a_vector_at_real_width():
    g = torch.Generator().manual_seed(1)
    grads = [bl.LowRankGradient(torch.randn(t, 768, generator=g), torch.randn(t, 3072, generator=g))
             for t in (5, 16, 9)]
    batch = bl.LowRankGradient.stack(grads)
    v, u = torch.randn(batch.shape[1], generator=g), torch.randn(batch.shape[0], generator=g)
    out_v, out_u = batch.matvec(v), batch.rmatvec(u)
    for i, grad in enumerate(grads):
        dense = grad.dense().double()
        torch.testing.assert_close(out_v[i].double(), dense @ v.double(), rtol=1e-4, atol=1e-2)
        torch.testing.assert_close(out_u[i].double(), dense.T @ u.double(), rtol=1e-4, atol=1e-2)
