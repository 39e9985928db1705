"""The fingerprint a saved edit checks (issue 23, defect 5): every value of the weights it touches and the
architecture, so an edit of one fine-tune is refused on another that shares its embedding and first layers; the
same weights in another dtype still match; calibrated settings keep their own, edit-proof fingerprint."""
import copy

import pytest
import torch

from blens_fast import Edit, bind, edit, load_default_model
from blens_fast.editing import calibrated_defaults
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, TARGET = "The Eiffel Tower is located in the city of", " Rome"


def saved_edit(ctx, path):
    made = edit(ctx, PROMPT, TARGET, layer=1, scale=1.0, skip_if_argmax=False)
    made.save(path)
    made.revert()
    return Edit.load(path)


def test_an_edit_of_one_fine_tune_is_refused_on_another(tokenizer, tmp_path):
    """Two fine-tunes of one base model: the same embedding and layer 0, one value apart in the edited weight."""
    base = make_tiny_model("gpt2")
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.transformer.h[1].mlp.c_proj.weight[17, 3] += 1e-3
    loaded = saved_edit(bind(base, tokenizer), tmp_path / "edit.safetensors")
    assert bind(base).fingerprint() == bind(other).fingerprint()  # what the edit file used to record
    with pytest.raises(ValueError, match="edit.safetensors' was made on another model .*force=True"):
        loaded.apply(other)
    loaded.apply(base).revert()


def test_the_same_weights_in_another_architecture_are_refused(tokenizer, tmp_path):
    base = make_tiny_model("gpt2")
    other = copy.deepcopy(base)
    other.config.layer_norm_epsilon = 1e-3
    loaded = saved_edit(bind(base, tokenizer), tmp_path / "edit.safetensors")
    with pytest.raises(ValueError, match="was made on another model"):
        loaded.apply(other)


def test_an_edit_made_on_top_of_another_does_not_apply_without_it(tokenizer, tmp_path):
    ctx = bind(make_tiny_model("gpt2"), tokenizer)
    first = edit(ctx, "Danielle Darrieux speaks", " English", layer=1, scale=2.0, skip_if_argmax=False)
    second = edit(ctx, PROMPT, TARGET, layer=1, scale=1.0, skip_if_argmax=False)
    second.save(tmp_path / "second.safetensors")
    second.revert()
    first.revert()
    with pytest.raises(ValueError, match="second.safetensors' was made on another model"):
        Edit.load(tmp_path / "second.safetensors").apply(ctx)
    with first.apply(ctx):
        Edit.load(tmp_path / "second.safetensors").apply(ctx).revert()


def test_the_same_weights_in_bfloat16_match_and_calibrations_still_apply(tmp_path):
    """The shipped weights are bfloat16: loaded as float32 they hold the same values."""
    full, half = load_default_model(), load_default_model(dtype=torch.bfloat16)
    made = edit(full, PROMPT, TARGET, progress=False)
    made.save(tmp_path / "edit.safetensors")
    made.revert()
    Edit.load(tmp_path / "edit.safetensors").apply(half).revert()
    assert calibrated_defaults(full) == calibrated_defaults(half) != {}


def test_the_fingerprint_reads_every_value_of_the_touched_weights(tokenizer):
    """Any one value of the touched weight changes it, wherever it lies (a sample of the values would miss most)."""
    ctx = bind(make_tiny_model("gpt2"), tokenizer)
    weight = ctx.weight(1, "mlp.out")
    first = ctx.tensors_fingerprint({"1.mlp.out": weight})
    seen = {first}
    for index in range(0, weight.numel(), 97):
        changed = weight.detach().clone()
        changed.view(-1)[index] = torch.nextafter(changed.view(-1)[index], torch.tensor(float("inf")))
        seen.add(ctx.tensors_fingerprint({"1.mlp.out": changed}))
    assert len(seen) == 1 + len(range(0, weight.numel(), 97))
    assert ctx.tensors_fingerprint({"1.mlp.out": weight}) == first


def test_an_edit_saved_after_its_revert_is_refused_and_unsaved_edits_never_pay(tokenizer, tmp_path, monkeypatch):
    """The fingerprint is taken from the weights an edit keeps while applied: after a revert they are gone."""
    ctx = bind(make_tiny_model("gpt2"), tokenizer)
    made = edit(ctx, PROMPT, TARGET, layer=1, scale=1.0, skip_if_argmax=False)
    made.revert()
    with pytest.raises(ValueError, match="was reverted before it was saved: save it while it is applied"):
        made.save(tmp_path / "edit.safetensors")
    with made.apply(ctx):
        made.save(tmp_path / "edit.safetensors")
    Edit.load(tmp_path / "edit.safetensors").apply(ctx).revert()

    def unwanted(*args):
        raise AssertionError("an edit that is not saved computed a fingerprint")

    monkeypatch.setattr(type(ctx), "tensors_fingerprint", unwanted)
    edit(ctx, PROMPT, TARGET, layer=1, scale=1.0, skip_if_argmax=False).revert()
    edit(ctx, PROMPT, TARGET, method="gradient", layer=1, lr=0.1, steps=1).revert()
