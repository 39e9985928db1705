"""blens_fast.project: the model's own lens (final norm + unembedding + bias), fused, on tiny random
configs of GPT-2 (LayerNorm), Llama (RMSNorm) and GPT-J (unembedding bias), against the reference."""
import copy

import pytest
import torch
import torch.nn.functional as F
import transformers

from blens_fast.adapters import get_adapter
from blens_fast.project import project
from tests.helpers import check_topk, lens_logits64

CUDA = torch.cuda.is_available()
FUSED = ["torch", "cpu", "triton"] + (["cuda"] if CUDA else [])
V = 997  # not a multiple of any tile


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = get_adapter(model).lens(model)
    with torch.no_grad():
        for p in (lens.norm_weight, lens.norm_bias, lens.bias):
            if p is not None:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g) if p is lens.norm_weight
                        else 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_positions=16, n_embd=48, n_layer=1, n_head=2))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False))
    gptj = transformers.GPTJForCausalLM(transformers.GPTJConfig(
        vocab_size=V, n_positions=16, n_embd=48, n_layer=1, n_head=2, rotary_dim=8))
    return {"gpt2": _randomize(gpt2), "llama": _randomize(llama, 1), "gptj": _randomize(gptj, 2)}


def _device(impl):
    return "cuda" if impl == "cuda" or (impl == "triton" and CUDA) else "cpu"


def _on_device(model, impl):
    """A copy of the shared model on the device ``impl`` runs on (the fixture stays on the CPU)."""
    return copy.deepcopy(model).to(_device(impl))


def check(res, logits, k, largest, tol=2e-4):
    check_topk(res.values, res.indices, res.logsumexp, logits, k, largest, tol * (1 + logits.abs().max().item()))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gptj"])
@pytest.mark.parametrize("impl", FUSED)
def test_project_matches_reference(models, arch, impl):
    model = _on_device(models[arch], impl)
    g = torch.Generator().manual_seed(5)
    vectors = (3 * torch.randn(23, 48, generator=g) + 0.5).to(_device(impl))
    cases = [(10, True, True, False), (17, False, True, True), (5, True, False, False), (1, True, True, True)]
    if impl == "triton" and not CUDA:
        cases = cases[:2]  # the interpreter is slow
    for k, largest, final_norm, unit_norm in cases:
        res = project(model, vectors, k=k, largest=largest, final_norm=final_norm, unit_norm=unit_norm, impl=impl)
        check(res, lens_logits64(model, vectors, final_norm=final_norm, unit_norm=unit_norm), k, largest)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("impl", FUSED)
def test_project_small_norm_vectors(models, arch, impl):
    """Vectors whose mean square is near the norm's eps (a VJP far from the loss, say): there eps changes every
    logit, so a prologue that drops or misplaces it picks other tokens."""
    model = _on_device(models[arch], impl)
    vectors = (1e-3 * torch.randn(9, 48, generator=torch.Generator().manual_seed(7))).to(_device(impl))
    truth = lens_logits64(model, vectors)
    res = project(model, vectors, k=6, impl=impl)
    check(res, truth, 6, True, tol=1e-5)
    # the case is sensitive to eps: the same vectors scaled up (where eps is negligible and the norm
    # scale-invariant) read differently
    scaled_up = lens_logits64(model, vectors * 1e4)
    assert (scaled_up - truth).abs().max() > 100 * 1e-5 * (1 + truth.abs().max())


@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_project_fused_equals_torch_impl(models, impl):
    """The fused prologue gives the same tokens as the chunked torch path (Lens.normalize per chunk)."""
    model = _on_device(models["gpt2"], impl)
    vectors = (torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(9)) * 4).to(_device(impl))
    ref = project(model, vectors, k=8, impl="torch")
    res = project(model, vectors, k=8, impl=impl)
    assert res.values.shape == (2, 5, 8) and res.logsumexp.shape == (2, 5)
    assert torch.equal(res.indices, ref.indices)
    assert torch.allclose(res.values, ref.values, atol=1e-4, rtol=1e-4)
    assert torch.allclose(res.logsumexp, ref.logsumexp, atol=1e-4, rtol=1e-4)


def test_project_bf16_model(models):
    """A bfloat16 model: the normalised vectors are rounded to bf16 like the model's own norm output, then their
    exact products with the bf16 unembedding are summed in float32, in every implementation."""
    model = copy.deepcopy(models["llama"]).to(torch.bfloat16)
    vectors = torch.randn(16, 48, generator=torch.Generator().manual_seed(2))
    norm, head = model.model.norm, model.lm_head
    h = norm(vectors.to(torch.bfloat16))  # the model's own bf16 norm output
    logits = h.double() @ head.weight.double().T
    for impl in ("torch", "cpu"):
        res = project(model, vectors, k=10, impl=impl)
        check(res, logits, 10, True, tol=2e-2)  # the norm's own bf16 rounding differs from the reference's
        assert torch.equal(res.indices, project(model, vectors, k=10, impl="torch").indices)


def test_project_errors(models):
    model = models["gpt2"]
    with pytest.raises(ValueError, match="vectors have 32 features but the model's unembedding has d=48"):
        project(model, torch.randn(3, 32))
    with pytest.raises(ValueError, match="k=998 is out of range"):
        project(model, torch.randn(3, 48), k=998)
    with pytest.raises(TypeError, match="vectors must be floating point"):
        project(model, torch.ones(3, 48, dtype=torch.long))
    with pytest.raises(TypeError, match="unit_norm must be a bool"):
        project(model, torch.randn(3, 48), unit_norm="yes")
    with pytest.raises(ValueError, match="not supported"):
        project(torch.nn.Module(), torch.randn(3, 3))
    with pytest.raises(ValueError, match="NaN or infinite logits"):
        project(model, torch.full((2, 48), float("nan")), impl="cpu")


def test_reference_norms_follow_their_formulas_with_a_large_eps():
    """The torch reference's norms written out (biased variance, eps inside the root), with an eps large enough to
    matter on small rows; no unit normalisation unless asked."""
    from blens_fast.ops.reference import normalize_rows

    g = torch.Generator().manual_seed(2)
    h = 0.3 * torch.randn(5, 12, generator=g, dtype=torch.float64)
    weight, bias = torch.randn(12, generator=g), torch.randn(12, generator=g)
    centred = h - h.mean(-1, keepdim=True)
    layer = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 0.25)
    rms = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 0.25)
    torch.testing.assert_close(normalize_rows(h, "layernorm", 0.25), layer.float())
    torch.testing.assert_close(normalize_rows(h, "rmsnorm", 0.25, norm_weight=weight, norm_bias=bias),
                               (rms * weight.double() + bias.double()).float())
    unit = h / h.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(normalize_rows(h, None, 0.25), h.float())
    torch.testing.assert_close(normalize_rows(h, None, 0.25, unit=True), unit.float())


@pytest.mark.parametrize("norm_kind", ["layernorm", "rmsnorm", None])
@pytest.mark.parametrize("unit", [False, True])
def test_prologue_coefficients_normalise_every_row_in_chunks(norm_kind, unit):
    """The fused paths' prologue, ``norm(h) = (h * a - c) * w + b`` per row: against ``F.layer_norm`` / the RMSNorm
    formula of ``F.normalize``-d or raw rows, in bfloat16 input, rows cut into chunks of 3 (10 rows: a short last
    chunk) and in one chunk."""
    from blens_fast.ops.reference import row_norm_coefficients

    g = torch.Generator().manual_seed(5)
    h = (torch.randn(10, 24, generator=g) * torch.logspace(-3, 2, 10)[:, None] + 0.3).to(torch.bfloat16)
    h[4] = 0.0
    eps = 1e-5
    x = h.double()
    scaled = F.normalize(x, dim=-1) if unit else x
    if norm_kind == "layernorm":
        want = F.layer_norm(scaled, (24,), eps=eps)
    elif norm_kind == "rmsnorm":
        want = scaled / torch.sqrt(scaled.square().mean(-1, keepdim=True) + eps)
    else:
        want = scaled
    for chunk_rows in (3, 4096):
        a, c = row_norm_coefficients(h, norm_kind, eps, unit, chunk_rows=chunk_rows)
        assert a.dtype == c.dtype == torch.float32 and a.shape == c.shape == (10,)
        torch.testing.assert_close(x * a.double()[:, None] - c.double()[:, None], want, rtol=1e-4, atol=1e-5)
