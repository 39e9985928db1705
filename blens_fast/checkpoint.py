"""A model folder, read strictly: each file is trusted for one thing and checked before the model is used.

- ``config.json``: the architecture, built by transformers from its own classes (remote code never runs); the sizes
  every architecture needs (layers, width, vocabulary) must be positive integers.
- The weights: ``model.safetensors``, or the files ``model.safetensors.index.json`` names (plain ``*.safetensors``
  names of files inside the folder). Only these safetensors files are opened, never a pickle (loading one can run
  code). They must match the architecture exactly: every parameter comes from them, every tensor in them is used,
  each with its parameter's shape. A tied parameter (the unembedding under ``tie_word_embeddings``) may be absent and,
  when present, must equal its partner; derived buffers old checkpoints carry (causal masks, rotary frequencies: the
  model class lists them) are skipped. Anything else is one ``ValueError`` naming the missing, unexpected and
  mis-shaped tensors: a model whose weights and config disagree is never loaded with random tensors filling the gap.
- The tokenizer files (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``, or ``tokenizer.model``...).
- A symbolic link in the folder that leads out of it is refused: nothing outside the folder is read.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ._checks import first_line
from ._io import named_links, read_json, resolves_inside, symlinks_below

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
#: the tokenizer files transformers reads: a model folder needs one of these sets
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",), ("vocab.txt",))
#: the sizes every architecture needs (transformers' standard attribute names)
CONFIG_SIZES = ("num_hidden_layers", "hidden_size", "vocab_size")
_SAFETENSORS_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\.safetensors")
_FLOATING = {"F64", "F32", "F16", "BF16"}
_LISTED = 6  # names listed per kind of problem in an error


def weight_files(folder: Path, spec) -> tuple[list[Path], dict | None]:
    """The weight files of the model folder ``folder`` (``spec``: what the caller named) and the index's
    ``weight_map`` (None without an index), after checking the folder: it exists, holds ``config.json`` as JSON,
    and no symbolic link in it leads out of it; an index names plain ``*.safetensors`` files inside it."""
    if not folder.is_dir():
        raise ValueError(f"model {str(spec)!r}: no such folder (expected 'default' or a local Hugging Face folder)")
    if not (folder / "config.json").is_file():
        raise ValueError(f"model folder {str(folder)!r} has no config.json: expected a transformers checkpoint")
    _refuse_links_out(folder)
    read_json(folder / "config.json", "model config")
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS], None
    if (folder / INDEX).is_file():
        return _indexed_files(folder)
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"))
    raise ValueError(f"model folder {str(folder)!r} has no {WEIGHTS} and no {INDEX}"
                     + (f" (found {', '.join(found)}; only safetensors checkpoints are loaded, as {WEIGHTS} or the "
                        "files of an index: other formats can run code when loaded)" if found else ""))


def _refuse_links_out(folder: Path) -> None:
    outside = [p for p in symlinks_below(folder) if not resolves_inside(folder, p)]
    if outside:
        raise ValueError(f"model folder {str(folder)!r} holds symbolic links leading out of it "
                         f"({named_links(folder, outside, _LISTED)}): refusing to read through them; copy the files "
                         "into the folder instead (cp -L)")


def _indexed_files(folder: Path) -> tuple[list[Path], dict]:
    path = folder / INDEX
    index = read_json(path, "safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"safetensors index {str(path)!r} has no 'weight_map' (tensor name -> file name)")
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not _SAFETENSORS_NAME.fullmatch(name):
            raise ValueError(f"safetensors index {str(path)!r} maps {tensor!r} to {name!r}: expected the plain name of "
                             "a *.safetensors file inside the folder (no folder, no '..'); refusing to open it")
    names = sorted(set(weight_map.values()))
    absent = [name for name in names if not (folder / name).is_file()]
    if absent:
        raise ValueError(f"safetensors index {str(path)!r} names files the folder does not hold as regular files: "
                         f"{', '.join(absent[:_LISTED])}")
    return [folder / name for name in names], weight_map


def check_tokenizer_files(folder: Path) -> None:
    """A ``ValueError`` naming the files a tokenizer needs when ``folder`` holds none of them."""
    if not any(all((folder / name).is_file() for name in names) for names in TOKENIZER_FILES):
        raise ValueError(f"model folder {str(folder)!r} has no tokenizer files (expected {tokenizer_files_text()}; it "
                         f"holds {', '.join(sorted(p.name for p in folder.iterdir())) or 'nothing'}): save them beside "
                         "the weights with tokenizer.save_pretrained(folder)")


def tokenizer_files_text() -> str:
    return ", or ".join(" + ".join(names) for names in TOKENIZER_FILES)


def read_config(folder: Path):
    """The transformers config of ``folder/config.json``, with positive sizes (a ``ValueError`` naming the file and
    the entry otherwise)."""
    import transformers
    from huggingface_hub.errors import StrictDataclassError

    path = str(folder / "config.json")
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as error:
        raise ValueError(f"{path!r} is not a config transformers can read: {first_line(error)}") from None
    for name in CONFIG_SIZES:
        value = getattr(config, name, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            key = config.attribute_map.get(name, name)
            raise ValueError(f"{path!r} gives {key}={value!r}: expected a positive integer")
    return config


def load_checkpoint(folder: Path, files: list[Path], weight_map: dict | None, config, dtype: torch.dtype) -> nn.Module:
    """The causal LM ``config`` describes, in ``dtype`` on the CPU, with every parameter read from ``files``
    (strictly: see the module docstring)."""
    import transformers
    from transformers.initialization import no_init_weights

    try:
        with no_init_weights():  # every parameter is read from the files below, so none is initialised here
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except (ValueError, TypeError, KeyError, RuntimeError) as error:
        raise ValueError(f"{str(folder / 'config.json')!r} describes no model transformers can build: "
                         f"{first_line(error)}") from None
    model.tie_weights()
    _load_weights(model, folder, files, weight_map)
    return model


def _load_weights(model: nn.Module, folder: Path, files: list[Path], weight_map: dict | None) -> None:
    from safetensors import SafetensorError, safe_open

    expected = model.state_dict(keep_vars=True)
    target_of = _target_names(model, expected)
    derived = _derived_buffers(model)
    sources: dict[str, tuple[Path, str]] = {}  # model tensor name -> where the checkpoint holds it
    located: dict[str, str] = {}  # checkpoint tensor -> file name
    unexpected, misshaped, twice = [], [], []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key in located:
                        twice.append(f"{key} (in {located[key]} and {file.name})")
                        continue
                    located[key] = file.name
                    name = target_of(key)
                    if name is None:
                        if derived is None or not derived.search(key):
                            unexpected.append(key)
                        continue
                    if name in sources:
                        twice.append(f"{name} (as {sources[name][1]} and {key})")
                        continue
                    sources[name] = (file, key)
                    part = f.get_slice(key)
                    shape, dtype, target = list(part.get_shape()), part.get_dtype(), expected[name]
                    if shape != list(target.shape):
                        misshaped.append(f"{key}: {shape} in the weights, {list(target.shape)} in the architecture")
                    elif (dtype in _FLOATING) != target.is_floating_point():
                        misshaped.append(f"{key}: {dtype} in the weights, {target.dtype} in the architecture")
        except SafetensorError as error:
            raise ValueError(f"weights file {str(file)!r} is not a readable safetensors file: {first_line(error)}") \
                from None
    missing = _missing(model, expected, sources)
    if weight_map is not None and weight_map != located:
        differ = sorted(k for k in set(weight_map) | set(located) if weight_map.get(k) != located.get(k))
        twice += [f"{k} (the index says {weight_map.get(k)}, the files say {located.get(k)})" for k in differ]
    problems = [f"{len(found)} {what} ({_listed(found)})" for what, found in (
        ("missing from the weights", missing), ("unexpected in the weights", unexpected),
        ("of another shape or kind", misshaped), ("found twice or misplaced", twice)) if found]
    if problems:
        config = model.config
        raise ValueError(f"model folder {str(folder)!r} does not match its config.json ({config.model_type}: "
                         f"layers={config.num_hidden_layers}, width={config.hidden_size}, vocabulary="
                         f"{config.vocab_size}): {'; '.join(problems)}; the weights and config.json must describe "
                         "the same model")
    _copy(model, expected, sources, folder)


def _target_names(model: nn.Module, expected: dict):
    """Checkpoint tensor name -> the model's name for it, or None: transformers' renamings of the architecture
    (legacy names such as GPT-NeoX's ``embed_out``) and its base-model prefix, which a checkpoint of the base model
    lacks. A tensor that would need one of transformers' conversions (merging or splitting tensors) is not used."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None) or None

    def target(key: str) -> str | None:
        name, converted = rename_source_key(key, renamings, converters, prefix, expected)
        return name if converted is None and name in expected else None

    return target


def _derived_buffers(model: nn.Module):
    """The names of buffers old checkpoints carry and the architecture recomputes (the model class's list, as
    transformers reads it, plus rotary frequencies and position ids where the model has such buffers)."""
    patterns = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    buffers = [name for name, _ in model.named_buffers()]
    if any(name.endswith("rotary_emb.inv_freq") for name in buffers):
        patterns.append(r"rotary_emb\.inv_freq")
    if any(name.endswith("position_ids") for name in buffers):
        patterns.append(r"position_ids")
    return re.compile("|".join(rf"(?:(?:^|\.)(?:{p})$)" for p in patterns)) if patterns else None


def _missing(model: nn.Module, expected: dict, sources: dict) -> list[str]:
    """Parameters no checkpoint tensor gives, one name per group of tied parameters."""
    names_of: dict[int, list[str]] = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(expected[name]), []).append(name)
    return [names[0] for names in names_of.values() if not any(name in sources for name in names)]


@torch.no_grad()
def _copy(model: nn.Module, expected: dict, sources: dict, folder: Path) -> None:
    """Read every checkpoint tensor into its parameter; tied parameters given twice must agree."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, (file, _) in sources.items():
        by_file.setdefault(file, []).append(name)
    written: dict[int, str] = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                key, target = sources[name][1], expected[name]
                value = f.get_tensor(key)
                if id(target) in written:
                    if not torch.equal(target, value.to(target.dtype)):
                        raise ValueError(f"model folder {str(folder)!r}: {key} and {written[id(target)]} differ, but "
                                         "config.json ties them (tie_word_embeddings): untie them in config.json or "
                                         "save one of them")
                    continue
                target.copy_(value)
                written[id(target)] = key


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more
