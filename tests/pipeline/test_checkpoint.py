"""load_model reads a model folder strictly: every architecture loads bit for bit; a folder whose config and weights
disagree (layers, width, vocabulary, a missing or extra tensor, tied tensors that differ) is refused with one error
naming the tensors; a bad config entry names config.json; a folder without tokenizer files is refused at load."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from blens_fast import load_model
from blens_fast.cli import main
from tests.helpers import ARCHITECTURES, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def save_folder(path, model, tokenizer):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, tokenizer):
    return save_folder(tmp_path_factory.mktemp("gpt2"), make_tiny_model("gpt2"), tokenizer)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, tokenizer):
    return save_folder(tmp_path_factory.mktemp("llama"), make_tiny_model("llama"), tokenizer)


def variant(base, tmp_path, *, config=None, weights=None):
    """A copy of the folder ``base`` with ``config`` entries changed and its tensors passed through ``weights``."""
    folder = tmp_path / "variant"
    shutil.copytree(base, folder)
    if config:
        values = json.loads((folder / "config.json").read_text())
        values.update(config)
        (folder / "config.json").write_text(json.dumps(values))
    if weights:
        tensors = weights(load_file(folder / "model.safetensors"))
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def refused(folder, *needles):
    with pytest.raises(ValueError) as error:
        load_model(folder)
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_loads_bit_for_bit(arch, tmp_path, tokenizer):
    model = make_tiny_model(arch)
    ctx = load_model(save_folder(tmp_path, model, tokenizer))
    saved, loaded = model.state_dict(), ctx.model.state_dict()
    assert saved.keys() == loaded.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, loaded[name]), name
    ids = torch.tensor([[10, 20, 30, 40]])
    assert torch.equal(model(ids).logits, ctx.model(ids).logits)


def test_more_layers_in_the_config_than_in_the_weights(gpt2_folder, tmp_path):
    message = refused(variant(gpt2_folder, tmp_path, config={"n_layer": 3}), "12 missing from the weights",
                      "transformer.h.2.ln_1.weight", "and 6 more", "layers=3")
    assert "transformer.h.1." not in message


def test_fewer_layers_in_the_config_than_in_the_weights(gpt2_folder, tmp_path):
    refused(variant(gpt2_folder, tmp_path, config={"n_layer": 1}), "12 unexpected in the weights",
            "transformer.h.1.")


def test_a_missing_tensor_is_named(gpt2_folder, llama_folder, tmp_path):
    drop = "transformer.h.0.mlp.c_fc.weight"
    refused(variant(gpt2_folder, tmp_path, weights=lambda t: {k: v for k, v in t.items() if k != drop}),
            f"1 missing from the weights ({drop})")
    shutil.rmtree(tmp_path / "variant")
    drop = "model.layers.1.mlp.up_proj.weight"
    refused(variant(llama_folder, tmp_path, weights=lambda t: {k: v for k, v in t.items() if k != drop}),
            f"1 missing from the weights ({drop})")


def test_an_untied_unembedding_must_be_in_the_weights(llama_folder, tmp_path):
    assert not json.loads((llama_folder / "config.json").read_text()).get("tie_word_embeddings")
    refused(variant(llama_folder, tmp_path, weights=lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"}),
            "missing from the weights (lm_head.weight)")


def test_an_extra_tensor_is_unexpected(llama_folder, tmp_path):
    refused(variant(llama_folder, tmp_path, weights=lambda t: {**t, "model.extra.weight": torch.zeros(3)}),
            "1 unexpected in the weights (model.extra.weight)")


@pytest.mark.parametrize("entry, tensor", [({"n_embd": 64}, "transformer.h.0.ln_1.weight: [32] in the weights, [64] "
                                                              "in the architecture"),
                                           ({"vocab_size": 50000}, "transformer.wte.weight: [50257, 32] in the "
                                                                   "weights, [50000, 32] in the architecture")])
def test_width_and_vocabulary_mismatches_are_one_error(gpt2_folder, tmp_path, capsys, entry, tensor):
    folder = variant(gpt2_folder, tmp_path, config=entry)
    refused(folder, tensor)
    assert main(["lens", "--prompt", "The capital of France is", "--target", " Paris", "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and tensor in err and "Traceback" not in err


def test_a_tensor_of_another_kind_is_refused(gpt2_folder, tmp_path):
    name = "transformer.ln_f.weight"
    refused(variant(gpt2_folder, tmp_path, weights=lambda t: {**t, name: t[name].to(torch.int32)}),
            f"{name}: I32 in the weights")


def test_tied_tensors_in_the_weights_must_agree(gpt2_folder, tmp_path):
    same = variant(gpt2_folder, tmp_path, weights=lambda t: {
        **t, "lm_head.weight": t["transformer.wte.weight"].clone()})
    ctx = load_model(same)
    assert ctx.model.lm_head.weight is ctx.model.transformer.wte.weight
    shutil.rmtree(same)
    other = variant(gpt2_folder, tmp_path, weights=lambda t: {
        **t, "lm_head.weight": torch.randn_like(t["transformer.wte.weight"])})
    refused(other, "lm_head.weight", "transformer.wte.weight", "tie_word_embeddings")


def test_a_checkpoint_of_the_base_model_loads(gpt2_folder, tmp_path):
    """Checkpoints saved from the base model (as GPT-2's own) name tensors without the ``transformer.`` prefix and
    may carry the causal-mask buffers the architecture recomputes."""
    folder = variant(gpt2_folder, tmp_path, weights=lambda t: {
        **{k.removeprefix("transformer."): v for k, v in t.items()}, "h.0.attn.bias": torch.ones(1, 1, 64, 64)})
    loaded = load_model(folder).model.state_dict()
    for name, tensor in load_file(gpt2_folder / "model.safetensors").items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("entry, named", [({"n_layer": -1}, "n_layer=-1"), ({"n_layer": 0}, "n_layer=0"),
                                          ({"vocab_size": 0}, "vocab_size=0"), ({"n_layer": "two"}, "n_layer")])
def test_a_bad_config_entry_names_the_config(gpt2_folder, tmp_path, capsys, entry, named):
    folder = variant(gpt2_folder, tmp_path, config=entry)
    refused(folder, "config.json", named)
    assert main(["lens", "--prompt", "a", "--target", "b", "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json" in err and "nothing to capture" not in err


def test_an_unbuildable_config_is_one_error(gpt2_folder, tmp_path):
    refused(variant(gpt2_folder, tmp_path, config={"n_head": 5}), "config.json", "describes no model")


def test_a_folder_without_tokenizer_files_is_refused_at_load(gpt2_folder, tmp_path):
    """Issue 24, item 1: the error names the files, instead of a tokenizer with vocab_size=0 blaming the prompt."""
    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(gpt2_folder / name, folder / name)
    refused(folder, "has no tokenizer files", "tokenizer.json", "vocab.json + merges.txt", "save_pretrained")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    refused(folder, "has no tokenizer files")
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {},
                                                                                    "merges": []}}))
    refused(folder, "tokenizer")


def test_the_loaded_model_is_the_saved_one_not_a_random_one(gpt2_folder):
    """The loader reads every parameter: nothing is left at its uninitialised memory or a random init."""
    ctx = load_model(gpt2_folder)
    saved = load_file(gpt2_folder / "model.safetensors")
    params = dict(ctx.model.named_parameters())
    assert set(params) <= set(saved) | {"lm_head.weight"}
    for name, param in params.items():
        assert torch.equal(param, saved.get(name, saved["transformer.wte.weight"])), name
