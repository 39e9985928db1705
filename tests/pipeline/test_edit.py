"""edit(): forward shift (paper, normalised, whitened, auto scale) and the gradient baseline on tiny models."""
import dataclasses
import warnings

import pytest
import torch
from torch import nn

from blens_fast import bind
from blens_fast.adapters import get_adapter
from blens_fast.editing import (Edit, EditSettings, EditSkipped, applied_edits, calibrated_defaults, edit,
                                 ff2_whitening, resolve_settings)
from blens_fast.editing.update import Update
from tests.helpers import autograd_loss, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "The Eiffel Tower is located in the city of"
TARGET = " Rome"
OTHER = ("Danielle Darrieux speaks", " English")
ARCHS = ["gpt2", "llama", "gptj", "opt", "qwen2"]  # Conv1D [in, out], gated, parallel block, nn.Linear


def tiny(arch, dtype=torch.float32):
    """A tiny model whose unembedding equals its input embedding (as in GPT-2, and roughly in trained
    models): only then does adding a token's input embedding to the residual promote that token."""
    model = make_tiny_model(arch, dtype)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is not embed.weight:
        with torch.no_grad():
            head.weight.copy_(embed.weight)
    return model


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(model, snap):
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def last_logits(model, tokenizer, prompt):
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1].float()


def ff2_input(model, tokenizer, prompt, layer):
    """a_n by an independent route: a hook on the full model's forward."""
    kept = {}
    module = get_adapter(model).module(model, layer, "mlp.out")
    handle = module.register_forward_hook(lambda m, args, out: kept.__setitem__("a", args[0].detach()))
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return kept["a"].reshape(ids.shape[1], -1)[-1].float()


def in_out(model, layer, module, tensor):
    """``tensor`` shaped like the module's weight, in (in, out) terms: ``nn.Linear`` stores its weight [out, in],
    GPT-2's ``Conv1D`` [in, out] (written here from the module classes, not from the adapters)."""
    owner = get_adapter(model).module(model, layer, module)
    return tensor.T if isinstance(owner, nn.Linear) else tensor


def token(tokenizer, text):
    return tokenizer(text)["input_ids"][0]


@pytest.mark.parametrize("arch", ARCHS)
def test_paper_shift_is_the_outer_product_in_in_out_terms_and_reverts_bit_for_bit(arch, tokenizer):
    model = tiny(arch)
    adapter = get_adapter(model)
    snap = snapshot(model)
    before = last_logits(model, tokenizer, PROMPT)
    a = ff2_input(model, tokenizer, PROMPT, 1)
    e = adapter.embedding_matrix(model)[token(tokenizer, TARGET)].float()
    result = edit(model, tokenizer, PROMPT, TARGET, layer=1, scale=0.5, skip_if_argmax=False)
    weight = adapter.weight(model, 1, "mlp.out")
    expected = 0.5 * torch.outer(a, e)  # d_ff x d
    torch.testing.assert_close(in_out(model, 1, "mlp.out", weight - snap[_state_name(model, weight)]), expected,
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.delta(1, "mlp.out"), expected, rtol=1e-4, atol=1e-6)
    after = last_logits(model, tokenizer, PROMPT)
    t = token(tokenizer, TARGET)
    assert after[t] - before[t] > 0.5 * ((after - before).abs().mean())
    assert result.applied and result.touched == ((1, "mlp.out"),)
    result.revert()
    assert same_weights(model, snap)
    result.revert()  # a second revert is a no-op
    assert same_weights(model, snap)


def _state_name(model, weight):
    return next(k for k, v in model.state_dict().items() if v.data_ptr() == weight.data_ptr())


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gptj"])
def test_normalised_shift_moves_the_residual_by_exactly_scale_times_embedding(arch, tokenizer):
    model = tiny(arch, torch.float64)
    adapter = get_adapter(model)
    seen = []
    norm = model.get_submodule(adapter.final_norm)
    handle = norm.register_forward_pre_hook(lambda m, args: seen.append(args[0][0, -1].clone()))
    last_logits(model, tokenizer, PROMPT)
    with edit(model, tokenizer, PROMPT, TARGET, layer=-1, scale=3.0, normalize_key=True, skip_if_argmax=False):
        last_logits(model, tokenizer, PROMPT)
    handle.remove()
    e = adapter.embedding_matrix(model)[token(tokenizer, TARGET)]
    torch.testing.assert_close(seen[-1] - seen[0], 3.0 * e, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_whitened_keys_answer_one_to_their_prompt_and_zero_to_the_other_edited_prompt(arch, tokenizer):
    model = tiny(arch, torch.float64)
    texts = ["Paris is the capital of France", "The cat sat on the mat", "Hello world, this is a test",
             "Danielle Darrieux speaks French"] * 3
    whitening = ff2_whitening(model, tokenizer, 1, texts, file_cache=False, progress=False)
    assert whitening.inverse.shape[0] == in_out(model, 1, "mlp.out", get_adapter(model).weight(model, 1, "mlp.out")
                                                ).shape[0]
    prompts, targets = [PROMPT, OTHER[0]], [TARGET, OTHER[1]]
    result = edit(model, tokenizer, prompts, targets, layer=1, scale=2.0, whiten=whitening, skip_if_argmax=False)
    delta = result.delta(1, "mlp.out")  # [d_ff, d]
    embed = get_adapter(model).embedding_matrix(model)
    for i, prompt in enumerate(prompts):
        a = ff2_input(model, tokenizer, prompt, 1)  # the edit at layer 1 does not change layer 1's FF2 input
        shift = a.float() @ delta
        expected = 2.0 * embed[token(tokenizer, targets[i])].float()
        torch.testing.assert_close(shift, expected, rtol=1e-3, atol=1e-4)
    result.revert()
    again = ff2_whitening(model, tokenizer, 1, texts, file_cache=False, progress=False)
    assert again is whitening  # cached in memory


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("normalize_key", [True, False], ids=["normalised key", "raw key"])
def test_auto_scale_gives_the_target_exactly_the_requested_lead(arch, normalize_key, tokenizer):
    """Whatever the key (its response to a_n is 1 when normalised, |a_n|^2 when raw), the edit moves the residual by
    exactly the chosen shift, so the target gets exactly the requested lead."""
    model = tiny(arch)
    snap = snapshot(model)
    t = token(tokenizer, TARGET)
    for margin in (0.0, 0.02):
        with edit(model, tokenizer, PROMPT, TARGET, layer=-1, scale="auto", margin=margin,
                  normalize_key=normalize_key) as result:
            logits = last_logits(model, tokenizer, PROMPT)
            lead = logits[t] - torch.cat([logits[:t], logits[t + 1:]]).max()
            assert result.info["shifts"][0] > 0
            assert margin - 1e-4 <= lead.item() <= margin + 1e-2
        assert same_weights(model, snap)
    with pytest.raises(ValueError, match="last layer"):
        edit(model, tokenizer, PROMPT, TARGET, layer=0, scale="auto", margin=0.0)
    assert same_weights(model, snap)


def test_skip_when_the_target_already_is_the_argmax(tokenizer):
    model = tiny("gpt2")
    with edit(model, tokenizer, PROMPT, TARGET, layer=-1, scale="auto", margin=0.01, normalize_key=True):
        snap = snapshot(model)
        with pytest.warns(EditSkipped, match=rf"1 of its 2 facts is left unchanged\): {PROMPT!r} -> {TARGET!r}: the "
                                             r"model already predicts it \(skip_if_argmax=True\)$"):
            inner = edit(model, tokenizer, [PROMPT, OTHER[0]], [TARGET, OTHER[1]], layer=-1, scale=1.0)
        assert inner.info["skipped"] == [True, False]
        assert inner.updates[0].left.shape[0] == 1  # rank one: only the second fact
        inner.revert()
        assert same_weights(model, snap)
        with pytest.warns(EditSkipped, match=r"edit skipped \(the edit changes nothing\)"):
            alone = edit(model, tokenizer, PROMPT, TARGET, layer=-1, scale=1.0)
        assert alone.updates == () and same_weights(model, snap)
        with warnings.catch_warnings():
            warnings.simplefilter("error", EditSkipped)  # nothing skipped, no warning
            edit(model, tokenizer, OTHER[0], OTHER[1], layer=-1, scale=1.0).revert()
        alone.revert()


def test_context_manager_reverts_after_an_exception(tokenizer):
    model = tiny("gpt2")
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with edit(model, tokenizer, PROMPT, TARGET, layer=0, scale=1.0, skip_if_argmax=False):
            assert not same_weights(model, snap)
            raise RuntimeError("boom")
    assert same_weights(model, snap)


@pytest.mark.parametrize("arch,method", [("gpt2", "forward_shift"), ("llama", "gradient"), ("gptj", "forward_shift")])
def test_save_load_round_trip_gives_the_same_weights(arch, method, tokenizer, tmp_path):
    model = tiny(arch)
    snap = snapshot(model)
    kwargs = dict(lr=0.5, steps=2) if method == "gradient" else dict(scale=0.7, skip_if_argmax=False)
    first = edit(model, tokenizer, [PROMPT, OTHER[0]], [TARGET, OTHER[1]], method=method, layer=1, **kwargs)
    edited = snapshot(model)
    first.save(tmp_path / "edit.safetensors")
    first.revert()
    assert same_weights(model, snap)
    loaded = Edit.load(tmp_path / "edit.safetensors")
    assert not loaded.applied and loaded.info["method"] == method and loaded.touched == first.touched
    with loaded.apply(model):
        assert same_weights(model, edited)
    assert same_weights(model, snap)
    with pytest.raises(FileNotFoundError):
        Edit.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gradient_step_equals_the_dense_normalised_step(arch, tokenizer):
    model = tiny(arch, torch.float64)
    adapter = get_adapter(model)
    weight = adapter.weight(model, 0, "mlp.out")
    original = weight.detach().clone()
    model.zero_grad()
    autograd_loss(model, tokenizer, PROMPT, TARGET).backward()
    grad = weight.grad.clone()
    model.zero_grad()
    result = edit(model, tokenizer, PROMPT, TARGET, method="gradient", layer=0, lr=0.3, steps=1)
    torch.testing.assert_close(weight.detach(), original - 0.3 * grad / grad.norm(), rtol=1e-10, atol=1e-12)
    result.revert()
    assert torch.equal(weight, original)


def test_gradient_steps_lower_the_loss(tokenizer):
    model = tiny("llama")
    result = edit(model, tokenizer, PROMPT, TARGET, method="gradient", layer=1, lr=0.5, steps=4)
    losses = result.info["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    result.revert()


def test_bfloat16_edit_reverts_bit_for_bit(tokenizer):
    model = tiny("gpt2", torch.bfloat16)
    snap = snapshot(model)
    with edit(model, tokenizer, PROMPT, TARGET, layer=1, scale=1.0, normalize_key=True, skip_if_argmax=False):
        assert not same_weights(model, snap)
    assert same_weights(model, snap)


class _EmptyFor:
    """A tokenizer that tokenizes one given text to nothing."""

    def __init__(self, tokenizer, text):
        self.tokenizer, self.text = tokenizer, text
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, text, **kwargs):
        return {"input_ids": []} if text.strip() == self.text.strip() else self.tokenizer(text, **kwargs)


def test_errors_leave_the_model_untouched(tokenizer):
    model = tiny("gpt2")
    snap = snapshot(model)
    cases = [
        (dict(layer=2, scale=1.0), ValueError, "out of range"),
        (dict(layer=-3, scale=1.0), ValueError, "out of range"),
        (dict(layer=0, scale=-1.0), ValueError, "scale"),
        (dict(layer=0, scale="big"), ValueError, "auto"),
        (dict(layer=0), ValueError, "scale='auto' needs the edit at the last layer"),
        (dict(layer=0, scale=1.0, method="rome"), ValueError, "method"),
        (dict(layer=0, method="gradient", lr=-1.0), ValueError, "lr"),
        (dict(layer=0, method="gradient", margin=1.0), ValueError, "method='forward_shift' only"),
        (dict(layer=0, scale=1.0, whiten="yes"), TypeError, "whiten"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            edit(model, tokenizer, PROMPT, TARGET, defaults={}, **kwargs)
        assert same_weights(model, snap), kwargs
    for target, match in [("", "empty"), ("   ", "empty")]:
        with pytest.raises(ValueError, match=match):
            edit(model, tokenizer, PROMPT, target, layer=0, scale=1.0)
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        edit(model, _EmptyFor(tokenizer, "Rome"), PROMPT, TARGET, layer=0, scale=1.0)
    with pytest.raises(ValueError, match="one target per prompt"):
        edit(model, tokenizer, [PROMPT, OTHER[0]], [TARGET], layer=0, scale=1.0)
    assert same_weights(model, snap)


def test_unsupported_model_is_a_clear_error(tokenizer):
    class Bert(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"model_type": "bert"})()
            self.layer = nn.Linear(4, 4)

    model = Bert()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="not supported"):
        edit(model, tokenizer, PROMPT, TARGET, layer=0, scale=1.0)
    assert same_weights(model, snap)


def test_calibrated_defaults_are_read_and_the_fingerprint_survives_edits(tokenizer):
    model = tiny("gpt2")
    fingerprint = bind(model).fingerprint()
    with edit(model, tokenizer, PROMPT, TARGET, defaults={"layer": 1, "scale": 0.25}, skip_if_argmax=False) as result:
        assert result.info["layer"] == 1 and result.info["scale"] == 0.25 and result.info["source"] == "given defaults"
        assert bind(model).fingerprint() == fingerprint
    other = tiny("gpt2")
    with torch.no_grad():
        other.transformer.wte.weight[0, 0] += 1.0
    assert bind(other).fingerprint() != fingerprint


def test_auto_scale_never_pushes_beyond_its_cap(tokenizer):
    model = tiny("gpt2")
    snap = snapshot(model)
    t = token(tokenizer, TARGET)
    with edit(model, tokenizer, PROMPT, TARGET, layer=-1, scale="auto", margin=1e6, normalize_key=True) as result:
        if result.updates:  # the margin is out of reach: at most the argmax, and only within the cap
            logits = last_logits(model, tokenizer, PROMPT)
            assert logits.argmax().item() == t
        else:
            assert result.info["skipped"] == [True] and same_weights(model, snap)
    assert same_weights(model, snap)


def test_default_model_finds_its_calibrated_settings():
    """The shipped calibration must match the shipped model, whatever the dtype or thread count."""
    from blens_fast import load_default_model

    for dtype in (torch.float32, torch.bfloat16):
        settings = calibrated_defaults(load_default_model(dtype=dtype))
        assert settings["forward_shift"]["layer"] == 1 and settings["forward_shift_whitened"]["layer"] == 3


def test_fingerprint_and_edit_of_a_model_with_a_tensor_over_2_to_the_24(tokenizer):
    """GPT-2 small's embedding has 38.6M elements: sampling indices through float32 made the last one round up to
    numel (an IndexError in every edit of such a model)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=400, n_head=4, n_positions=32,
                                                                 vocab_size=50257)).eval()
    assert model.transformer.wte.weight.numel() > 2 ** 24 + 1
    ctx = bind(model, tokenizer)
    assert len(ctx.fingerprint()) == 16 and len(ctx.weights_fingerprint()) == 24
    snap = snapshot(model)
    with edit(ctx, PROMPT, TARGET, layer=0, scale=0.5, skip_if_argmax=False):
        assert not same_weights(model, snap)
    assert same_weights(model, snap)


def test_out_of_order_revert_is_refused_and_in_order_restores_bit_for_bit(tokenizer):
    """Two edits of the same matrix: reverting the first while the second sits on it is refused (naming the
    second), and reverting in reverse order restores every weight bit for bit."""
    model = tiny("gpt2")
    snap = snapshot(model)
    first = edit(model, tokenizer, PROMPT, TARGET, layer=1, scale=2.0, skip_if_argmax=False)
    second = edit(model, tokenizer, OTHER[0], OTHER[1], layer=1, scale=3.0, skip_if_argmax=False)
    assert applied_edits(model) == (first, second)
    with pytest.raises(ValueError, match=r"cannot revert .*Eiffel.*: Edit\(.*Danielle Darrieux speaks.*was applied "
                                         "after it"):
        first.revert()
    assert first.applied and not same_weights(model, snap)
    second.revert()
    first.revert()
    assert same_weights(model, snap) and applied_edits(model) == ()


def test_a_saved_edit_refuses_another_model_unless_forced(tokenizer, tmp_path):
    model, other = tiny("gpt2"), tiny("gpt2")
    with torch.no_grad():
        other.transformer.wte.weight.mul_(1.5)
    saved = edit(model, tokenizer, PROMPT, TARGET, layer=1, scale=1.0, skip_if_argmax=False)
    saved.save(tmp_path / "e.safetensors")
    saved.revert()
    loaded = Edit.load(tmp_path / "e.safetensors")
    snap = snapshot(other)
    with pytest.raises(ValueError, match="made on another model .*force=True"):
        loaded.apply(other)
    assert same_weights(other, snap)
    with loaded.apply(other, force=True):
        assert not same_weights(other, snap)
    assert same_weights(other, snap)


def test_loading_a_damaged_or_foreign_file_is_a_value_error(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 100)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"), metadata={"format": "other"})
    for name in ("garbage", "foreign"):
        with pytest.raises(ValueError, match=f"{name}.safetensors' is not a readable blens_fast edit file"):
            Edit.load(tmp_path / f"{name}.safetensors")


def test_an_edit_saved_in_the_weights_own_layout_is_refused_not_transposed(tokenizer, tmp_path):
    """Format /2 held the factors in the weight's own layout ([out, in] for nn.Linear): read as (in, out) it would be
    the transposed update, silently where the weight is square. It is refused, naming both formats."""
    from safetensors.torch import save_file

    square = torch.ones(1, 4), torch.arange(4.0)[None]
    save_file({"update.0.left": square[0], "update.0.right": square[1]}, str(tmp_path / "old.safetensors"),
              metadata={"format": "blens_fast.edit/2", "steps": '[{"layer": 0, "module": "mlp.out"}]'})
    with pytest.raises(ValueError, match=r"old.safetensors' is not a readable blens_fast edit file \(format "
                                         r"'blens_fast.edit/2', expected 'blens_fast.edit/3'\)"):
        Edit.load(tmp_path / "old.safetensors")


def test_an_update_of_the_wrong_shape_names_both_shapes_in_in_out_terms(tokenizer):
    """The update is (d_in, d_out) whatever the weight's layout: a (d, d_ff) update of Llama's mlp.out (stored
    [d, d_ff], (in, out) = (d_ff, d)) is refused, and the model is left as it was."""
    model = tiny("llama")
    snap = snapshot(model)
    d, d_ff = model.config.hidden_size, model.config.intermediate_size
    wrong = Edit([Update(1, "mlp.out", torch.ones(1, d), torch.ones(1, d_ff))])
    with pytest.raises(ValueError, match=rf"has shape \({d}, {d_ff}\) but the model's weight has shape "
                                         rf"\({d_ff}, {d}\) \(both d_in x d_out\)"):
        wrong.apply(model)
    assert same_weights(model, snap) and not wrong.applied
    with Edit([Update(1, "mlp.out", torch.ones(1, d_ff), torch.ones(1, d))]).apply(model):
        assert torch.equal(model.model.layers[1].mlp.down_proj.weight, snap["model.layers.1.mlp.down_proj.weight"] + 1)


def test_a_model_without_calibration_edits_with_the_documented_default(tokenizer):
    """No calibration and no settings: the last layer, with the scale chosen from the last position's logits."""
    model = tiny("llama")
    t = token(tokenizer, TARGET)
    with edit(model, tokenizer, PROMPT, TARGET) as result:
        assert result.info["source"] == "uncalibrated default" and result.info["layer"] == 1
        assert result.info["scale"] == "auto" and result.info["margin"] == 1.0
        assert last_logits(model, tokenizer, PROMPT).argmax().item() == t
    with edit(model, tokenizer, PROMPT, TARGET, method="gradient") as result:
        assert result.info["source"] == "uncalibrated default" and result.info["lr"] > 0


def test_a_calibration_file_is_reused_and_checked(tokenizer, tmp_path):
    import json

    model = tiny("gpt2")
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"fingerprint": bind(model).fingerprint(),
                                "variants": {"forward_shift": {"layer": 0, "scale": 0.125}}}))
    with edit(model, tokenizer, PROMPT, TARGET, calibration=path, skip_if_argmax=False) as result:
        assert (result.info["layer"], result.info["scale"], result.info["source"]) == (0, 0.125, "calibration")
    path.write_text(json.dumps({"fingerprint": "0" * 16, "variants": {}}))
    with pytest.raises(ValueError, match="made for another model"):
        edit(model, tokenizer, PROMPT, TARGET, calibration=path)
    path.write_text("{")
    with pytest.raises(ValueError, match="calibration file .* is damaged"):
        edit(model, tokenizer, PROMPT, TARGET, calibration=path)


def test_whitening_cache_lives_under_the_cache_folder(tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("BLENS_FAST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    from blens_fast.editing import whitening

    monkeypatch.setattr(whitening, "_CACHE", {})
    model = tiny("gpt2")
    ff2_whitening(model, tokenizer, 1, ["Paris is in France", "The cat sat"], progress=False)
    files = list((tmp_path / "xdg" / "blens_fast" / "ff2_whitening").glob("*.safetensors"))
    assert len(files) == 2  # every layer from the one pass


def test_repr_and_the_edit_stack_of_a_context(tokenizer):
    model = tiny("gpt2")
    ctx = bind(model, tokenizer)
    assert applied_edits(model) == applied_edits(ctx) == ()  # never edited
    made = edit(ctx, PROMPT, TARGET, layer=1, scale=1.0, skip_if_argmax=False)
    assert applied_edits(ctx) == applied_edits(model) == (made,)
    assert repr(made) == (f"Edit(method='forward_shift', fact={PROMPT!r} -> {TARGET!r}, touched=[(1, 'mlp.out')], "
                          "steps=1, applied)")
    made.revert()
    assert repr(made).endswith("steps=1, not applied)") and applied_edits(ctx) == ()
    assert repr(Edit(made.updates, {"method": "custom", "prompts": ["p"]})) == (
        "Edit(method='custom', fact='p' -> '?', touched=[(1, 'mlp.out')], steps=1, not applied)")
    assert repr(Edit(made.updates)) == "Edit(method=None, touched=[(1, 'mlp.out')], steps=1, not applied)"


def test_saved_info_drops_private_keys_and_writes_other_values_as_text(tmp_path):
    step = Update(1, "mlp.out", torch.ones(1, 4), torch.ones(1, 3))
    path = Edit([step], {"method": "m", "_live": object(), "dtype": torch.float16}).save(tmp_path / "e.safetensors")
    assert Edit.load(path).info == {"method": "m", "dtype": "torch.float16"}


def test_an_edit_file_without_info_loads_with_an_empty_record(tmp_path):
    from safetensors.torch import save_file

    from blens_fast.editing.update import FORMAT

    path = tmp_path / "bare.safetensors"
    save_file({"update.0.left": torch.ones(1, 4), "update.0.right": torch.ones(1, 3)}, str(path),
              metadata={"format": FORMAT, "steps": '[{"layer": 2, "module": "mlp.out"}]'})
    loaded = Edit.load(path)
    assert loaded.info == {} and loaded.touched == ((2, "mlp.out"),)


def test_settings_are_one_typed_value_resolved_once_and_reused(tokenizer):
    """resolve_settings gives a frozen EditSettings; edit(settings=...) does what the same keywords do, and refuses
    keywords beside it rather than ignoring them."""
    ctx = bind(tiny("gpt2"), tokenizer)
    settings = resolve_settings(ctx, layer=1, scale=2, skip_if_argmax=False)
    assert settings == EditSettings("forward_shift", 1, "forward_shift", "given", scale=2.0, skip_if_argmax=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.layer = 0
    assert settings.to_record() == {"layer": 1, "scale": 2.0, "skip_if_argmax": False, "variant": "forward_shift",
                                    "source": "given"}
    with edit(ctx, PROMPT, TARGET, settings=settings) as reused:
        delta = reused.delta(1, "mlp.out")
        assert (reused.info["variant"], reused.info["source"], reused.info["scale"]) == ("forward_shift", "given", 2.0)
    with edit(ctx, PROMPT, TARGET, layer=1, scale=2.0, skip_if_argmax=False) as direct:
        assert torch.equal(direct.delta(1, "mlp.out"), delta)
    with pytest.raises(ValueError, match="leave out layer, whiten"):
        edit(ctx, PROMPT, TARGET, settings=settings, layer=0, whiten=True)
    with pytest.raises(TypeError, match="EditSettings"):
        edit(ctx, PROMPT, TARGET, settings={"layer": 1, "scale": 2.0})
    auto = resolve_settings(ctx, normalize_key=True, scale="auto", margin=2)
    assert (auto.layer, auto.margin, auto.variant, auto.auto) == (1, 2.0, "forward_shift_normalized_auto", True)
    gradient = resolve_settings(ctx, "gradient", layer=0, lr=1)
    assert gradient.to_record() == {"layer": 0, "steps": 5, "lr": 1.0, "variant": "gradient",
                                    "source": "uncalibrated default"}  # the steps
    with pytest.raises(TypeError, match="whiten must be"):
        resolve_settings(ctx, layer=1, scale=1.0, whiten="yes")
