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
import weakref
from collections.abc import Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn

from .adapters import Adapter, Lens, get_adapter
from .batching import Example, pad_right, tokenize_examples

#: values sampled per tensor by the fingerprints
FINGERPRINT_SAMPLES = 4096

_VOCABULARIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class ModelContext:
    """A model and its tokenizer with what the Backward Lens needs of them, resolved once.

    Attributes: ``model``, ``tokenizer`` (None for calls that need none), ``adapter`` (the architecture's
    :class:`~blens_fast.adapters.Adapter`), ``lens`` (:class:`~blens_fast.adapters.Lens`: final norm and
    unembedding, the model's own tensors), ``pad_id``. Properties: ``device``, ``dtype``, ``num_layers``,
    ``max_positions``, ``vocab_size``, ``vocabulary``.
    """

    def __init__(self, model: nn.Module, tokenizer=None, adapter: Adapter | None = None):
        self.model = model
        self.adapter = get_adapter(model, adapter)
        self.tokenizer = tokenizer
        self.lens: Lens = self.adapter.lens(model)
        self.pad_id = _pad_id(tokenizer)

    def __iter__(self):
        """``model, tokenizer = ctx``."""
        return iter((self.model, self.tokenizer))

    def __repr__(self) -> str:
        return (f"ModelContext({self.adapter.name}, layers={self.num_layers}, d={self.lens.weight.shape[1]}, "
                f"V={self.vocab_size}, {self.dtype}, {self.device})")

    # -- facts -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.lens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers(self.model)

    @property
    def max_positions(self) -> int | None:
        config = getattr(self.model, "config", None)
        for name in ("n_positions", "max_position_embeddings"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        return None

    @property
    def vocab_size(self) -> int:
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
        if self.tokenizer is None:
            raise ValueError("this call needs the model's tokenizer: pass it (bl.bind(model, tokenizer)), or load "
                             "the model with bl.load_model(...)")
        return self.tokenizer

    # -- modules -----------------------------------------------------------------------------------
    def check_layers(self, layers) -> tuple[int, ...]:
        """Validate layer indices (negative ones count from the end); ``None`` means all."""
        return self.adapter.check_layers(self.model, layers)

    def resolve_modules(self, names) -> tuple[str, ...]:
        return self.adapter.resolve_modules(names)

    def module(self, layer: int, name: str) -> nn.Module:
        return self.adapter.module(self.model, layer, name)

    def weight(self, layer: int, name: str) -> torch.Tensor:
        return self.adapter.weight(self.model, layer, name)

    def weight_io(self, layer: int, name: str) -> torch.Tensor:
        """The weight of ``name`` at ``layer`` as a ``(d_in, d_out)`` view (writes go through to the weight)."""
        weight = self.weight(layer, name)
        return weight if self.adapter.weight_layout == "in_out" else weight.T

    def grad_io(self, layer: int, name: str) -> torch.Tensor | None:
        """The weight's ``.grad`` as a ``(d_in, d_out)`` view (writes go through), or None when it has none."""
        grad = self.weight(layer, name).grad
        if grad is None:
            return None
        return grad if self.adapter.weight_layout == "in_out" else grad.T

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
        """A cheap identity of the model: config sizes + samples of its embedding and of layer 0's ``mlp.in``.

        Edits of ``mlp.out`` leave it unchanged, so calibrated settings and saved edits still apply to an edited
        model."""
        tensors = {"embedding": self.embedding_matrix}
        tensors.update({f"0.{m}": self.weight(0, m) for m in self.resolve_modules("mlp.in")})
        return _digest(self.model, tensors)[:16]

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
                elif args:
                    tok, *args = args
                else:
                    raise TypeError(f"{fn.__name__}() needs a tokenizer: call {fn.__name__}(model, tokenizer, ...) "
                                    f"or {fn.__name__}(ctx, ...)")
            ctx = bind(model, tok, adapter=adapter)
        return fn(ctx, *args, **kwargs)

    return wrapper


# -- loaders -------------------------------------------------------------------------------------------------
def load_default_model(*, device=None, dtype: torch.dtype | None = None) -> ModelContext:
    """The shipped default model (a 4-layer GPT-2 trained on true CounterFact facts) and its tokenizer, offline;
    unpacks as ``model, tokenizer``."""
    return load_model("default", device=device, dtype=dtype)


def load_model(path_or_name="default", *, device=None, dtype: torch.dtype | None = None) -> ModelContext:
    """A :class:`ModelContext` (unpacks as ``model, tokenizer``) in eval mode for ``"default"`` (the shipped model)
    or a local Hugging Face folder: ``config.json``, ``*.safetensors`` weights and the tokenizer files. Remote code
    is never run and nothing is downloaded. ``device``: default ``"cpu"``; ``dtype``: default float32."""
    import transformers
    from safetensors import SafetensorError

    from ._checks import check_device, check_dtype

    device = check_device("cpu" if device is None else device)
    dtype = check_dtype(torch.float32 if dtype is None else dtype)
    transformers.utils.logging.disable_progress_bar()
    if str(path_or_name) == "default":
        from .default_model import MODEL_DIR

        folder = Path(MODEL_DIR)
    else:
        folder = Path(path_or_name)
        _check_model_folder(folder, path_or_name)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, use_safetensors=True, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        raise ValueError(f"model folder {str(folder)!r} could not be loaded: {_first_line(error)}") from None
    tokenizer = _load_tokenizer(folder)
    return bind(model.to(device).eval(), tokenizer)


def _check_model_folder(folder: Path, spec) -> None:
    if not folder.is_dir():
        raise ValueError(f"model {str(spec)!r}: no such folder (expected 'default' or a local Hugging Face folder)")
    if not (folder / "config.json").is_file():
        raise ValueError(f"model folder {str(folder)!r} has no config.json: expected a transformers checkpoint")
    try:
        import json

        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(folder / 'config.json')!r} is not valid JSON ({error})") from None
    if not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise ValueError(f"model folder {str(folder)!r} has no *.safetensors weights"
                         + (f" (found {', '.join(found)}; only safetensors checkpoints are loaded)" if found else ""))


def _load_tokenizer(folder: Path):
    import transformers

    from .default_model import MODEL_DIR, load_default_tokenizer

    if folder.resolve() == Path(MODEL_DIR).resolve():
        return load_default_tokenizer()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                               trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"model folder {str(folder)!r} has no usable tokenizer ({_first_line(error)}): save it "
                         "beside the weights with tokenizer.save_pretrained(folder)") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
