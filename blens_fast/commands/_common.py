"""Arguments shared by several subcommands."""
from __future__ import annotations

import argparse
import re


def parse_layers(text: str | None):
    """``"0,2,-1"`` or ``"0-3"`` or ``"all"`` -> a tuple of ints (or None for all layers)."""
    if text is None or text.strip().lower() == "all":
        return None
    layers: list[int] = []
    for part in text.split(","):
        part = part.strip()
        span = re.fullmatch(r"(\d+)-(\d+)", part)
        if span:
            layers.extend(range(int(span[1]), int(span[2]) + 1))
        elif re.fullmatch(r"-?\d+", part):
            layers.append(int(part))
        else:
            raise ValueError(f"--layers {text!r}: expected comma-separated layer indices or ranges like 0-3")
    return tuple(layers)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="'default' (the shipped model) or a local transformers checkpoint folder (safetensors)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")


def add_layers_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", default=None, help="layer indices, e.g. '0,2,-1' or '0-3' (default: all)")
