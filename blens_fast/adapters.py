"""Architecture adapters: one declarative table per model family.

Everything above this module speaks of (in, out) factors and of the public module names
``mlp.in`` / ``mlp.gate`` / ``mlp.up`` / ``mlp.out`` / ``attn.q`` / ``attn.k`` / ``attn.v`` /
``attn.qkv`` / ``attn.o``; the adapter knows where those live in a ``transformers`` model, how
their weights are laid out, and which final norm and unembedding make the model's own lens.

One naming rule: a name means the same weight everywhere, and every table and call answers to the name it was asked
by. Where a model stores a name as several matrices reading the same input (a gated MLP's ``mlp.in`` is ``mlp.gate``
and ``mlp.up``; ``attn.qkv`` where q, k and v are separate) the name is those matrices side by side, ``[gate | up]``
or ``[q | k | v]`` along the output; where a model fuses a name into a larger matrix (GPT-2's and GPT-NeoX's
``attn.q`` inside ``attn.qkv``) the name is its columns of that matrix (:class:`ModuleParts`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ._checks import parse_layers
from ._ui import plural
from .ops.topk_reference import logits_block, normalize_rows

Layout = Literal["in_out", "out_in"]
NormKind = Literal["layernorm", "rmsnorm"]

#: Every public module name, in report order.
MODULE_NAMES = ("mlp.in", "mlp.gate", "mlp.up", "mlp.out", "attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o")
#: Names that are several matrices side by side where a model stores them apart: name -> its parts
_SIDE_BY_SIDE = {"mlp.in": ("mlp.gate", "mlp.up"), "attn.qkv": ("attn.q", "attn.k", "attn.v")}


@dataclass(frozen=True)
class ModuleParts:
    """What a public module name is in one model: ``parts``, the model's own matrices (names of ``Adapter.modules``)
    that all read the name's input, their outputs side by side; ``columns``, the output columns of them the name owns
    (None: all of them)."""

    name: str
    parts: tuple[str, ...]
    columns: torch.Tensor | None = None

    def join(self, per_part: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The name's tensor from one per part along the parts' outputs (``(..., d_out)`` by part name: output
        gradients, or weights and updates in (in, out) terms): side by side along the last axis, then the name's
        columns of them."""
        tensors = [per_part[part] for part in self.parts]
        joined = tensors[0] if len(tensors) == 1 else torch.cat(tensors, -1)
        return joined if self.columns is None else joined[..., self.columns.to(joined.device)]

    def factors(self, inputs: Mapping[str, torch.Tensor], output_grads: Mapping[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The name's ``(x, delta)`` from each part's forward input and output gradient (``(..., d)`` tensors by part
        name): the first part's input (all parts read the same) and the output gradients :meth:`join` ed."""
        return inputs[self.parts[0]], self.join(output_grads)


@dataclass(frozen=True)
class Adapter:
    """Where the Backward Lens finds things in one architecture.

    ``modules`` maps the module names this architecture stores as matrices to paths relative to a transformer block.
    Gated MLPs list ``mlp.gate`` and ``mlp.up`` (``mlp.in`` is then both, side by side); fused attention projections
    list ``attn.qkv`` (``attn.q``/``attn.k``/``attn.v`` are then columns of it, laid out as ``qkv_order`` says:
    ``"blocks"``, q then k then v as in GPT-2, or ``"heads"``, q, k and v within each head as in GPT-NeoX).
    ``weight_layout`` is ``"in_out"`` for GPT-2's ``Conv1D`` (weight stored ``[in, out]``) and
    ``"out_in"`` for ``nn.Linear``.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    modules: dict[str, str]
    final_norm: str | None
    norm_kind: NormKind
    unembedding: str
    embedding: str
    weight_layout: Layout = "out_in"
    qkv_order: Literal["blocks", "heads"] = "blocks"
    notes: str = ""

    # -- module names -------------------------------------------------------------------
    def parts(self, name: str) -> tuple[str, ...]:
        """The matrices of this architecture that public module ``name`` is made of (a ``ValueError`` for unknown
        names and names the architecture lacks)."""
        if not isinstance(name, str) or name not in MODULE_NAMES:
            raise ValueError(f"unknown module name {name!r}: expected one of {', '.join(MODULE_NAMES)}")
        if name in self.modules:
            return (name,)
        if name in _SIDE_BY_SIDE and all(part in self.modules for part in _SIDE_BY_SIDE[name]):
            return _SIDE_BY_SIDE[name]
        if name in _SIDE_BY_SIDE["attn.qkv"] and "attn.qkv" in self.modules:
            return ("attn.qkv",)
        raise ValueError(f"module {name!r} does not exist in {self.name}: it has {', '.join(self.modules)}")

    def module_parts(self, model: nn.Module, name: str) -> ModuleParts:
        """:class:`ModuleParts` of public module ``name`` in ``model``."""
        parts = self.parts(name)
        if parts == (name,) or len(parts) > 1:
            return ModuleParts(name, parts)
        width = self.as_io(self.weight(model, 0, parts[0])).shape[1] // 3  # q, k and v are equally wide
        index = _SIDE_BY_SIDE["attn.qkv"].index(name)
        if self.qkv_order == "blocks":
            return ModuleParts(name, parts, torch.arange(index * width, (index + 1) * width))
        heads = model.config.num_attention_heads
        size = width // heads
        starts = torch.arange(heads)[:, None] * 3 * size + index * size
        return ModuleParts(name, parts, (starts + torch.arange(size)).reshape(-1))

    def check_modules(self, names) -> tuple[str, ...]:
        """Public module names (one or a sequence), checked to exist in this architecture, without repeats."""
        names = (names,) if isinstance(names, str) else tuple(names)
        for name in names:
            self.parts(name)
        return tuple(dict.fromkeys(names))

    def resolve_modules(self, names) -> tuple[str, ...]:
        """This architecture's own matrices that public ``names`` are made of (``mlp.in`` of a gated MLP -> gate and
        up, ``attn.q`` of GPT-2 -> the fused qkv), without repeats."""
        return tuple(dict.fromkeys(part for name in self.check_modules(names) for part in self.parts(name)))

    # -- modules of a model -------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's transformer blocks, in order."""
        return model.get_submodule(self.blocks)

    def num_layers(self, model: nn.Module) -> int:
        """How many transformer blocks the model has."""
        return len(self.layers(model))

    def check_layers(self, model: nn.Module, layers, name: str = "layers") -> tuple[int, ...]:
        """Validate layer indices (negative ones count from the end; spelled as :func:`~blens_fast._checks.parse_layers`
        reads them, e.g. ``[0, 2, -1]`` or ``"0-3"``); ``None`` or ``"all"`` means all."""
        n = self.num_layers(model)
        parsed = parse_layers(layers, name)
        if parsed is None:
            return tuple(range(n))
        out: list[int] = []
        for layer in parsed:
            if not -n <= layer < n:
                raise ValueError(f"layer {layer} is out of range: the model has {plural(n, 'layer')} (0..{n - 1})")
            index = layer % n
            if index not in out:
                out.append(index)
        if not out:
            raise ValueError(f"{name} is empty: expected at least one layer index")
        return tuple(out)

    def module(self, model: nn.Module, layer: int, name: str) -> nn.Module:
        """The module of matrix ``name`` (a name of ``modules``; a name made of several matrices, or of part of one, is
        refused naming them)."""
        if name not in self.modules:
            parts = self.parts(name)
            made_of = ", ".join(parts) if len(parts) > 1 else f"columns of {parts[0]}"
            raise ValueError(f"{name!r} is not one matrix of {self.name}: it is made of {made_of}; ask for those")
        return self.layers(model)[layer].get_submodule(self.modules[name])

    def weight(self, model: nn.Module, layer: int, name: str) -> torch.Tensor:
        """The module's weight parameter, in its own layout."""
        return self.module(model, layer, name).weight

    def as_io(self, weight_shaped: torch.Tensor) -> torch.Tensor:
        """A tensor laid out like this architecture's weights (a weight, its ``.grad``) as a ``(d_in, d_out)`` view:
        itself for ``"in_out"``, its transpose for ``"out_in"``; writes to the view reach the tensor."""
        return weight_shaped if self.weight_layout == "in_out" else weight_shaped.T

    # -- the lens -----------------------------------------------------------------------
    def lens(self, model: nn.Module) -> "Lens":
        """The model's own lens: final norm parameters and the unembedding (``V x d``) with bias."""
        head = model.get_submodule(self.unembedding)
        norm = model.get_submodule(self.final_norm) if self.final_norm else None
        if norm is None:
            return Lens(None, None, None, 0.0, head.weight, getattr(head, "bias", None))
        eps = getattr(norm, "eps", None)
        if eps is None:
            eps = getattr(norm, "variance_epsilon")
        return Lens(self.norm_kind, norm.weight, getattr(norm, "bias", None), float(eps), head.weight,
                    getattr(head, "bias", None))

    def embedding_matrix(self, model: nn.Module) -> torch.Tensor:
        """Input token embeddings, ``V x d``."""
        return model.get_submodule(self.embedding).weight


@dataclass(frozen=True)
class Lens:
    """Final norm + unembedding: ``logits = norm(h) @ weight.T + bias``."""

    norm_kind: NormKind | None
    norm_weight: torch.Tensor | None
    norm_bias: torch.Tensor | None
    eps: float
    weight: torch.Tensor
    bias: torch.Tensor | None

    def normalize(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the final norm in float32 (the reference the fused kernels are checked against)."""
        return normalize_rows(hidden, self.norm_kind, self.eps, False, self.norm_weight, self.norm_bias)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Float32 logits of final-normed hidden states ``(..., d)``: ``normed @ weight.T + bias``, the inputs rounded
        to the unembedding's dtype and their products summed in float32."""
        weight = self.weight.detach()
        bias = self.bias.detach() if self.bias is not None else None
        return logits_block(normed.detach().to(weight.dtype), weight, bias)


_ATTN_LLAMA = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
               "attn.o": "self_attn.o_proj"}
_MLP_GATED = {"mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.out": "mlp.down_proj"}


def _llama_like(name: str, model_types: tuple[str, ...]) -> Adapter:
    return Adapter(name=name, model_types=model_types, blocks="model.layers", modules={**_MLP_GATED, **_ATTN_LLAMA},
                   final_norm="model.norm", norm_kind="rmsnorm", unembedding="lm_head",
                   embedding="model.embed_tokens")


ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    """Make ``adapter`` the one used for models whose ``config.model_type`` is in ``adapter.model_types``."""
    if not isinstance(adapter, Adapter):
        raise TypeError(f"expected a blens_fast.adapters.Adapter, got {type(adapter).__name__}")
    for model_type in adapter.model_types:
        ADAPTERS[model_type] = adapter
    return adapter


for _adapter in (
    Adapter(name="GPT-2", model_types=("gpt2",), blocks="transformer.h",
            modules={"mlp.in": "mlp.c_fc", "mlp.out": "mlp.c_proj", "attn.qkv": "attn.c_attn",
                     "attn.o": "attn.c_proj"},
            final_norm="transformer.ln_f", norm_kind="layernorm", unembedding="lm_head",
            embedding="transformer.wte", weight_layout="in_out",
            notes="Conv1D weights are stored [in, out]; q, k and v share the fused c_attn matrix."),
    Adapter(name="GPT-J", model_types=("gptj",), blocks="transformer.h",
            modules={"mlp.in": "mlp.fc_in", "mlp.out": "mlp.fc_out", "attn.q": "attn.q_proj",
                     "attn.k": "attn.k_proj", "attn.v": "attn.v_proj", "attn.o": "attn.out_proj"},
            final_norm="transformer.ln_f", norm_kind="layernorm", unembedding="lm_head",
            embedding="transformer.wte", notes="The unembedding has a bias."),
    Adapter(name="GPT-NeoX", model_types=("gpt_neox",), blocks="gpt_neox.layers",
            modules={"mlp.in": "mlp.dense_h_to_4h", "mlp.out": "mlp.dense_4h_to_h",
                     "attn.qkv": "attention.query_key_value", "attn.o": "attention.dense"},
            final_norm="gpt_neox.final_layer_norm", norm_kind="layernorm", unembedding="lm_head",
            embedding="gpt_neox.embed_in", qkv_order="heads",
            notes="q, k and v share the fused query_key_value matrix (interleaved per head)."),
    Adapter(name="GPT-Neo", model_types=("gpt_neo",), blocks="transformer.h",
            modules={"mlp.in": "mlp.c_fc", "mlp.out": "mlp.c_proj", "attn.q": "attn.attention.q_proj",
                     "attn.k": "attn.attention.k_proj", "attn.v": "attn.attention.v_proj",
                     "attn.o": "attn.attention.out_proj"},
            final_norm="transformer.ln_f", norm_kind="layernorm", unembedding="lm_head",
            embedding="transformer.wte"),
    Adapter(name="OPT", model_types=("opt",), blocks="model.decoder.layers",
            modules={"mlp.in": "fc1", "mlp.out": "fc2", "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj",
                     "attn.v": "self_attn.v_proj", "attn.o": "self_attn.out_proj"},
            final_norm="model.decoder.final_layer_norm", norm_kind="layernorm", unembedding="lm_head",
            embedding="model.decoder.embed_tokens"),
    _llama_like("Llama", ("llama",)),
    _llama_like("Mistral", ("mistral",)),
    _llama_like("Qwen2", ("qwen2",)),
):
    register_adapter(_adapter)


def supported_architectures() -> list[str]:
    """Names of the architectures with a built-in adapter."""
    return sorted({a.name for a in ADAPTERS.values()})


def get_adapter(model: nn.Module, adapter: Adapter | None = None) -> Adapter:
    """The adapter for ``model`` (``adapter`` wins when given); a clear error for unknown models."""
    if adapter is not None:
        if not isinstance(adapter, Adapter):
            raise TypeError(f"adapter must be a blens_fast.adapters.Adapter, got {type(adapter).__name__}")
        return adapter
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    found = ADAPTERS.get(model_type)
    if found is None:
        raise ValueError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported. Supported: "
            f"{', '.join(supported_architectures())}. For another architecture pass adapter=blens_fast.Adapter(...) "
            "describing its blocks, MLP/attention module paths, weight layout, final norm and unembedding, "
            "or call blens_fast.register_adapter(...) once."
        )
    _check_unsupported_variant(model, found)
    return found


def _check_unsupported_variant(model: nn.Module, adapter: Adapter) -> None:
    config = model.config
    if adapter.name == "OPT":
        if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
            raise ValueError("OPT models with project_in/project_out (word_embed_proj_dim != hidden_size) are not "
                             "supported: their lens has an extra projection. Pass a custom adapter.")
        if not getattr(config, "do_layer_norm_before", True):
            raise ValueError("OPT models with do_layer_norm_before=False (e.g. opt-350m) are not supported: "
                             "they apply no final layer norm. Pass a custom adapter with final_norm=None.")
