"""Argument checks shared by the public calls: each names the bad value and what was expected."""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch


def as_str_list(value, name: str) -> list[str]:
    """A string or a sequence of strings as a list of non-empty strings."""
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        items = list(value)
    else:
        raise TypeError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    if not items:
        raise ValueError(f"{name} is empty: expected at least one string")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(item).__name__}: {item!r}")
        if not item.strip():
            raise ValueError(f"{name}[{i}] is empty ({item!r}): expected a non-empty string")
    return items


def check_positive_int(value, name: str, *, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < 1 or (upper is not None and value > upper):
        bound = f"between 1 and {upper}" if upper is not None else "at least 1"
        raise ValueError(f"{name}={value} is out of range: expected {bound}")
    return value


LAYERS_EXPECTED = "layer indices: an int, a list of ints, or a string like '0,2,-1' or '0-3' (or 'all')"


def parse_layers(value, name: str = "layers") -> tuple[int, ...] | None:
    """Layer indices as the CLI and the Python calls both spell them, before they meet a model: ``None`` or
    ``"all"`` (every layer: None), an int, a sequence of ints, or a string ``"0,2,-1"`` / ``"0-3"`` / ``"0-1,5"``.
    Anything else is one error naming ``value`` and what was expected."""
    if value is None:
        return None
    if isinstance(value, str):
        return _parse_layer_text(value, name)
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, Iterable) and not isinstance(value, (bytes, bytearray, dict)):
        items = tuple(value.tolist() if isinstance(value, torch.Tensor) else value)
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int):
                raise TypeError(f"{name}={value!r}: expected {LAYERS_EXPECTED}; got {item!r}, "
                                f"a {type(item).__name__}")
        return items
    raise TypeError(f"{name}={value!r}: expected {LAYERS_EXPECTED}; got a {type(value).__name__}")


def _parse_layer_text(text: str, name: str) -> tuple[int, ...] | None:
    if text.strip().lower() == "all":
        return None
    layers: list[int] = []
    for part in text.split(","):
        part = part.strip()
        span = re.fullmatch(r"(\d+)-(\d+)", part)
        if span and int(span[1]) <= int(span[2]):
            layers.extend(range(int(span[1]), int(span[2]) + 1))
        elif re.fullmatch(r"-?\d+", part):
            layers.append(int(part))
        else:
            raise ValueError(f"{name}={text!r}: expected {LAYERS_EXPECTED}"
                             + (f" (the range {part!r} runs backwards)" if span else ""))
    return tuple(layers)


def check_choice(value, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
    return value


def check_tensor(value, name: str, *, ndim: int | None = None, floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    return value


#: dtype names accepted wherever a dtype is (the CLI's --dtype and the Python calls alike)
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "float64": torch.float64}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp64": "float64",
                  "double": "float64", "float": "float32"}


def check_dtype(value, name: str = "dtype") -> torch.dtype:
    """A floating torch dtype from a dtype or its name (``"bfloat16"``, ``"bf16"``, ...)."""
    if isinstance(value, torch.dtype):
        if value not in DTYPE_NAMES.values():
            raise ValueError(f"{name}={value}: expected one of {', '.join(DTYPE_NAMES)}")
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        key = _DTYPE_ALIASES.get(key, key)
        if key in DTYPE_NAMES:
            return DTYPE_NAMES[key]
    raise ValueError(f"{name}={value!r}: expected one of {', '.join(DTYPE_NAMES)}")


def check_device(value, name: str = "device") -> torch.device:
    """A usable torch device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (CUDA only where a GPU is present)."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a device: expected 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={value!r}: no CUDA device is available here (torch {torch.__version__}); "
                             "use 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{name}={value!r}: there are {torch.cuda.device_count()} CUDA devices "
                             f"(0..{torch.cuda.device_count() - 1})")
    elif device.type != "cpu":
        raise ValueError(f"{name}={value!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    return device


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): for one-line errors that quote
    a library's."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
