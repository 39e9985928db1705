"""Hostile model folders: an index that points at a pickle, out of the folder or at a file that is not there; links
leading out of the folder; a config that names its own weights file. Only the folder's own safetensors files are
ever opened, no pickle is ever unpickled, and nothing outside the folder is read or changed."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from blens_fast import load_model
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this writes a file: proof that a pickle was loaded."""

    def __init__(self, proof):
        self.proof = str(proof)

    def __reduce__(self):
        return (exec, (f"open({self.proof!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("model")
    make_tiny_model("gpt2").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def copy_without_weights(folder, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("model.safetensors"))
    return target


def write_index(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def refused(path, *needles):
    with pytest.raises(ValueError) as error:
        load_model(path)
    for needle in needles:
        assert needle in str(error.value), str(error.value)


def test_an_index_pointing_at_a_pickle_is_refused_and_never_unpickled(folder, tmp_path, canary):
    model = copy_without_weights(folder, tmp_path)
    proof = canary.root / "pwned.txt"
    tensors = load_file(folder / "model.safetensors")
    torch.save({**tensors, "payload": Payload(proof)}, model / "pytorch_model.bin")
    (model / "decoy.safetensors").write_bytes(b"")
    write_index(model, {name: "pytorch_model.bin" for name in tensors})
    refused(model, "'pytorch_model.bin'", "expected the plain name of a *.safetensors file")
    assert not proof.exists()
    canary.check()


@pytest.mark.parametrize("entry", ["../outside/stolen.safetensors", "/outside/stolen.safetensors",
                                   "sub/model.safetensors", "..", ".hidden.safetensors"])
def test_an_index_entry_outside_the_folder_is_refused(folder, tmp_path, canary, entry):
    model = copy_without_weights(folder, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    save_file(tensors, canary.root / "stolen.safetensors")
    canary.refresh()
    write_index(model, {name: entry.replace("/outside", str(canary.root)) for name in tensors})
    refused(model, "expected the plain name of a *.safetensors file inside the folder")
    canary.check()


def test_an_index_naming_a_missing_file_or_lying_about_a_tensor_is_refused(folder, tmp_path):
    model = copy_without_weights(folder, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:10]}, model / "part-1.safetensors")
    save_file({n: tensors[n] for n in names[10:]}, model / "part-2.safetensors")
    write_index(model, {n: "part-1.safetensors" if i < 10 else "part-3.safetensors" for i, n in enumerate(names)})
    refused(model, "part-3.safetensors")
    write_index(model, {n: "part-1.safetensors" if i < 11 else "part-2.safetensors" for i, n in enumerate(names)})
    refused(model, f"{names[10]} (the index says part-1.safetensors, the files say part-2.safetensors)")
    write_index(model, {n: "part-1.safetensors" if i < 10 else "part-2.safetensors" for i, n in enumerate(names)})
    loaded = load_model(model).model.state_dict()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name


def test_a_weights_file_linked_from_outside_is_refused(folder, tmp_path, canary):
    model = copy_without_weights(folder, tmp_path)
    shutil.copy(folder / "model.safetensors", canary.root / "real.safetensors")
    canary.refresh()
    (model / "model.safetensors").symlink_to(canary.root / "real.safetensors")
    refused(model, "symbolic links leading out of it", "'model.safetensors'")
    canary.check()


def test_a_tokenizer_file_linked_from_outside_is_refused(folder, tmp_path, canary):
    model = tmp_path / "model"
    shutil.copytree(folder, model)
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(canary.path())
    refused(model, "symbolic links leading out of it", "'tokenizer.json'")
    canary.check()


def test_a_link_inside_the_folder_is_followed(folder, tmp_path):
    model = copy_without_weights(folder, tmp_path)
    (model / "weights").mkdir()
    shutil.copy(folder / "model.safetensors", model / "weights" / "real.safetensors")
    (model / "model.safetensors").symlink_to("weights/real.safetensors")
    assert torch.equal(load_model(model).model.transformer.wte.weight,
                       load_file(folder / "model.safetensors")["transformer.wte.weight"])


def test_a_config_naming_its_own_weights_file_is_not_followed(folder, tmp_path, canary):
    """transformers reads ``transformers_weights`` from config.json as the weights' file name; blens_fast opens only
    ``model.safetensors`` or the index's files."""
    model = tmp_path / "model"
    shutil.copytree(folder, model)
    proof = canary.root / "pwned.txt"
    torch.save({"payload": Payload(proof)}, model / "evil.bin")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "transformers_weights": "evil.bin"}))
    load_model(model)
    assert not proof.exists()
    canary.check()


def test_only_pickles_is_refused_naming_them(folder, tmp_path):
    model = copy_without_weights(folder, tmp_path)
    torch.save(load_file(folder / "model.safetensors"), model / "pytorch_model.bin")
    refused(model, "has no model.safetensors", "pytorch_model.bin", "only safetensors checkpoints are loaded")
