"""Hostile edit files (issue 23, defect 4): NaN or Inf, factors of other ranks, shapes or dtypes, steps that name no
layer or module of the model, tensors no step names, no fingerprint. Each is refused naming the file, before any
weight is written; the model stays bit for bit as it was and nothing outside changes."""
import json

import pytest
import torch
from safetensors.torch import save_file

from blens_fast import Edit, bind
from blens_fast.editing import Update
from blens_fast.editing.update import FORMAT
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def ctx(tokenizer):
    return bind(make_tiny_model("gpt2"), tokenizer)


def weights(ctx):
    return {name: tensor.clone() for name, tensor in ctx.model.state_dict().items()}


def unchanged(ctx, before):
    return all(torch.equal(tensor, before[name]) for name, tensor in ctx.model.state_dict().items())


def write(path, tensors, steps, *, info=None, fmt=FORMAT):
    metadata = {"format": fmt, "steps": json.dumps(steps)}
    if info is not None:
        metadata["info"] = json.dumps(info)
    save_file(tensors, str(path), metadata=metadata)
    return path


def step(left, right, layer=1, module="mlp.out"):
    """A one-step file's tensors and steps: ``mlp.out`` of the tiny GPT-2 is 128 x 32 (Conv1D: in x out)."""
    return {"update.0.left": left, "update.0.right": right}, [{"layer": layer, "module": module}]


GOOD = (torch.ones(1, 128), torch.ones(1, 32))


@pytest.mark.parametrize("tensors, steps, info, why", [
    (*step(torch.full((1, 128), float("nan")), GOOD[1]), {}, "its factors hold NaN or Inf"),
    (*step(GOOD[0], torch.tensor([[float("inf")] * 32])), {}, "its factors hold NaN or Inf"),
    (*step(torch.ones(2, 128), GOOD[1]), {}, "ranks 2 and 1"),
    (*step(torch.ones(1, 128, dtype=torch.int32), GOOD[1]), {}, "torch.int32 (1, 128), expected a 2-D floating"),
    (*step(torch.ones(128), GOOD[1]), {}, "expected a 2-D floating-point tensor"),
    (*step(*GOOD, layer="1"), {}, "its layer is '1'"),
    (*step(*GOOD, layer=-1), {}, "its layer is -1"),
    (*step(*GOOD, module=7), {}, "its module is 7"),
    ({**step(*GOOD)[0], "payload": torch.ones(3)}, step(*GOOD)[1], {}, "tensors no step names: payload"),
    (*step(*GOOD), {"fingerprint": 12}, "a string fingerprint"),
    (step(*GOOD)[0], {"layer": 1}, {}, "'steps' is dict"),
])
def test_a_hostile_file_is_refused_at_load(tmp_path, canary, tensors, steps, info, why):
    path = write(tmp_path / "edit.safetensors", tensors, steps, info=info)
    with pytest.raises(ValueError, match="edit.safetensors") as error:
        Edit.load(path)
    assert why in str(error.value)
    canary.check()


def test_a_file_of_another_format_is_refused(tmp_path):
    path = write(tmp_path / "old.safetensors", *step(*GOOD), fmt="blens_fast.edit/2")
    with pytest.raises(ValueError, match="old.safetensors' is not a readable .* expected 'blens_fast.edit/3'"):
        Edit.load(path)


@pytest.mark.parametrize("left, right, layer, module, why", [
    (torch.ones(1, 64), torch.ones(1, 32), 1, "mlp.out", "has shape (64, 32) but the model's weight has shape "
                                                         "(128, 32)"),
    (*GOOD, 5, "mlp.out", "layer"),
    (*GOOD, 1, "mlp.nope", "mlp.nope"),
])
def test_a_file_that_does_not_fit_the_model_is_refused_at_apply(ctx, tmp_path, canary, left, right, layer, module,
                                                                why):
    path = write(tmp_path / "edit.safetensors", *step(left, right, layer, module), info={"fingerprint": "x"})
    loaded = Edit.load(path)
    before = weights(ctx)
    with pytest.raises(ValueError, match=r"edit file .*edit.safetensors': step 0 cannot be applied") as error:
        loaded.apply(ctx, force=True)
    assert why in str(error.value) and unchanged(ctx, before) and not loaded.applied
    canary.check()


def test_an_update_with_nan_made_in_memory_is_refused_at_apply(ctx):
    before = weights(ctx)
    with pytest.raises(ValueError, match="this edit: step 1 cannot be applied: its factors hold NaN or Inf"):
        Edit([Update(1, "mlp.out", *GOOD), Update(0, "mlp.out", GOOD[0], GOOD[1] * float("nan"))]).apply(ctx)
    assert unchanged(ctx, before)


def test_a_file_without_a_fingerprint_applies_only_when_forced(ctx, tmp_path):
    loaded = Edit.load(write(tmp_path / "bare.safetensors", *step(*GOOD)))
    before = weights(ctx)
    with pytest.raises(ValueError, match="bare.safetensors' records no fingerprint .* force=True"):
        loaded.apply(ctx)
    assert unchanged(ctx, before)
    with loaded.apply(ctx, force=True):
        assert not unchanged(ctx, before)
    assert unchanged(ctx, before)
