"""Reversible fact edits: the Backward Lens forward shift (no backward pass) and a gradient baseline.

**Forward shift** (Katz et al., 2024, "Backward Lens", section on editing without a backward pass).
One forward pass of the prompt gives ``a_n``, the input of the MLP output projection (FF2; ``mlp.out``)
at the prompt's last token. The edit adds to that projection, at one layer, the outer product of a key
built from ``a_n`` and the *input* embedding ``e_t`` of the target's first token::

    W_FF2 += scale * outer(key, e_t)        # in [in, out] terms; written in the weight's own layout

so that at the prompt's last token the MLP output moves by ``scale * (key . a_n) * e_t``. Keys:

* paper (default): ``key = a_n``. The paper uses GPT-2 XL, layer 35 of 48, scale 0.24, and skips the
  edit when the target already is the argmax (``skip_if_argmax=True``; the same forward pass answers it).
* ``normalize=True``: ``key = a_n / (a_n . a_n)``, so the residual stream moves by exactly ``scale * e_t``.
* ``whiten=True`` (beyond the paper): ``key = C^-1 a_n / (a_n^T C^-1 a_n)`` with ``C`` the (uncentred)
  second moment of FF2 inputs at that layer, estimated from forward passes over a text set
  (:func:`ff2_whitening`; ridge ``ridge * tr(C) / d`` added; cached in memory and under
  ``~/.cache/blens_fast`` or ``$BLENS_FAST_CACHE``). Prompts whose ``a`` resembles ``a_n`` only along
  directions common to many prompts (same relation, other subjects) then barely move.
* ``scale="auto"`` (beyond the paper; edit at the last layer only): the shift is added right before the final
  norm, so the last position's logits after the edit are an exact function of the shift size computed from
  that forward pass alone (``logits(s) = (W(g*c(h)) + s W(g*c(e))) / sigma(s) + W beta + b``). The
  smallest shift giving the target a logit lead of ``margin`` over every other token is found by a grid +
  bisection on V-vectors: no extra forward pass.

Several facts at once: the per-fact outer products are summed. With ``normalize`` or ``whiten`` the keys
are solved jointly (``K = C^-1 A (A^T C^-1 A + eps I)^-1``, ``C = I`` without whitening) so that each key
answers 1 to its own ``a_n`` and 0 to the other edited prompts' ``a_n``; the paper's raw keys are summed.

**Gradient** (baseline, "fine-tuning one MLP"): ``steps`` normalised gradient-descent steps on one
layer's ``mlp.out`` weight, ``W -= lr * G / ||G||_F``, where ``G = X^T Delta`` comes as factors from
:func:`blens_fast.capture` and is applied with one in-place ``addmm_``: the dense gradient is never
formed apart from that update.

Every edit is an :class:`Edit` holding clones of the touched weights: ``revert()`` restores them bit for
bit, ``with edit(...)`` reverts on exit (also after an exception), ``save``/``load`` store the update
(factors, replayed with the same operations, so a loaded edit applied to the same weights gives the
same weights bit for bit).

Default ``layer``/``scale`` come from a calibration record: for the shipped default model,
``blens_fast/default_model/edit_defaults.json`` (matched by a fingerprint of the model's embedding and
first-layer weights, so it still applies after edits of ``mlp.out``); for GPT-2 XL the paper's setting.
Other models need ``layer`` and ``scale`` passed explicitly.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._checks import as_str_list, check_choice, check_positive_int
from .adapters import Adapter, get_adapter
from .capture import _pad_id, capture, eval_mode, max_positions, model_device, pad_right, tokenize_examples

METHODS = ("forward_shift", "gradient")
DEFAULTS_FILE = Path(__file__).resolve().parent / "default_model" / "edit_defaults.json"
_FORMAT = "blens_fast.edit/1"


# ----------------------------------------------------------------------------------------------
# the Edit object
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Update:
    """One in-place step ``weight.addmm_(left.T, right)`` on ``(layer, module)``, in the weight's own layout.

    ``left`` is ``r x weight.shape[0]`` and ``right`` is ``r x weight.shape[1]`` (rank ``r``).
    """

    layer: int
    module: str
    left: torch.Tensor
    right: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[1], self.right.shape[1])

    def apply_to(self, weight: torch.Tensor) -> None:
        weight.addmm_(self.left.to(weight.device, weight.dtype).T, self.right.to(weight.device, weight.dtype))


class Edit:
    """A weight update of a model, reversible bit for bit while applied.

    ``updates``: the in-place steps, in order; ``info``: what made it (method, layer, scales, skipped
    facts...). ``layers`` / ``modules`` / ``touched``: where it writes. ``delta(layer, module)`` builds the
    dense sum of the steps (for inspection only). Reverting several edits of the same weight must go in
    reverse order of application (each keeps the weights it found).
    """

    def __init__(self, updates, info: dict | None = None):
        self.updates: tuple[Update, ...] = tuple(updates)
        self.info: dict = dict(info or {})
        self._model: nn.Module | None = None
        self._originals: dict[tuple[int, str], torch.Tensor] = {}

    # -- description ---------------------------------------------------------------------
    @property
    def touched(self) -> tuple[tuple[int, str], ...]:
        keys: list[tuple[int, str]] = []
        for u in self.updates:
            if (u.layer, u.module) not in keys:
                keys.append((u.layer, u.module))
        return tuple(keys)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({u.layer for u in self.updates}))

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(sorted({u.module for u in self.updates}))

    @property
    def applied(self) -> bool:
        return self._model is not None

    @property
    def deltas(self) -> dict[tuple[int, str], torch.Tensor]:
        """Dense update per touched weight (float32, the weight's layout). Builds d_in x d_out matrices."""
        return {key: self.delta(*key) for key in self.touched}

    def delta(self, layer: int, module: str) -> torch.Tensor:
        steps = [u for u in self.updates if (u.layer, u.module) == (layer, module)]
        if not steps:
            raise ValueError(f"this edit does not touch {module!r} at layer {layer}: it touches {list(self.touched)}")
        out = torch.zeros(steps[0].shape, dtype=torch.float32, device=steps[0].left.device)
        for u in steps:
            out.addmm_(u.left.float().T, u.right.float())
        return out

    def __repr__(self) -> str:
        state = "applied" if self.applied else "not applied"
        return (f"Edit(method={self.info.get('method')!r}, touched={list(self.touched)}, "
                f"steps={len(self.updates)}, {state})")

    # -- applying and reverting ----------------------------------------------------------
    def apply(self, model: nn.Module, adapter: Adapter | None = None) -> "Edit":
        """Write the update into ``model`` (keeping clones of the touched weights); returns ``self``."""
        if self.applied:
            raise ValueError("this edit is already applied to a model: revert() it first")
        adapter = get_adapter(model, adapter)
        weights = {}
        for layer, module in self.touched:
            adapter.check_layers(model, [layer])
            adapter.resolve_modules([module])
            weight = adapter.weight(model, layer, module)
            expected = next(u.shape for u in self.updates if (u.layer, u.module) == (layer, module))
            if tuple(weight.shape) != expected:
                raise ValueError(f"the edit's update of {module!r} at layer {layer} has shape {expected} but the "
                                 f"model's weight has shape {tuple(weight.shape)}")
            weights[(layer, module)] = weight
        self._originals = {key: w.detach().clone() for key, w in weights.items()}
        self._model = model
        self.info["_adapter"] = adapter
        try:
            with torch.no_grad():
                for u in self.updates:
                    u.apply_to(weights[(u.layer, u.module)])
        except BaseException:
            self.revert()
            raise
        return self

    def _attach(self, model: nn.Module, originals: dict) -> None:
        self._model = model
        self._originals = originals

    def revert(self) -> None:
        """Restore every touched weight bit for bit (a no-op when not applied)."""
        if self._model is None:
            return
        adapter = get_adapter(self._model, self.info.get("_adapter"))
        with torch.no_grad():
            for (layer, module), original in self._originals.items():
                adapter.weight(self._model, layer, module).copy_(original)
        self._model = None
        self._originals = {}

    def __enter__(self) -> "Edit":
        return self

    def __exit__(self, *exc) -> bool:
        self.revert()
        return False

    # -- storage -------------------------------------------------------------------------
    def save(self, path) -> None:
        """Store the update steps as safetensors (metadata: the ``info`` record as JSON)."""
        from safetensors.torch import save_file

        tensors = {}
        steps = []
        for i, u in enumerate(self.updates):
            tensors[f"update.{i}.left"] = u.left.detach().cpu().contiguous()
            tensors[f"update.{i}.right"] = u.right.detach().cpu().contiguous()
            steps.append({"layer": u.layer, "module": u.module})
        info = {k: v for k, v in self.info.items() if not k.startswith("_")}
        metadata = {"format": _FORMAT, "steps": json.dumps(steps), "info": json.dumps(info, default=str)}
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path) -> "Edit":
        """An edit saved by :meth:`save`, not applied to any model (call ``apply(model)``)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such edit file: {path}")
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != _FORMAT:
                raise ValueError(f"{path} is not a blens_fast edit file (format {metadata.get('format')!r}, "
                                 f"expected {_FORMAT!r})")
            steps = json.loads(metadata["steps"])
            updates = [Update(int(s["layer"]), str(s["module"]), f.get_tensor(f"update.{i}.left"),
                              f.get_tensor(f"update.{i}.right")) for i, s in enumerate(steps)]
        return cls(updates, json.loads(metadata.get("info", "{}")))


# ----------------------------------------------------------------------------------------------
# forward passes
# ----------------------------------------------------------------------------------------------
def base_model(model: nn.Module, adapter: Adapter) -> nn.Module:
    """The model without its LM head: the parent of the blocks (its output is after the final norm)."""
    parent = adapter.blocks.rsplit(".", 1)[0] if "." in adapter.blocks else ""
    return model.get_submodule(parent)


@torch.no_grad()
def forward_hidden(model: nn.Module, adapter: Adapter, ids: torch.Tensor, mask: torch.Tensor, *,
                   ff2_layer: int | None = None, residual: bool = False):
    """One forward pass without the LM head: ``(hidden, ff2_inputs, pre_norm)``.

    ``hidden``: ``B x T x d`` after the final norm; ``ff2_inputs``: ``B x T x d_ff`` inputs of ``mlp.out``
    at ``ff2_layer`` (or None); ``pre_norm``: the residual stream entering the final norm (if ``residual``).
    """
    kept: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name):
        def hook(module, args):
            kept[name] = args[0].detach()
        return hook

    try:
        if ff2_layer is not None:
            handles.append(adapter.module(model, ff2_layer, "mlp.out").register_forward_pre_hook(keep("ff2")))
        if residual:
            if not adapter.final_norm:
                raise ValueError(f"{adapter.name} has no final norm: scale='auto' needs one")
            handles.append(model.get_submodule(adapter.final_norm).register_forward_pre_hook(keep("norm")))
        with eval_mode(model):
            out = base_model(model, adapter)(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    shape = (ids.shape[0], ids.shape[1], -1)  # OPT flattens (batch, position) inside the MLP
    ff2 = kept["ff2"].reshape(shape) if "ff2" in kept else None
    pre = kept["norm"].reshape(shape) if "norm" in kept else None
    return hidden, ff2, pre


def lens_logits(model: nn.Module, adapter: Adapter, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (float32) of final-normed hidden states ``N x d`` through the unembedding."""
    lens = adapter.lens(model)
    logits = hidden.to(lens.weight.dtype) @ lens.weight.T
    if lens.bias is not None:
        logits = logits + lens.bias
    return logits.float()


# ----------------------------------------------------------------------------------------------
# calibrated defaults
# ----------------------------------------------------------------------------------------------
def model_fingerprint(model: nn.Module, adapter: Adapter | None = None) -> str:
    """A cheap identity of a model: config sizes + 4,096 samples of its embedding and of layer-0 ``mlp.in``.

    Edits of ``mlp.out`` leave it unchanged, so calibrated defaults still apply to an edited model.
    """
    adapter = get_adapter(model, adapter)
    tensors = (adapter.embedding_matrix(model),
               *[adapter.weight(model, 0, m) for m in adapter.resolve_modules("mlp.in")])
    # in-place writes bump _version; a few values guard against a new model reusing a freed tensor's address
    memo = tuple((id(t), t.data_ptr(), t._version, tuple(t.detach().reshape(-1)[:: max(1, t.numel() // 16)][:16]
                                                           .float().tolist())) for t in tensors)
    found = _FINGERPRINTS.get(memo)
    if found is not None:
        return found
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    for name in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        h.update(f"{name}={getattr(config, name, None)};".encode())
    for tensor in tensors:
        _hash_tensor(h, tensor)
    _FINGERPRINTS[memo] = h.hexdigest()[:16]
    return _FINGERPRINTS[memo]


_FINGERPRINTS: dict[tuple, str] = {}


def _hash_tensor(h, tensor: torch.Tensor) -> None:
    flat = tensor.detach().reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, min(4096, flat.numel())).long().to(flat.device)
    h.update(str(tuple(tensor.shape)).encode())
    h.update(flat[index].float().cpu().numpy().tobytes())  # samples only: a float sum depends on the thread count


#: the paper's setting for GPT-2 XL (48 layers, width 1600): layer 35, scale 0.24, raw keys
_PAPER_SETTINGS = {("gpt2", 48, 1600): {"forward_shift": {"layer": 35, "scale": 0.24}}}


def variant_name(method: str, *, whiten=False, normalize=False, auto=False) -> str:
    """The calibration entry a set of options reads: ``forward_shift[_normalized|_whitened][_auto]`` or ``gradient``."""
    if method == "gradient":
        return "gradient"
    name = "forward_shift" + ("_whitened" if whiten else "_normalized" if normalize else "")
    return name + ("_auto" if auto else "")


def calibrated_defaults(model: nn.Module, adapter: Adapter | None = None, path=None) -> dict:
    """The calibration entries for ``model`` (variant name -> settings), or ``{}`` when it has none.

    Read from ``path`` (default: ``$BLENS_FAST_EDIT_DEFAULTS`` or ``blens_fast/default_model/edit_defaults.json``)
    when its ``fingerprint`` matches the model's; else the paper's setting for GPT-2 XL; else nothing."""
    adapter = get_adapter(model, adapter)
    path = Path(path) if path is not None else Path(os.environ.get("BLENS_FAST_EDIT_DEFAULTS", DEFAULTS_FILE))
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("fingerprint") == model_fingerprint(model, adapter):
            return record.get("variants", {})
    config = model.config
    key = (getattr(config, "model_type", None), getattr(config, "num_hidden_layers", None),
           getattr(config, "hidden_size", None))
    return _PAPER_SETTINGS.get(key, {})


# ----------------------------------------------------------------------------------------------
# whitening
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Whitening:
    """``inverse = (C + ridge * tr(C)/d * I)^-1`` for the FF2-input second moment ``C`` at ``layer``."""

    layer: int
    inverse: torch.Tensor = field(repr=False)
    ridge: float
    num_tokens: int
    key: str = ""


_WHITENING_CACHE: dict[str, Whitening] = {}


def default_whitening_texts() -> list[str]:
    """True-fact sentences of records 2,000-3,999 of the shipped CounterFact edit file (6,000 sentences):
    outside both the evaluated records (0-999) and the default model's calibration records (1,000-1,999)."""
    from .default_model import fact_texts, load_counterfact

    return fact_texts(load_counterfact()[2000:4000])


def cache_dir() -> Path:
    return Path(os.environ.get("BLENS_FAST_CACHE", Path.home() / ".cache" / "blens_fast"))


def ff2_whitening(model: nn.Module, tokenizer, layer: int, texts=None, *, ridge: float = 1e-2,
                  batch_size: int = 64, adapter: Adapter | None = None, file_cache: bool = True) -> Whitening:
    """Estimate ``C = E[a a^T]`` of ``mlp.out`` inputs at ``layer`` over every token of ``texts`` and invert it.

    ``texts`` default to :func:`default_whitening_texts`. Cached in memory and (``file_cache``) on disk,
    keyed by the model's fingerprint (all parameters), the layer, the texts and the ridge. One pass over the
    texts estimates every layer's ``C`` at once (all are cached), so asking for other layers later is free.
    """
    adapter = get_adapter(model, adapter)
    (layer,) = adapter.check_layers(model, [layer])
    texts = default_whitening_texts() if texts is None else as_str_list(texts, "texts")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge > 0:
        raise ValueError(f"ridge={ridge!r}: expected a positive number")
    h = hashlib.sha256()
    for _, p in sorted(model.named_parameters()):
        _hash_tensor(h, p)
    h.update(f"ridge={ridge!r};".encode())
    h.update("\x00".join(texts).encode())
    base = h.hexdigest()[:24]
    keys = {l: f"{base}-layer{l}" for l in range(adapter.num_layers(model))}
    device = model_device(model)
    if keys[layer] in _WHITENING_CACHE:
        return _WHITENING_CACHE[keys[layer]]
    folder = cache_dir() / "ff2_whitening"
    path = folder / f"{keys[layer]}.safetensors"
    if file_cache and path.is_file():
        from safetensors.torch import load_file

        data = load_file(str(path))
        found = Whitening(layer, data["inverse"].to(device), ridge, int(data["num_tokens"].item()), keys[layer])
        _WHITENING_CACHE[keys[layer]] = found
        return found
    moments, count = _ff2_moments(model, adapter, tokenizer, texts, batch_size)
    for l, moment in moments.items():
        moment /= count
        moment.diagonal().add_(ridge * moment.diagonal().sum() / moment.shape[0])
        inverse = torch.linalg.inv(moment).float()
        _WHITENING_CACHE[keys[l]] = Whitening(l, inverse, ridge, count, keys[l])
        if file_cache:
            from safetensors.torch import save_file

            try:
                folder.mkdir(parents=True, exist_ok=True)
                target = folder / f"{keys[l]}.safetensors"
                tmp = target.with_suffix(f".tmp{os.getpid()}")
                save_file({"inverse": inverse.cpu().contiguous(), "num_tokens": torch.tensor(count)}, str(tmp))
                os.replace(tmp, target)
            except OSError:
                pass  # the cache is an optimisation only
    return _WHITENING_CACHE[keys[layer]]


@torch.no_grad()
def _ff2_moments(model, adapter, tokenizer, texts, batch_size):
    """Sum over every real token of ``a a^T`` per layer (float64) and the token count, in one pass."""
    pad = _pad_id(tokenizer)
    limit = max_positions(model)
    token_lists = [tuple(tokenizer(t)["input_ids"])[:limit] for t in texts]
    token_lists = [t for t in token_lists if t]
    device = model_device(model)
    layers = range(adapter.num_layers(model))
    moments: dict[int, torch.Tensor] = {}
    kept: dict[int, torch.Tensor] = {}
    handles = [adapter.module(model, l, "mlp.out").register_forward_pre_hook(
        lambda m, args, l=l: kept.__setitem__(l, args[0].detach())) for l in layers]
    count = 0
    try:
        for start in range(0, len(token_lists), batch_size):
            ids, mask = pad_right(token_lists[start:start + batch_size], pad, device)
            with eval_mode(model):
                base_model(model, adapter)(input_ids=ids, attention_mask=mask, use_cache=False)
            real = mask.bool().reshape(-1)
            for l in layers:
                a = kept[l].reshape(real.shape[0], -1)[real].float()
                part = (a.T @ a).double()
                moments[l] = part if l not in moments else moments[l].add_(part)
            count += int(real.sum())
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("texts gave no tokens to estimate the FF2-input covariance from")
    return moments, count


# ----------------------------------------------------------------------------------------------
# the public call
# ----------------------------------------------------------------------------------------------
def edit(model: nn.Module, tokenizer, prompt, target, *, method: str = "forward_shift", layer: int | None = None,
         scale=None, whiten=False, normalize: bool = False, margin: float | None = None,
         skip_if_argmax: bool = True, steps: int | None = None, lr: float | None = None,
         adapter: Adapter | None = None, defaults=None) -> Edit:
    """Edit ``model`` in place so that ``prompt`` continues with ``target``; returns the applied :class:`Edit`.

    ``prompt`` / ``target``: a string each, or equal-length lists (several facts in one edit).
    ``method="forward_shift"``: one forward pass, no backward (see the module docstring for ``whiten``,
    ``normalize``, ``scale="auto"`` with ``margin``, ``skip_if_argmax``). ``method="gradient"``: ``steps``
    normalised gradient steps of Frobenius size ``lr`` on ``mlp.out`` at ``layer``.
    Missing ``layer``/``scale``/``margin``/``steps``/``lr`` come from ``defaults`` (a dict of settings) or the
    model's calibration record (:func:`calibrated_defaults`). On any error the model is left untouched.
    """
    adapter = get_adapter(model, adapter)
    check_choice(method, "method", METHODS)
    prompts = as_str_list(prompt, "prompt")
    targets = as_str_list(target, "target")
    examples = tokenize_examples(tokenizer, prompts, targets, max_positions=max_positions(model))
    auto = isinstance(scale, str)
    if auto and scale != "auto":
        raise ValueError(f"scale={scale!r}: expected a number or 'auto'")
    if method == "gradient" and (whiten is not False or normalize or auto or margin is not None):
        raise ValueError("whiten, normalize, scale='auto' and margin apply to method='forward_shift' only")
    name = variant_name(method, whiten=whiten is not False, normalize=normalize, auto=auto)
    settings = dict(calibrated_defaults(model, adapter).get(name, {}) if defaults is None else defaults)
    if layer is None:
        layer = settings.get("layer")
        if layer is None:
            raise ValueError(f"no calibrated {name!r} settings for this model ({adapter.name}, "
                             f"{adapter.num_layers(model)} layers): pass layer= (and scale=/lr=) explicitly")
    elif settings.get("layer") is not None and (settings["layer"] - layer) % adapter.num_layers(model) != 0:
        settings = {}  # the calibrated scale belongs to another layer
    (layer,) = adapter.check_layers(model, [layer])
    info = {"method": method, "variant": name, "layer": layer, "prompts": prompts, "targets": targets,
            "target_token_ids": [e.target_ids[0] for e in examples], "_adapter": adapter}
    if method == "gradient":
        steps = check_positive_int(settings.get("steps", 5) if steps is None else steps, "steps")
        lr = settings.get("lr") if lr is None else lr
        _check_positive(lr, "lr", name)
        return _gradient_edit(model, adapter, tokenizer, examples, layer, steps, float(lr), info)
    if auto:
        if layer != adapter.num_layers(model) - 1:
            raise ValueError(f"scale='auto' needs the edit at the last layer ({adapter.num_layers(model) - 1}), "
                             f"got layer={layer}: only there is the shift's effect on the logits exact")
        margin = settings.get("margin") if margin is None else margin
        _check_number(margin, "margin", name)
    else:
        scale = settings.get("scale") if scale is None else scale
        _check_positive(scale, "scale", name)
    whitening = None
    if whiten is True:
        whitening = ff2_whitening(model, tokenizer, layer, adapter=adapter)
    elif isinstance(whiten, Whitening):
        if whiten.layer != layer:
            raise ValueError(f"the Whitening was estimated at layer {whiten.layer}, the edit is at layer {layer}")
        whitening = whiten
    elif whiten is not False:
        raise TypeError(f"whiten must be True, False or a Whitening, got {type(whiten).__name__}")
    info.update(whiten=whitening is not None, normalize=bool(normalize) or whitening is not None,
                skip_if_argmax=skip_if_argmax)
    return _forward_shift(model, adapter, tokenizer, examples, layer, scale, margin, whitening, normalize,
                          skip_if_argmax, info)


def _check_positive(value, name, variant):
    if value is None:
        raise ValueError(f"no calibrated {name} for {variant!r} on this model: pass {name}= explicitly")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r}: expected a positive finite number")


def _check_number(value, name, variant):
    if value is None:
        raise ValueError(f"no calibrated {name} for {variant!r} on this model: pass {name}= explicitly")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: expected a finite number")


def _forward_shift(model, adapter, tokenizer, examples, layer, scale, margin, whitening, normalize,
                   skip_if_argmax, info) -> Edit:
    auto = scale == "auto"
    device = model_device(model)
    ids, mask = pad_right([e.prompt_ids for e in examples], _pad_id(tokenizer), device)
    last = mask.sum(1) - 1
    rows = torch.arange(len(examples), device=device)
    hidden, ff2, pre = forward_hidden(model, adapter, ids, mask, ff2_layer=layer, residual=auto)
    logits = lens_logits(model, adapter, hidden[rows, last])
    cdt = torch.float64 if ff2.dtype == torch.float64 else torch.float32
    a = ff2[rows, last].to(cdt)
    tokens = torch.tensor([e.target_ids[0] for e in examples], device=device)
    already = logits.argmax(-1) == tokens
    keep = ~already if (skip_if_argmax and not auto) else torch.ones_like(already)
    if not torch.isfinite(a).all():
        raise ValueError("the FF2 input at the prompt's last token is not finite: check the model's weights")
    norms = a.norm(dim=-1)
    if bool((norms[keep] == 0).any()):
        raise ValueError("the FF2 input at the prompt's last token is zero: no key can address it")
    keys = _keys(a, keep, whitening, normalize)
    embed = adapter.embedding_matrix(model)[tokens].to(cdt)
    if auto:
        shift = _auto_shift(model, adapter, pre[rows, last].float(), embed, tokens, float(margin))
        response = (keys * a).sum(-1)
        shift = shift.to(cdt)
        scales = torch.where(shift > 0, shift / response, torch.zeros_like(shift))
        keep = keep & (shift > 0)
        info.update(scale="auto", margin=float(margin), shifts=shift.tolist())
    else:
        scales = torch.full((len(examples),), float(scale), device=device, dtype=cdt)
        info.update(scale=float(scale))
    scales = torch.where(keep, scales, torch.zeros_like(scales))
    info.update(scales=scales.tolist(), skipped=(~keep).tolist(), already_argmax=already.tolist())
    edited = keep.nonzero().flatten()
    updates = []
    if len(edited):
        k = keys[edited] * scales[edited, None]
        e = embed[edited]
        left, right = (k, e) if adapter.weight_layout == "in_out" else (e, k)
        updates.append(Update(layer, "mlp.out", left.contiguous(), right.contiguous()))
    return Edit(updates, info).apply(model, adapter)


def _keys(a: torch.Tensor, keep: torch.Tensor, whitening: Whitening | None, normalize: bool) -> torch.Tensor:
    """Keys per fact (rows of ``a``); rows not kept are returned as they are and never used."""
    if whitening is None and not normalize:
        return a
    keys = a.clone()
    index = keep.nonzero().flatten()
    if len(index) == 0:
        return keys
    rows = a[index].double()
    cinv_a = rows if whitening is None else rows @ whitening.inverse.to(rows.device).double()  # symmetric
    gram = rows @ cinv_a.T  # A^T C^-1 A
    solved = torch.linalg.pinv(gram, hermitian=True, rtol=1e-10) @ cinv_a  # pinv: repeated prompts are fine
    keys[index] = solved.to(keys.dtype)
    return keys


#: the smallest logit lead scale="auto" aims for (margin=0 means: just the argmax, by this much)
MIN_LEAD = 1e-3
#: the largest shift scale="auto" tries, in units of |pre-norm residual| / |target embedding|
MAX_SHIFT = 10.0


class LogitCurve:
    """Exact logits of pre-norm residuals ``P`` (N x d) shifted along one direction ``e``: ``P + c * e``.

    With ``x = P + c e`` the final norm gives ``g * centre(x) / sigma(c) + beta`` (no centring for RMSNorm, no
    norm at all when the lens has none), so the logits are ``(A + c B) / sigma(c) + const`` with
    ``A = W (g * centre(P))``, ``B = W (g * centre(e))``, ``const = W beta + b`` and ``sigma(c)^2`` a quadratic in
    ``c``: after two unembedding products, any shift costs O(V) per row. Used for ``scale="auto"`` and for the
    exact last-layer trade-off sweeps of :mod:`blens_fast.evaluate`.
    """

    @torch.no_grad()
    def __init__(self, model, adapter: Adapter, pre: torch.Tensor, e: torch.Tensor):
        lens = adapter.lens(model)
        w = lens.weight.float()
        self.kind = lens.norm_kind
        pre, e = pre.float(), e.float()
        if self.kind == "layernorm":
            pre = pre - pre.mean(-1, keepdim=True)
            e = e - e.mean()
        g = lens.norm_weight.float() if lens.norm_weight is not None else torch.ones_like(e)
        ab = torch.cat([pre * g, (e * g)[None]]) @ w.T
        self.a, self.b = ab[:-1], ab[-1]
        const = torch.zeros(w.shape[0], device=w.device)
        if lens.norm_bias is not None:
            const = const + w @ lens.norm_bias.float()
        if lens.bias is not None:
            const = const + lens.bias.float()
        self.const = const
        self.hh = (pre * pre).mean(-1)
        self.hx = (pre * e).mean(-1)
        self.he = (e * e).mean()
        self.eps = lens.eps if self.kind is not None else 0.0
        self.unit = (pre.norm(dim=-1) / e.norm().clamp_min(1e-12))

    @torch.no_grad()
    def logits(self, c: torch.Tensor, rows=None) -> torch.Tensor:
        """Logits (``len(c) x V``) of rows ``rows`` (default: all, in order) shifted by ``c`` (one per row)."""
        rows = torch.arange(len(self.a), device=self.a.device) if rows is None else rows
        c = c.to(self.a.dtype)
        if self.kind is None:
            sigma = torch.ones_like(c)
        else:
            sigma = (self.hh[rows] + 2 * c * self.hx[rows] + c * c * self.he + self.eps).sqrt()
        return (self.a[rows] + c[:, None] * self.b[None]) / sigma[:, None] + self.const[None]

    def lead(self, row: int, token: int, c: torch.Tensor) -> torch.Tensor:
        """The target's logit minus the best other logit, for each shift in ``c`` (row ``row``)."""
        z = self.logits(c, torch.full((len(c),), row, device=self.a.device))
        zt = z[:, token].clone()
        z[:, token] = -torch.inf
        return zt - z.max(-1).values

    def smallest_shift(self, row: int, token: int, margin: float, **kwargs) -> float:
        """The smallest ``c >= 0`` giving ``token`` a lead >= ``margin`` (see :meth:`smallest_shifts`)."""
        return self.smallest_shifts(row, token, [margin], **kwargs)[0]

    @torch.no_grad()
    def smallest_shifts(self, row: int, token: int, margins, *, grid: int = 41, iters: int = 24,
                        candidates: int = 64, cap: float = MAX_SHIFT) -> list[float]:
        """Per margin, the smallest ``c >= 0`` giving ``token`` a logit lead >= ``margin`` over every other token
        (0 if it already has it): a geometric grid from 1e-3 to ``cap`` times ``|P|/|e|`` (:data:`MAX_SHIFT`),
        then bisection inside the bracketing grid step against the ``candidates`` strongest rivals at the
        bracket's ends, then a check of the result against the whole vocabulary (a full bisection if it fails).
        When no shift up to the cap reaches the margin: the smallest one that makes the target the argmax, and
        when none does, 0 (no edit: a larger push would only damage the model). Margins are at least
        :data:`MIN_LEAD`, so that rounding in the edited forward pass cannot undo a tie break."""
        margins = [max(float(m), MIN_LEAD) for m in margins]
        found = self._smallest_shifts(row, token, margins, grid, iters, candidates, 4 * candidates, cap)
        if found is not None:
            return found
        return self._smallest_shifts(row, token, margins, grid, iters, candidates, None, cap)

    def _smallest_shifts(self, row, token, margins, grid, iters, candidates, rivals, cap):
        """With ``rivals``: the grid and bisection over the target and the ``rivals`` tokens strongest at no shift
        or along ``e``, each result then checked against the whole vocabulary (None if one fails: the caller
        falls back to ``rivals=None``, the whole vocabulary). The restricted lead is never below the full lead,
        so a result that passes the check is the full problem's answer too."""
        device = self.a.device
        shifts = torch.cat([torch.zeros(1, device=device),
                            self.unit[row] * torch.logspace(-3, math.log10(cap), grid, device=device)])
        if rivals is not None:
            z0 = self.logits(torch.zeros(1, device=device), torch.full((1,), row, device=device))[0]
            top = torch.cat([z0.topk(rivals).indices, self.b.topk(rivals).indices]).unique()
            columns = torch.cat([torch.tensor([token], device=device), top[top != token]])
            results = []
            for margin, (lo, hi) in zip(margins, self._brackets(row, columns, shifts, margins)):
                if hi is None:
                    return None
                if hi > 0:
                    lo, hi = self._bisect(row, token, columns, margin, lo, hi, iters)
                if self.lead(row, token, torch.tensor([hi], device=device)).item() < margin:
                    return None
                results.append(hi)
            return results
        z = self.logits(shifts, torch.full((len(shifts),), row, device=device))
        zt = z[:, token].clone()
        z[:, token] = -torch.inf
        leads = zt - z.max(-1).values
        out = []
        for margin in margins:
            ok = (leads >= margin).nonzero().flatten()
            if len(ok) == 0:
                margin = MIN_LEAD
                ok = (leads >= margin).nonzero().flatten()
            if len(ok) == 0:
                out.append(0.0)
                continue
            j = int(ok[0])
            if j == 0:
                out.append(0.0)
                continue
            lo, hi = float(shifts[j - 1]), float(shifts[j])
            strongest = torch.cat([z[j - 1].topk(candidates).indices, z[j].topk(candidates).indices]).unique()
            columns = torch.cat([torch.tensor([token], device=device), strongest])
            lo, hi = self._bisect(row, token, columns, margin, lo, hi, iters)
            if self.lead(row, token, torch.tensor([hi], device=device)).item() < margin:  # a rival outside the set
                lo, hi = self._bisect(row, token, None, margin, float(shifts[j - 1]), float(shifts[j]), iters)
            out.append(hi)
        return out

    def _brackets(self, row, columns, shifts, margins):
        """Per margin, ``(lo, hi)`` grid shifts around the first one whose restricted lead reaches it (``(0, 0)``
        when no shift is needed; ``(None, None)`` when no grid point reaches it)."""
        sigma = 1.0 if self.kind is None else (self.hh[row] + 2 * shifts * self.hx[row] + shifts * shifts * self.he
                                               + self.eps).sqrt()[:, None]
        z = (self.a[row, columns][None] + shifts[:, None] * self.b[columns][None]) / sigma + self.const[columns][None]
        leads = z[:, 0] - z[:, 1:].max(-1).values
        out = []
        for margin in margins:
            ok = (leads >= margin).nonzero().flatten()
            if len(ok) == 0:
                out.append((None, None))
            elif int(ok[0]) == 0:
                out.append((0.0, 0.0))
            else:
                j = int(ok[0])
                out.append((float(shifts[j - 1]), float(shifts[j])))
        return out

    def _bisect(self, row, token, columns, margin, lo, hi, iters):
        """Bisection of the lead on ``[lo, hi]`` over ``columns`` (target first) or, if None, the whole vocabulary."""
        if columns is None:
            columns = torch.cat([torch.tensor([token], device=self.a.device),
                                 torch.arange(self.a.shape[1], device=self.a.device)[
                                     torch.arange(self.a.shape[1], device=self.a.device) != token]])
        sub, b, const = self.a[row, columns], self.b[columns], self.const[columns]
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            sigma = 1.0 if self.kind is None else math.sqrt(
                float(self.hh[row] + 2 * mid * self.hx[row] + mid * mid * self.he) + self.eps)
            z = (sub + mid * b) / sigma + const
            if float(z[0] - z[1:].max()) >= margin:
                hi = mid
            else:
                lo = mid
        return lo, hi


def _auto_shift(model, adapter, pre: torch.Tensor, embed: torch.Tensor, tokens: torch.Tensor, margin: float
                ) -> torch.Tensor:
    """Per fact, the smallest shift along its target embedding added to its pre-norm residual that gives the
    target a logit lead >= ``margin`` over every other token (0 when it already has it)."""
    out = torch.zeros(pre.shape[0], device=pre.device)
    for i in range(pre.shape[0]):
        curve = LogitCurve(model, adapter, pre[i:i + 1], embed[i])
        out[i] = curve.smallest_shift(0, int(tokens[i]), margin)
    return out


def _gradient_edit(model, adapter, tokenizer, examples, layer, steps, lr, info) -> Edit:
    weight = adapter.weight(model, layer, "mlp.out")
    applied = Edit([], info)
    applied._attach(model, {(layer, "mlp.out"): weight.detach().clone()})
    updates: list[Update] = []
    losses = []
    prompts = [e.prompt for e in examples]
    targets = [e.target for e in examples]
    try:
        for _ in range(steps):
            cap = capture(model, tokenizer, prompts, targets, layers=[layer], modules=("mlp.out",), adapter=adapter)
            losses.append(cap.losses.sum().item())
            grad = cap.gradient(layer, "mlp.out")
            norm = grad.norm().item()
            if not math.isfinite(norm):
                raise ValueError(f"the gradient at layer {layer} is not finite: check the model's weights")
            if norm == 0:
                break
            left, right = (grad.x, grad.delta) if grad.layout == "in_out" else (grad.delta, grad.x)
            cdt = torch.float64 if left.dtype == torch.float64 else torch.float32
            update = Update(layer, "mlp.out", (left.to(cdt) * (-lr / norm)).contiguous(), right.to(cdt).contiguous())
            with torch.no_grad():
                update.apply_to(weight)
            updates.append(update)
    except BaseException:
        applied.revert()
        raise
    info.update(steps=steps, lr=lr, losses=losses)
    result = Edit(updates, info)
    result._attach(model, applied._originals)
    return result
