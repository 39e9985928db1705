"""One model context: a model, its tokenizer and the facts derived from them once.

:class:`ModelContext` holds the architecture's adapter, the model's lens (final norm + unembedding), the pad id, the
vocabulary, the fingerprints and a ``hooks()`` context manager; every layer above takes a context. Build one with
:func:`bind` (a loaded model and tokenizer) or a loader (:func:`load_model`, :func:`load_default_model`). A context
unpacks as ``model, tokenizer = ctx``.

Public calls take either a context or a model and a tokenizer (:func:`with_context`):
``bl.lens(ctx, prompt, target)`` and ``bl.lens(model, tokenizer, prompt, target)`` are the same call.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import weakref
import zlib
from collections.abc import Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn

from .adapters import Adapter, Lens, ModuleParts, get_adapter
from .batching import Example, pad_right, tokenize_examples

#: values sampled per tensor by the fingerprints
FINGERPRINT_SAMPLES = 4096
#: bytes per CRC-32 in :meth:`ModelContext.tensors_fingerprint`
FINGERPRINT_BLOCK = 1 << 16

_VOCABULARIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class ModelContext:
    """A model and its tokenizer with what the Backward Lens needs of them, resolved once.

    Attributes: ``model``, ``tokenizer`` (None for calls that need none), ``adapter`` (the architecture's
    :class:`~blens_fast.adapters.Adapter`), ``lens`` (:class:`~blens_fast.adapters.Lens`: final norm and
    unembedding, the model's own tensors), ``pad_id``. Properties: ``device``, ``dtype``, ``num_layers``,
    ``max_positions``, ``vocab_size``, ``vocabulary``.
    """

    def __init__(self, model: nn.Module, tokenizer=None, adapter: Adapter | None = None):
        unloaded = next((name for name, p in model.named_parameters() if p.is_meta), None)
        if unloaded is not None:
            raise ValueError(f"the model's parameters are on the meta device ({unloaded!r} and others hold no values): "
                             "load its weights first, e.g. bl.load_model(folder)")
        self.model = model
        self.adapter = get_adapter(model, adapter)
        self.tokenizer = tokenizer
        self.lens: Lens = self.adapter.lens(model)
        self.pad_id = _pad_id(tokenizer)

    def __iter__(self):
        """``model, tokenizer = ctx``."""
        return iter((self.model, self.tokenizer))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index):
        """``ctx[0]`` is the model and ``ctx[1]`` the tokenizer, as ``model, tokenizer = ctx`` unpacks them."""
        return (self.model, self.tokenizer)[index]

    def __repr__(self) -> str:
        return (f"ModelContext({self.adapter.name}, layers={self.num_layers}, d={self.lens.weight.shape[1]}, "
                f"V={self.vocab_size}, {self.dtype}, {self.device})")

    # -- facts -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The device of the model's lens (its unembedding)."""
        return self.lens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's parameters."""
        return next(self.model.parameters()).dtype

    @property
    def num_layers(self) -> int:
        """How many transformer blocks the model has."""
        return self.adapter.num_layers(self.model)

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model reads (None when its config does not say)."""
        config = getattr(self.model, "config", None)
        for name in ("n_positions", "max_position_embeddings"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        return None

    @property
    def vocab_size(self) -> int:
        """The number of rows of the unembedding (the logits' width)."""
        return self.lens.weight.shape[0]

    @property
    def vocabulary(self) -> tuple[str, ...]:
        """Every token id's text (``"<id>"`` for ids the tokenizer does not know), cached per tokenizer."""
        tokenizer = self.require_tokenizer()
        try:
            found = _VOCABULARIES.get(tokenizer)
        except TypeError:  # not weak-referenceable
            found = None
        if found is None or len(found) < self.vocab_size:
            inverse = {i: t for t, i in tokenizer.get_vocab().items()}
            size = max(self.vocab_size, max(inverse) + 1)
            found = tuple(tokenizer.convert_tokens_to_string([inverse[i]]) if i in inverse else f"<{i}>"
                          for i in range(size))
            try:
                _VOCABULARIES[tokenizer] = found
            except TypeError:
                pass
        return found

    def token_texts(self, token_ids) -> list[str]:
        """The texts of some token ids, as :attr:`vocabulary` names them, decoded on demand and cached (the whole
        vocabulary is never built: the training lens names a few hundred tokens per step)."""
        tokenizer = self.require_tokenizer()
        cache = self.__dict__.setdefault("_token_texts", {})
        texts = []
        for token_id in map(int, token_ids):
            if token_id not in cache:
                token = tokenizer.convert_ids_to_tokens(token_id) if 0 <= token_id < len(tokenizer) else None
                cache[token_id] = tokenizer.convert_tokens_to_string([token]) if token is not None else f"<{token_id}>"
            texts.append(cache[token_id])
        return texts

    def require_tokenizer(self):
        """The tokenizer; a ``ValueError`` saying how to pass one when the context has none."""
        if self.tokenizer is None:
            raise ValueError("this call needs the model's tokenizer: pass it (bl.bind(model, tokenizer)), or load "
                             "the model with bl.load_model(...)")
        return self.tokenizer

    # -- modules -----------------------------------------------------------------------------------
    def check_layers(self, layers) -> tuple[int, ...]:
        """Validate layer indices (negative ones count from the end); ``None`` means all."""
        return self.adapter.check_layers(self.model, layers)

    def check_modules(self, names) -> tuple[str, ...]:
        """Public module names (one or a sequence), checked to exist in this model, without repeats."""
        return self.adapter.check_modules(names)

    def resolve_modules(self, names) -> tuple[str, ...]:
        """The model's own matrices that public module ``names`` are made of (see :mod:`blens_fast.adapters`)."""
        return self.adapter.resolve_modules(names)

    def module_parts(self, name: str) -> ModuleParts:
        """What public module ``name`` is in this model: its matrices and, for part of a fused one, its columns."""
        return self.adapter.module_parts(self.model, name)

    def gradient_shape(self, layer: int, module: str) -> tuple[int, int]:
        """``(d_in, d_out)`` of the gradient public ``module`` stands for at ``layer`` (its matrices side by side, or
        its columns of one)."""
        found = self.module_parts(module)
        shapes = [self.weight_io(layer, part).shape for part in found.parts]
        d_out = len(found.columns) if found.columns is not None else sum(shape[1] for shape in shapes)
        return int(shapes[0][0]), int(d_out)

    def module(self, layer: int, name: str) -> nn.Module:
        """The linear module ``name`` (e.g. ``"mlp.out"``) of block ``layer``."""
        return self.adapter.module(self.model, layer, name)

    def weight(self, layer: int, name: str) -> torch.Tensor:
        """The weight parameter of ``name`` at ``layer``, in the module's own layout."""
        return self.adapter.weight(self.model, layer, name)

    # -- the weight-layout boundary: everything above speaks of (d_in, d_out) --------------------------
    def weight_io(self, layer: int, module: str) -> torch.Tensor:
        """The weight of ``module`` at ``layer`` as a ``(d_in, d_out)`` view of the parameter, whatever the layout it
        is stored in (``nn.Linear``: ``[out, in]``; GPT-2's ``Conv1D``: ``[in, out]``); writes go through (an
        update ``weight_io(...).addmm_(left.T, right)`` changes the model)."""
        return self.adapter.as_io(self.weight(layer, module))

    def grad_io(self, layer: int, module: str) -> torch.Tensor | None:
        """The weight's ``.grad`` as a ``(d_in, d_out)`` view (as :meth:`weight_io`), or None when it has none."""
        grad = self.weight(layer, module).grad
        return None if grad is None else self.adapter.as_io(grad)

    @property
    def embedding_matrix(self) -> torch.Tensor:
        """Input token embeddings, ``V x d``."""
        return self.adapter.embedding_matrix(self.model)

    @property
    def base_model(self) -> nn.Module:
        """The model without its LM head: the parent of the blocks (its output is after the final norm)."""
        blocks = self.adapter.blocks
        return self.model.get_submodule(blocks.rsplit(".", 1)[0] if "." in blocks else "")

    @contextmanager
    def hooks(self, forward: Mapping | None = None, pre: Mapping | None = None):
        """Forward hooks ``fn(module, args, output)`` and pre-hooks ``fn(module, args)`` on the modules named by the
        keys: ``(layer, name)``, ``"embedding"`` or ``"final_norm"``; all removed on exit, also after an error."""
        with ExitStack() as stack:
            for hooks, register in ((forward or {}, "register_forward_hook"),
                                    (pre or {}, "register_forward_pre_hook")):
                for key, fn in hooks.items():
                    stack.callback(getattr(self._hook_target(key), register)(fn).remove)
            yield

    def _hook_target(self, key) -> nn.Module:
        if key == "embedding":
            return self.model.get_submodule(self.adapter.embedding)
        if key == "final_norm":
            if not self.adapter.final_norm:
                raise ValueError(f"{self.adapter.name} has no final norm")
            return self.model.get_submodule(self.adapter.final_norm)
        layer, name = key
        return self.module(layer, name)

    # -- text ------------------------------------------------------------------------------------
    def tokenize(self, prompts, targets, *, loss: str = "teacher_forced") -> list[Example]:
        """Validated, tokenized examples (see :mod:`blens_fast.batching`)."""
        return tokenize_examples(self.require_tokenizer(), prompts, targets, max_positions=self.max_positions,
                                 loss=loss)

    def pad(self, sequences) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``input_ids`` and ``attention_mask`` on the model's device."""
        return pad_right(sequences, self.pad_id, self.device)

    # -- identity --------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A cheap identity of the model for its calibrated settings: config sizes + samples of its embedding and of
        layer 0's ``mlp.in``. Edits of ``mlp.out`` leave it unchanged, so calibrated settings still apply to an
        edited model. (Saved edits check :meth:`tensors_fingerprint` of the weights they touch.)"""
        tensors = {"embedding": self.embedding_matrix}
        tensors.update({f"0.{m}": self.weight(0, m) for m in self.resolve_modules("mlp.in")})
        return _digest(self.model, tensors)[:16]

    @functools.cached_property
    def architecture(self) -> str:
        """The model's class and its config's entries as JSON (:func:`architecture`), resolved once."""
        return architecture(self.model)

    def tensors_fingerprint(self, tensors: Mapping[str, torch.Tensor]) -> str:
        """A sha256 (hex) of the architecture (:attr:`architecture`), samples of the input embedding (upstream of
        every layer) and every value of ``tensors`` with its name and shape: the identity of the weights an edit
        touches. Every value is read, through the CRC-32 of each block of :data:`FINGERPRINT_BLOCK` bytes (at
        GPT-2-small dimensions about half the time of a sha256 of the values: benchmarks/results/fingerprint_cost.md): a
        change within 4 bytes of a block is always seen, any other with probability 1 - 2^-32. 16-bit values are read
        as float32, so a bfloat16 and a float32 copy of the same weights agree."""
        digest = hashlib.sha256(self.architecture.encode())
        digest.update(sample_values(self.embedding_matrix).numpy().tobytes())
        for name, tensor in sorted(tensors.items()):
            values = tensor.detach()
            if values.dtype not in (torch.float32, torch.float64):
                values = values.float()
            data = memoryview(values.contiguous().cpu().numpy()).cast("B")
            digest.update(f";{name}:{values.dtype}{tuple(values.shape)}:".encode())
            for start in range(0, len(data), FINGERPRINT_BLOCK):
                digest.update(zlib.crc32(data[start:start + FINGERPRINT_BLOCK]).to_bytes(4, "little"))
        return digest.hexdigest()

    def weights_fingerprint(self) -> str:
        """Samples of every parameter: changes when any weight does (almost surely), cheap for any model size."""
        return _digest(self.model, dict(sorted(self.model.named_parameters())))[:24]


def _digest(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    for name in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        h.update(f"{name}={getattr(config, name, None)};".encode())
    for name, tensor in tensors.items():
        h.update(f"{name}:{tuple(tensor.shape)};".encode())
        h.update(sample_values(tensor).numpy().tobytes())
    return h.hexdigest()


#: config entries that say how a model is run or stored, not what it computes
_RUNTIME_CONFIG = frozenset({"name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache",
                             "output_attentions", "output_hidden_states", "return_dict", "architectures",
                             "attn_implementation", "tokenizer_class"})


def architecture(model: nn.Module) -> str:
    """The model's class and its config's entries (JSON, sorted), without those that say how it is run or stored
    (dtype, caching, attention implementation, names, token ids, private entries)."""
    config = getattr(model, "config", None)
    entries = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    kept = {key: value for key, value in entries.items()
            if not key.startswith("_") and key not in _RUNTIME_CONFIG and not key.endswith("token_id")}
    return json.dumps({"class": type(model).__name__, "config": kept}, sort_keys=True, default=str)


def sample_values(tensor: torch.Tensor, samples: int = FINGERPRINT_SAMPLES) -> torch.Tensor:
    """``samples`` values spread evenly over ``tensor`` (first and last included), as float32 on the CPU. Indices
    are exact integers (``i * (n - 1) // (m - 1)``), so any size works; values only, because a float sum of a tensor
    depends on the thread count."""
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    m = min(samples, n)
    if m == 0:
        return torch.zeros(0)
    index = torch.arange(m, dtype=torch.int64) * (n - 1) // max(m - 1, 1)
    return flat[index.to(flat.device)].float().cpu()


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def bind(model, tokenizer=None, *, adapter: Adapter | None = None) -> ModelContext:
    """The :class:`ModelContext` of ``model`` (and ``tokenizer``); a context passes through (with ``tokenizer``
    added if it had none)."""
    if isinstance(model, ModelContext):
        if adapter is not None and adapter is not model.adapter:
            raise ValueError("adapter= was given with a ModelContext that has another adapter: bind the model again")
        if tokenizer is not None and tokenizer is not model.tokenizer:
            return ModelContext(model.model, tokenizer, model.adapter)
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers causal LM) or a blens_fast.ModelContext, "
                        f"got {type(model).__name__}")
    return ModelContext(model, tokenizer, adapter)


def with_context(fn=None, *, tokenizer: bool = True):
    """Decorator for public calls written as ``fn(ctx, ...)``: callers pass ``(ctx, ...)`` or ``(model, tokenizer,
    ...)`` (``(model, ...)`` when ``tokenizer=False``), and ``adapter=`` with a model."""
    if fn is None:
        return functools.partial(with_context, tokenizer=tokenizer)

    @functools.wraps(fn)
    def wrapper(model, *args, adapter: Adapter | None = None, **kwargs):
        if isinstance(model, ModelContext):
            ctx = bind(model, kwargs.pop("tokenizer", None), adapter=adapter)
        else:
            tok = None
            if tokenizer:
                if "tokenizer" in kwargs:
                    tok = kwargs.pop("tokenizer")
                elif args and not _is_text(args[0]):
                    tok, *args = args
                else:
                    found = f", and {args[0]!r} stands where it goes" if args else ""
                    raise TypeError(f"{fn.__name__}(): the tokenizer is missing (a model was given{found}); call "
                                    f"{fn.__name__}(model, tokenizer, ...) or {fn.__name__}(ctx, ...) with ctx = "
                                    "bl.bind(model, tokenizer) or bl.load_model(...)")
            ctx = bind(model, tok, adapter=adapter)
        return fn(ctx, *args, **kwargs)

    return wrapper


def _is_text(value) -> bool:
    """A string or a list/tuple of strings: what a call's prompt or target looks like, never a tokenizer."""
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and len(value) > 0
                                      and all(isinstance(v, str) for v in value))


# -- loaders -------------------------------------------------------------------------------------------------
def load_default_model(*, device=None, dtype: torch.dtype | None = None) -> ModelContext:
    """The shipped default model (a 4-layer GPT-2 trained on true CounterFact facts) and its tokenizer, offline;
    unpacks as ``model, tokenizer``."""
    return load_model("default", device=device, dtype=dtype)


def load_model(path_or_name="default", *, device=None, dtype: torch.dtype | None = None) -> ModelContext:
    """A :class:`ModelContext` (unpacks as ``model, tokenizer``) in eval mode for ``"default"`` (the shipped model)
    or a local Hugging Face folder: ``config.json``, ``*.safetensors`` weights and the tokenizer files. Remote code
    is never run and nothing is downloaded. The weights must match the config exactly (every parameter read, every
    tensor used: see :mod:`blens_fast.checkpoint`), else a ``ValueError`` names what differs. ``device``: default
    ``"cpu"``; ``dtype``: default float32."""
    from . import checkpoint
    from ._checks import check_device, check_dtype

    device = check_device("cpu" if device is None else device)
    dtype = check_dtype(torch.float32 if dtype is None else dtype)
    source = model_source(path_or_name)
    if source == "default":
        from .default_model import MODEL_DIR

        folder = Path(MODEL_DIR)
    else:
        folder = source
    files, weight_map = checkpoint.weight_files(folder, path_or_name)
    default = _is_default(folder)
    if not default:
        checkpoint.check_tokenizer_files(folder)
    config = checkpoint.read_config(folder)
    model = checkpoint.load_checkpoint(folder, files, weight_map, config, dtype)
    tokenizer = _load_tokenizer(folder, default)
    return bind(model.to(device).eval(), tokenizer)


#: the model names every ``--model`` and :func:`load_model` know besides folders
BUILTIN_MODELS = ("default",)


def model_source(spec, builtins=BUILTIN_MODELS) -> Path | str:
    """The one rule for a model given by name (``--model`` of every subcommand, :func:`load_model`): an existing
    folder wins over a built-in name (``builtins``: ``"default"``, and for ``blens bench`` its random models), so
    ``./tiny`` and ``tiny`` mean the same folder when it exists. Returns the folder as a ``Path`` or the built-in
    name; a ``ValueError`` when ``spec`` is neither."""
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"model must be a folder or a name ({', '.join(map(repr, builtins))}), got "
                        f"{type(spec).__name__}: {spec!r}")
    folder = Path(spec)
    if folder.is_dir():
        if str(spec) in builtins and not (folder / "config.json").is_file():
            raise ValueError(f"model {str(spec)!r}: the folder {str(folder.resolve())!r} wins over the built-in "
                             f"name {str(spec)!r} but holds no config.json: run elsewhere or rename the folder")
        return folder
    if str(spec) in builtins:
        return str(spec)
    raise ValueError(f"model {str(spec)!r}: no such folder (expected a local Hugging Face folder or "
                     f"{' or '.join(map(repr, builtins)) if len(builtins) < 3 else 'one of ' + ', '.join(builtins)})")


def _is_default(folder: Path) -> bool:
    from .default_model import MODEL_DIR

    return folder.resolve() == Path(MODEL_DIR).resolve()


def _load_tokenizer(folder: Path, default: bool):
    import transformers

    from ._checks import first_line
    from .checkpoint import tokenizer_files_text
    from .default_model import load_default_tokenizer

    if default:
        return load_default_tokenizer()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                               trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"model folder {str(folder)!r} has no usable tokenizer ({first_line(error)}): save it "
                         "beside the weights with tokenizer.save_pretrained(folder)") from None
    if len(tokenizer) == 0:
        raise ValueError(f"model folder {str(folder)!r}: its tokenizer files give an empty vocabulary (expected "
                         f"{tokenizer_files_text()}): save them with tokenizer.save_pretrained(folder)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
