"""capture() against torch autograd on tiny random models of every supported architecture."""
import pytest
import torch

import blens_fast
from blens_fast.adapters import get_adapter
from blens_fast.batching import token_batches
from tests.helpers import ARCHITECTURES, autograd_loss, make_tiny_model

PROMPTS = ["The Eiffel Tower is located in the city of", "Danielle Darrieux speaks", "Hi"]
TARGETS = [" Paris", " French and English", "!"]
ALL_MODULES = ("mlp.in", "mlp.out", "attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv")


def in_out(module, tensor):
    """``tensor`` shaped like ``module``'s weight in (in, out) terms: ``nn.Linear`` stores its weight [out, in],
    GPT-2's ``Conv1D`` [in, out] (written from the module classes, not from the adapters)."""
    return tensor.T if isinstance(module, torch.nn.Linear) else tensor


def named_grad(model, layer, name):
    """The ``.grad`` a public module name stands for, in (in, out) terms, composed from the model's own matrices as
    the naming rule says (written here, not taken from the package): a gated MLP's ``mlp.in`` is gate and up side by
    side; ``attn.qkv`` over separate matrices is q, k and v side by side; q, k or v inside a fused matrix is its
    columns of it (GPT-2: three blocks; GPT-NeoX: q, k, v within each head)."""
    adapter = get_adapter(model)

    def own(part):
        module = adapter.module(model, layer, part)
        return in_out(module, module.weight.grad)

    if name in adapter.modules:
        return own(name)
    if name == "mlp.in":
        return torch.cat([own("mlp.gate"), own("mlp.up")], 1)
    if name == "attn.qkv":
        return torch.cat([own("attn.q"), own("attn.k"), own("attn.v")], 1)
    fused, part = own("attn.qkv"), "qkv".index(name[-1])
    d_in, d = fused.shape[0], fused.shape[1] // 3
    if model.config.model_type == "gpt_neox":
        heads = model.config.num_attention_heads
        return fused.reshape(d_in, heads, 3, d // heads)[:, :, part].reshape(d_in, d)
    return fused[:, part * d:(part + 1) * d]


def autograd_weight_grads(model, tokenizer, prompts, targets, keys):
    """Ordinary backward, one example at a time (no padding), parameter gradients accumulated, per (layer, public
    name) in (in, out) terms (:func:`named_grad`); the loss written independently of the package
    (tests/helpers.py), in the model's dtype promoted to at least float32."""
    for p in model.parameters():
        p.grad = None
    for prompt, target in zip(prompts, targets):
        autograd_loss(model, tokenizer, prompt, target).backward()
    return {key: named_grad(model, *key).clone() for key in keys}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_weights_and_grads_in_in_out_terms_are_views_that_write_through(arch, tokenizer):
    """``weight_io`` / ``grad_io``: every supported architecture's weights and ``.grad`` as (d_in, d_out) views of
    the parameters (nn.Linear's transposed, Conv1D's as they are); a write to the view changes the model."""
    model = make_tiny_model(arch, torch.float64)
    ctx = blens_fast.bind(model, tokenizer)
    module = ctx.module(0, "mlp.out")
    assert ctx.grad_io(0, "mlp.out") is None
    autograd_loss(model, tokenizer, PROMPTS[0], TARGETS[0]).backward()
    weight, grad = ctx.weight_io(0, "mlp.out"), ctx.grad_io(0, "mlp.out")
    assert torch.equal(weight, in_out(module, module.weight)) and torch.equal(grad, in_out(module, module.weight.grad))
    assert weight.shape == grad.shape and weight.shape[1] == model.config.hidden_size  # mlp.out writes d values
    before = float(weight.detach()[1, 0])
    with torch.no_grad():
        weight[1, 0] += 1.0
    assert float(in_out(module, module.weight).detach()[1, 0]) == before + 1.0


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_dense_equals_weight_grad_for_padded_batch(arch, dtype, tol, tokenizer):
    if arch == "gpt_neo" and dtype == torch.float64:
        tol = 1e-6  # GPT-Neo computes attention scores in float32 whatever the model's dtype
    model = make_tiny_model(arch, dtype)
    cap = blens_fast.capture(model, tokenizer, PROMPTS, TARGETS, modules=ALL_MODULES)
    assert cap.modules == ALL_MODULES  # every name as it was asked for, on every architecture
    keys = [(layer, module) for layer in cap.layers for module in cap.modules]
    expected = autograd_weight_grads(model, tokenizer, PROMPTS, TARGETS, keys)
    for key in keys:
        grad = cap.gradient(*key)
        assert grad.shape == tuple(expected[key].shape), key
        assert relative_error(grad.dense(), expected[key]) <= tol, key


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_single_example_gradient_matches_its_own_backward(arch, tokenizer):
    model = make_tiny_model(arch, torch.float64)
    cap = blens_fast.capture(model, tokenizer, PROMPTS, TARGETS, modules=("mlp.in", "mlp.out"))
    for i in range(len(PROMPTS)):
        keys = [(layer, module) for layer in cap.layers for module in cap.modules]
        expected = autograd_weight_grads(model, tokenizer, PROMPTS[i:i + 1], TARGETS[i:i + 1], keys)
        for key in keys:
            assert relative_error(cap.gradient(*key, example=i).dense(), expected[key]) <= 1e-12


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "qwen2"])
def test_batch_gives_the_same_factors_as_one_by_one(arch, tokenizer):
    model = make_tiny_model(arch, torch.float64)
    batched = blens_fast.capture(model, tokenizer, PROMPTS, TARGETS, modules=ALL_MODULES)
    for i in range(len(PROMPTS)):
        single = blens_fast.capture(model, tokenizer, PROMPTS[i], TARGETS[i], modules=ALL_MODULES)
        for key in batched.x:
            torch.testing.assert_close(batched.x[key][i], single.x[key][0], rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(batched.delta[key][i], single.delta[key][0], rtol=1e-10, atol=1e-13)
    chunked = blens_fast.capture(model, tokenizer, PROMPTS, TARGETS, modules=ALL_MODULES, batch_size=2)
    torch.testing.assert_close(chunked.losses, batched.losses)


def test_factor_shapes_and_token_counts(tokenizer):
    model = make_tiny_model("gpt2")
    cap = blens_fast.capture(model, tokenizer, PROMPTS, TARGETS, layers=[-1], modules=("mlp.in", "mlp.out"))
    assert cap.layers == (1,)
    for i, example in enumerate(cap.examples):
        t = len(tokenizer(PROMPTS[i]).input_ids) + len(tokenizer(TARGETS[i]).input_ids) - 1
        assert example.num_tokens == t
        assert cap.x[(1, "mlp.in")][i].shape == (t, 32)
        assert cap.delta[(1, "mlp.in")][i].shape == (t, 128)
        assert cap.x[(1, "mlp.out")][i].shape == (t, 128)
        assert cap.delta[(1, "mlp.out")][i].shape == (t, 32)


def test_what_was_captured_is_asked_for_by_the_name_used(tokenizer):
    """One naming rule: a capture holds the names it was asked for, and answers to them; other names are refused,
    naming what it holds. GPT-2's attn.q is q's columns of the fused matrix; a gated MLP's mlp.in is gate and up
    side by side (one input, read once)."""
    gpt2 = make_tiny_model("gpt2")
    cap = blens_fast.capture(gpt2, tokenizer, "a b", "c", modules=("attn.q", "attn.v", "attn.o", "attn.q"))
    assert cap.modules == ("attn.q", "attn.v", "attn.o")
    assert cap.gradient(0, "attn.q").shape == cap.gradient(0, "attn.v").shape == (32, 32)
    assert cap.x[(0, "attn.q")][0] is cap.x[(0, "attn.v")][0]  # the fused matrix's input, kept once
    with pytest.raises(ValueError, match=r"^module 'attn.qkv' was not captured: captured attn.q, attn.v, attn.o"):
        cap.gradient(0, "attn.qkv")
    llama = make_tiny_model("llama")
    cap = blens_fast.capture(llama, tokenizer, "a b", "c", modules=("mlp.in", "mlp.out"))
    assert cap.modules == ("mlp.in", "mlp.out") and cap.gradient(0, "mlp.in").shape == (32, 2 * 48)
    with pytest.raises(ValueError, match=r"^module 'mlp.up' was not captured: captured mlp.in, mlp.out"):
        cap.gradient(0, "mlp.up")
    split = blens_fast.capture(llama, tokenizer, "a b", "c", modules=("mlp.gate", "mlp.up"))
    torch.testing.assert_close(cap.gradient(1, "mlp.in").dense(), torch.cat(
        [split.gradient(1, "mlp.gate").dense(), split.gradient(1, "mlp.up").dense()], 1))
    with pytest.raises(ValueError, match=r"module 'mlp.gate' does not exist in GPT-2"):
        blens_fast.capture(gpt2, tokenizer, "a b", "c", modules=("mlp.gate",))


@pytest.mark.parametrize("arch,name,parts", [("llama", "mlp.in", "mlp.gate, mlp.up"),
                                             ("gpt2", "attn.q", "columns of attn.qkv")])
def test_a_name_that_is_not_one_matrix_has_no_weight_view(arch, name, parts, tokenizer):
    """weight_io / grad_io are views of one parameter: a name made of several matrices (or of part of one) is
    refused with the matrices it is made of."""
    ctx = blens_fast.bind(make_tiny_model(arch), tokenizer)
    for call in (ctx.weight_io, ctx.grad_io):
        with pytest.raises(ValueError, match=rf"'{name}' is not one matrix of {ctx.adapter.name}: it is made of "
                                             rf"{parts}"):
            call(0, name)


def test_requires_grad_and_grad_left_untouched_and_hooks_removed(tokenizer):
    model = make_tiny_model("gpt2")
    frozen = model.transformer.h[0].mlp.c_fc.weight
    frozen.requires_grad_(False)
    sentinel = torch.full_like(model.lm_head.weight, 3.0)
    model.lm_head.weight.grad = sentinel
    model.train()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    cap = blens_fast.capture(model, tokenizer, PROMPTS, TARGETS)
    assert cap.gradient(0, "mlp.in").dense().abs().sum() > 0  # frozen weights still get their factors
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert model.lm_head.weight.grad is sentinel and bool((sentinel == 3.0).all())
    assert all(p.grad is None for p in model.parameters() if p is not model.lm_head.weight)
    assert model.training and model.transformer.h[0].training
    assert all(not m._forward_hooks for m in model.modules())


def test_hooks_removed_after_an_error(tokenizer):
    model = make_tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        blens_fast.capture(model, tokenizer, PROMPTS, TARGETS)
    assert all(not m._forward_hooks for m in model.modules())


def test_float16_overflow_inside_the_model_names_the_module(tokenizer):
    """The loss stays finite but a VJP overflows float16 on its way back: a clear error naming the first affected
    (layer, module), not factors full of inf (and a linear-algebra error later)."""
    model = make_tiny_model("gpt2", torch.float16)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight.mul_(10.0)
        model.transformer.h[1].ln_2.weight.mul_(1000.0)
    with pytest.raises(ValueError, match=r"the delta factor of mlp.in at layer 0 is not finite for example 0 "):
        blens_fast.capture(model, tokenizer, PROMPTS[0], TARGETS[0])


def test_special_token_text_in_a_prompt_is_plain_text(tokenizer):
    """A literal ``<|endoftext|>`` typed by a user is the characters it is made of, not the special token."""
    model = make_tiny_model("gpt2")
    prompt = "The end <|endoftext|> of the"
    cap = blens_fast.capture(model, tokenizer, prompt, " story")
    ids = cap.examples[0].prompt_ids
    assert tokenizer.eos_token_id not in ids
    assert tokenizer.decode(list(ids)) == prompt


def test_fully_frozen_model_and_no_grad_context(tokenizer):
    model = make_tiny_model("llama").requires_grad_(False)
    with torch.no_grad():
        cap = blens_fast.capture(model, tokenizer, PROMPTS[0], TARGETS[0])
    assert cap.gradient(1, "mlp.out").norm() > 0


def test_tokenizer_without_pad_token_is_handled(tokenizer, tokenizer_without_pad):
    assert tokenizer_without_pad.pad_token is None
    model = make_tiny_model("gpt2", torch.float64)
    a = blens_fast.capture(model, tokenizer_without_pad, PROMPTS, TARGETS)
    b = blens_fast.capture(model, tokenizer, PROMPTS, TARGETS)
    torch.testing.assert_close(a.gradient(1, "mlp.out").dense(), b.gradient(1, "mlp.out").dense())


class _DroppingTokenizer:
    """Wraps a tokenizer and tokenizes one chosen string to nothing."""

    def __init__(self, inner, drop):
        self.inner, self.drop, self.pad_token_id = inner, drop, inner.pad_token_id

    def __call__(self, text, add_special_tokens=True):
        if text.strip() == self.drop:
            return {"input_ids": []}
        return self.inner(text, add_special_tokens=add_special_tokens)


@pytest.mark.parametrize("prompts,targets,kwargs,error,match", [
    ("", " Paris", {}, ValueError, r"prompts\[0\] is empty"),
    ("The Eiffel Tower is in", "   ", {}, ValueError, r"targets\[0\] is empty"),
    (["a", "b"], ["c"], {}, ValueError, "2 prompts but 1 target:"),
    ([], [], {}, ValueError, "prompts is empty"),
    (5, "x", {}, TypeError, "prompts must be a string or a list of strings"),
    (["a", 3], ["b", "c"], {}, TypeError, r"prompts\[1\] must be a string"),
    ("a", "b", {"layers": [2]}, ValueError, "layer 2 is out of range: the model has 2 layers"),
    ("a", "b", {"layers": [-3]}, ValueError, "layer -3 is out of range"),
    ("a", "b", {"modules": ("mlp.fc1",)}, ValueError, "unknown module name 'mlp.fc1'"),
    ("a", "b", {"modules": ("mlp.gate",)}, ValueError, "module 'mlp.gate' does not exist in GPT-2"),
    ("a", "b", {"batch_size": 0}, ValueError, "batch_size=0 is out of range"),
])
def test_bad_input_gets_a_clear_error(tokenizer, prompts, targets, kwargs, error, match):
    model = make_tiny_model("gpt2")
    with pytest.raises(error, match=match):
        blens_fast.capture(model, tokenizer, prompts, targets, **kwargs)


def test_target_tokenizing_to_nothing(tokenizer):
    model = make_tiny_model("gpt2")
    with pytest.raises(ValueError, match=r"targets\[0\] \('zzz'\) tokenizes to no tokens"):
        blens_fast.capture(model, _DroppingTokenizer(tokenizer, "zzz"), "a b", "zzz")


def test_too_long_example(tokenizer):
    model = make_tiny_model("gpt2")  # 64 positions
    with pytest.raises(ValueError, match="reads at most 64"):
        blens_fast.capture(model, tokenizer, "word " * 80, "x")


def test_unsupported_model_lists_the_supported_ones(tokenizer):
    import transformers
    model = transformers.BertForMaskedLM(transformers.BertConfig(num_hidden_layers=1, hidden_size=32,
                                                                 num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match=r"model type 'bert' .* not supported\. Supported: .*GPT-2.*adapter="):
        blens_fast.capture(model, tokenizer, "a", "b")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        blens_fast.capture("gpt2", tokenizer, "a", "b")


def test_rank_table(tokenizer):
    model = make_tiny_model("gpt2", torch.float64)
    table = blens_fast.rank(model, tokenizer, PROMPTS[:2], TARGETS[:2], batch_size=1, progress=False)
    assert list(table.columns) == ["example", "prompt", "target", "layer", "module", "tokens", "rank", "max_rank",
                                   "full_rank", "norm"]
    assert len(table) == 2 * 2 * 2
    single = table[(table.target == " Paris")]
    tokens = len(tokenizer(PROMPTS[0]).input_ids)
    assert (single.tokens == tokens).all()
    # Layer 0: generic prompts give rank = token count; last layer's output projection: rank 1 (one-token target).
    assert single[single.layer == 0]["rank"].tolist() == [tokens, tokens]
    assert single[(single.layer == 1) & (single.module == "mlp.out")]["rank"].item() == 1
    cap = blens_fast.capture(model, tokenizer, PROMPTS[1], TARGETS[1])
    row = table[(table.example == 1) & (table.layer == 0) & (table.module == "mlp.in")]
    assert row["norm"].item() == pytest.approx(cap.gradient(0, "mlp.in").dense().norm().item(), rel=1e-12)


def test_token_batches_keep_order_and_budget():
    lengths = [5, 3, 9, 3, 7, 2, 30, 1]
    batches = token_batches(lengths, 3, 16)
    assert [i for b in batches for i in b] == list(range(len(lengths)))  # consecutive, input order
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 16
    assert [6] in batches  # longer than the budget: alone
    assert batches == [[0, 1], [2], [3, 4], [5], [6], [7]]
    assert token_batches(lengths, 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    by_length = token_batches(lengths, 3, 16, by_length=True)
    assert by_length == [[7, 5, 1], [3, 0], [4], [2], [6]]


def test_ranks_and_norms_per_layer_and_example(tokenizer):
    """Batched over layers and examples, laid out (layers, examples): equal to each gradient's own rank and norm."""
    model = make_tiny_model("gpt2", torch.float64)
    cap = blens_fast.capture(model, tokenizer, PROMPTS[:3], TARGETS[:3])
    found = cap.ranks_and_norms()
    assert set(found) == set(cap.modules)
    for module, (ranks, norms) in found.items():
        assert ranks.shape == norms.shape == (len(cap.layers), 3) and ranks.dtype == torch.long
        for li, layer in enumerate(cap.layers):
            for i in range(3):
                grad = cap.gradient(layer, module, i)
                assert ranks[li, i].item() == grad.rank()
                assert norms[li, i].item() == pytest.approx(grad.norm().item(), rel=1e-12)
    assert len({int(n) for n in found["mlp.in"][0][0]}) > 1  # prompts of different lengths: a transposition shows
    only_out = cap.ranks_and_norms("mlp.out", tol=1e9)
    assert list(only_out) == ["mlp.out"] and (only_out["mlp.out"][0] == 0).all()


def test_ranks_and_norms_count_with_the_eps_of_the_dtype_given(tokenizer):
    """Two x rows 1e-9 apart (relative) give a singular value float64's eps counts and float32's does not: the
    batched ranks follow ``dtype`` as each gradient's own rank does. The batch also keeps each example's length."""
    model = make_tiny_model("gpt2", torch.float64)
    cap = blens_fast.capture(model, tokenizer, PROMPTS[:2], TARGETS[:2], layers=[0], modules=("mlp.in",))
    x = cap.x[(0, "mlp.in")][1]
    x[1] = x[0] + 1e-9 * x[1]
    grad = cap.gradient(0, "mlp.in", 1)
    assert grad.rank(dtype=torch.float32) == grad.rank() - 1
    for dtype in (None, torch.float32):
        ranks, _ = cap.ranks_and_norms(dtype=dtype)["mlp.in"]
        assert ranks[0].tolist() == [cap.gradient(0, "mlp.in", i).rank(dtype=dtype) for i in range(2)]
    lengths = [e.num_tokens for e in cap.examples]
    assert len(set(lengths)) == 2 and cap.gradients("mlp.in").num_tokens.tolist() == [lengths]


class WithoutLogitsToKeep(torch.nn.Module):
    """A model whose forward has no ``logits_to_keep`` (older transformers, custom models)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_the_unembedding_runs_at_the_loss_positions_only_where_the_model_allows(tokenizer):
    """With ``logits_to_keep`` the logits are computed at the loss positions only; without it at every position;
    the losses are the same."""
    from blens_fast.batching import target_log_probs
    from blens_fast.capture import loss_logits

    model = make_tiny_model("gpt2", torch.float64)
    ctx = blens_fast.bind(model, tokenizer)
    examples = blens_fast.capture(ctx, PROMPTS[:2], TARGETS[:2], layers=[0], modules=("mlp.out",)).examples
    ids, mask = ctx.pad([e.input_ids for e in examples])
    with torch.no_grad():
        kept, positions = loss_logits(model, ids, mask, examples)
        full, no_positions = loss_logits(WithoutLogitsToKeep(model), ids, mask, examples)
    assert no_positions is None and full.shape[:2] == ids.shape
    assert positions is not None and kept.shape[1] == len(positions) < ids.shape[1]
    torch.testing.assert_close(target_log_probs(kept, examples, positions), target_log_probs(full, examples),
                               rtol=1e-12, atol=0)


def test_a_module_that_does_not_run_is_named(tokenizer):
    model = make_tiny_model("gpt2")
    model.transformer.h[1].mlp.forward = lambda hidden: hidden  # this block skips its MLP
    with pytest.raises(RuntimeError, match=r"^modules \[\(1, 'mlp.out'\)\] did not run in the forward pass"):
        blens_fast.capture(model, tokenizer, PROMPTS[:1], TARGETS[:1], modules=("mlp.out",))


def test_a_module_whose_output_does_not_reach_the_loss_has_zero_vjps(tokenizer):
    """The module runs (its input is kept) but its output is thrown away: no gradient flows to it, so its VJPs are
    zeros rather than an error."""
    model = make_tiny_model("gpt2")
    mlp = model.transformer.h[1].mlp
    mlp.forward = lambda hidden: (mlp.c_fc(hidden), torch.zeros_like(hidden))[1]
    cap = blens_fast.capture(model, tokenizer, PROMPTS[:2], TARGETS[:2], layers=[0, 1], modules=("mlp.in",))
    for i, example in enumerate(cap.examples):
        delta = cap.delta[(1, "mlp.in")][i]
        assert delta.shape == (example.num_tokens, 4 * model.config.n_embd) and not delta.any()
        assert cap.x[(1, "mlp.in")][i].abs().amax() > 0 and cap.delta[(0, "mlp.in")][i].abs().amax() > 0


def test_non_finite_factors_name_the_example_the_factor_and_the_module():
    """The check behind capture's error: the example counted across batches (batch start + row) and the first
    non-finite factor (x before delta)."""
    from types import SimpleNamespace

    from blens_fast.capture import _raise_not_finite

    batch = [SimpleNamespace(prompt="a", target=" b"), SimpleNamespace(prompt="c", target=" d")]
    key = (3, "mlp.out")
    xs, deltas = {key: torch.zeros(5, 4, 2)}, {key: torch.zeros(5, 4, 2)}
    xs[key][3, 1, 0] = deltas[key][3, 0, 0] = float("inf")  # the batch's second example, 2 + 1 = 3 overall
    with pytest.raises(ValueError, match=r"^the x factor of mlp.out at layer 3 is not finite for example 3 "
                                         r"\('c' -> ' d'\)"):
        _raise_not_finite(torch.zeros(2), batch, 2, [key], xs, deltas)
    xs[key][3] = 0.0
    with pytest.raises(ValueError, match=r"^the delta factor of mlp.out at layer 3 .* example 3 "):
        _raise_not_finite(torch.zeros(2), batch, 2, [key], xs, deltas)
    deltas[key][3] = 0.0
    _raise_not_finite(torch.zeros(2), batch, 2, [key], xs, deltas)  # all finite: no error


def test_repr_names_architecture_examples_layers_and_modules(tokenizer):
    cap = blens_fast.capture(make_tiny_model("gpt2"), tokenizer, PROMPTS[:2], TARGETS[:2], layers=[1, 0],
                             modules=("mlp.out",))
    assert repr(cap) == "Capture(GPT-2, examples=2, layers=[1, 0], modules=['mlp.out'])"


def test_an_example_is_indexed_from_either_end_and_checked(tokenizer):
    cap = blens_fast.capture(make_tiny_model("gpt2"), tokenizer, PROMPTS[:2], TARGETS[:2], layers=[0])
    assert cap.gradient(0, "mlp.out", -2).x is cap.gradient(0, "mlp.out", 0).x
    assert cap.gradient(0, "mlp.out", -1).x is cap.gradient(0, "mlp.out", 1).x
    for example in (2, -3):
        with pytest.raises(ValueError, match=rf"^example {example} is out of range: captured 2 examples"):
            cap.gradient(0, "mlp.out", example)


def test_ranks_and_norms_checks_the_modules_it_is_given(tokenizer):
    cap = blens_fast.capture(make_tiny_model("gpt2"), tokenizer, PROMPTS[:1], TARGETS[:1], layers=[0])
    with pytest.raises(TypeError, match="^modules must be a string or a list of strings, got int"):
        cap.ranks_and_norms(5)
