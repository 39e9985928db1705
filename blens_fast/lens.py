"""The Backward Lens report: what each layer's gradient writes, read through the model's own lens.

For every layer and prompt position it projects (final norm + unembedding, fused top-k):
- ``ff1_top``: the top tokens of the MLP input projection's forward input ``x_i`` (what the gradient of FF1
  writes through its rows);
- ``ff2_bottom``: the bottom tokens of the output projection's VJP ``delta_i`` (gradient descent subtracts
  ``delta``, so these are the tokens an update promotes);
- ``ff2_top``: the top tokens of the same VJP (what an update demotes);
and the rank of the target's first token among all V tokens in each list's own order (1 = first; ties: lower
index first). The FF2 lists and both ranks come from one pass over the vocabulary (one GEMM).
"""
from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ._checks import check_positive_int
from .adapters import get_adapter
from .capture import Capture, capture
from .project import project_topk_bottomk

#: list name -> (module whose factor is read, factor, largest first?)
LISTS = {
    "ff1_top": ("in", "x", True),
    "ff2_bottom": ("out", "delta", False),
    "ff2_top": ("out", "delta", True),
}


@dataclass(frozen=True)
class LensReport:
    """The Backward Lens of one (prompt, target): per list, ``L x T x k`` tokens and ``L x T`` target ranks."""

    prompt: str
    target: str
    tokens: tuple[str, ...]
    target_token: str
    target_token_id: int
    layers: tuple[int, ...]
    k: int
    normalized: bool
    indices: dict[str, torch.Tensor] = field(repr=False)
    logits: dict[str, torch.Tensor] = field(repr=False)
    probs: dict[str, torch.Tensor] = field(repr=False)
    target_rank: dict[str, torch.Tensor] = field(repr=False)
    gradients: pd.DataFrame = field(repr=False)
    vocabulary: tuple[str, ...] = field(repr=False, default=())

    @property
    def num_positions(self) -> int:
        return len(self.tokens)

    def token(self, token_id: int) -> str:
        return self.vocabulary[token_id] if self.vocabulary else str(token_id)

    def to_pandas(self) -> pd.DataFrame:
        """Long format: ``layer, module, position, input_token, list, rank, token_id, token, logit, prob``."""
        frames = []
        for name, (part, _, _) in LISTS.items():
            idx, logit, prob = self.indices[name], self.logits[name], self.probs[name]
            n_layers, n_pos, k = idx.shape
            layer = torch.tensor(self.layers).repeat_interleave(n_pos * k)
            position = torch.arange(n_pos).repeat_interleave(k).repeat(n_layers)
            ids = idx.flatten().tolist()
            frames.append(pd.DataFrame({
                "layer": layer.numpy(), "module": f"mlp.{part}", "position": position.numpy(),
                "input_token": [self.tokens[p] for p in position.tolist()], "list": name,
                "rank": torch.arange(1, k + 1).repeat(n_layers * n_pos).numpy(),
                "token_id": ids, "token": [self.token(i) for i in ids],
                "logit": logit.flatten().numpy(), "prob": prob.flatten().numpy(),
            }))
        return pd.concat(frames, ignore_index=True)

    def target_rank_table(self) -> pd.DataFrame:
        """Long format: ``layer, position, input_token, list, target_rank`` (1 = the list's first token)."""
        rows = []
        for name, ranks in self.target_rank.items():
            for li, layer in enumerate(self.layers):
                for position in range(self.num_positions):
                    rows.append(dict(layer=layer, position=position, input_token=self.tokens[position], list=name,
                                     target_rank=int(ranks[li, position])))
        return pd.DataFrame(rows)

    def format(self, *, positions: str = "last") -> str:
        """A readable table per layer (the last position by default, ``positions="all"`` for every one)."""
        chosen = range(self.num_positions) if positions == "all" else [self.num_positions - 1]
        lines = [f"Backward Lens  prompt={self.prompt!r}  target={self.target!r} "
                 f"(first token {self.target_token!r})  k={self.k}{'  normalized' if self.normalized else ''}"]
        grads = self.gradients.set_index(["layer", "module"])
        for li, layer in enumerate(self.layers):
            stats = "  ".join(f"{module}: norm {grads.loc[(layer, module), 'norm']:.3g} rank "
                              f"{grads.loc[(layer, module), 'rank']}/{grads.loc[(layer, module), 'tokens']}"
                              for module in self.gradients[self.gradients.layer == layer].module)
            lines.append(f"\nlayer {layer}   {stats}")
            for position in chosen:
                lines.append(f"  position {position} {self.tokens[position]!r}")
                for name in LISTS:
                    toks = ", ".join(repr(self.token(i)) for i in self.indices[name][li, position].tolist())
                    lines.append(f"    {name:<10} target rank {int(self.target_rank[name][li, position]):>6}  {toks}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def plot(self, path) -> Path:
        """Heatmaps (layers x positions) of the target's rank in the FF2 VJP's bottom list and in FF1's top list,
        each cell annotated with its leading token; written as PNG."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self._png())
        return path

    def _png(self) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = ("ff2_bottom", "ff1_top")
        vmax = max(1.0, math.log10(len(self.vocabulary) or max(int(r.max()) for r in self.target_rank.values())))
        width = max(6.0, 1.3 * self.num_positions + 2)
        fig, axes = plt.subplots(len(names), 1, figsize=(width, 2.5 + 0.55 * len(self.layers) * len(names)),
                                 squeeze=False)
        for ax, name in zip(axes[:, 0], names):
            ranks = self.target_rank[name].double().log10().numpy()
            image = ax.imshow(ranks, aspect="auto", cmap="viridis_r", vmin=0, vmax=vmax)
            for li in range(len(self.layers)):
                for position in range(self.num_positions):
                    ax.text(position, li, self.token(int(self.indices[name][li, position, 0]))[:10], ha="center",
                            va="center", fontsize=7, color="white" if ranks[li, position] > 2 else "black")
            ax.set_yticks(range(len(self.layers)), [str(layer) for layer in self.layers])
            ax.set_xticks(range(self.num_positions), [t[:10] for t in self.tokens], rotation=45, ha="right",
                          fontsize=8)
            ax.set_ylabel("layer")
            ax.set_title(f"{name}: log10 rank of {self.target_token!r} (cell: leading token)", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.03)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120)
        plt.close(fig)
        return buffer.getvalue()

    def to_html(self, path) -> Path:
        """One self-contained page with the heatmaps and the tables."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        image = base64.b64encode(self._png()).decode()
        last = self.to_pandas()
        last = last[last.position == self.num_positions - 1]
        ranks = self.target_rank_table().pivot_table(index=["list", "layer"], columns="position", values="target_rank")
        page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Backward Lens</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px}}</style></head><body>
<h1>Backward Lens</h1><p>prompt: <b>{html.escape(self.prompt)}</b> &rarr; target: <b>{html.escape(self.target)}</b>
(first token {html.escape(repr(self.target_token))}), k={self.k}{', normalized' if self.normalized else ''}</p>
<img alt="heatmaps" src="data:image/png;base64,{image}">
<h2>Gradient norm and rank per layer</h2>{self.gradients.to_html(index=False)}
<h2>Target rank per layer and position</h2>{ranks.to_html()}
<h2>Tokens at the last position</h2>{last.to_html(index=False)}
</body></html>"""
        path.write_text(page, encoding="utf-8")
        return path

    def save(self, directory) -> dict[str, Path]:
        """Write ``lens.png``, ``lens.html``, ``lens_tokens.csv``, ``lens_target_ranks.csv`` and
        ``lens_gradients.csv`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = {"png": self.plot(directory / "lens.png"), "html": self.to_html(directory / "lens.html")}
        for name, frame in (("tokens", self.to_pandas()), ("target_ranks", self.target_rank_table()),
                            ("gradients", self.gradients)):
            written[name] = directory / f"lens_{name}.csv"
            frame.to_csv(written[name], index=False)
        return written


def _vocabulary(tokenizer) -> tuple[str, ...]:
    if tokenizer is None:
        return ()
    inverse = {i: t for t, i in tokenizer.get_vocab().items()}
    return tuple(tokenizer.convert_tokens_to_string([inverse[i]]) if i in inverse else f"<{i}>"
                 for i in range(max(inverse) + 1))


def project_factor_lists(model, rows: torch.Tensor, targets: torch.Tensor, names, *, k: int = 10,
                         normalized: bool = False, impl: str = "auto") -> dict[str, tuple]:
    """The lists ``names`` (of one factor) of ``rows`` in one pass over the vocabulary: per name, the
    :class:`~blens_fast.ops.topk.TopK` and the targets' ranks in that list's order."""
    largest = {LISTS[name][2] for name in names}
    result = project_topk_bottomk(model, rows, k=k, top=True in largest, bottom=False in largest, targets=targets,
                                  normalize=normalized, impl=impl)
    return {name: (result.top, result.target_rank_top) if LISTS[name][2]
            else (result.bottom, result.target_rank_bottom) for name in names}


def lists_by_factor() -> dict[tuple[str, str], list[str]]:
    """:data:`LISTS` grouped by the (module part, factor) they read: ``{("in", "x"): ["ff1_top"], ...}``."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name, (part, factor, _) in LISTS.items():
        groups.setdefault((part, factor), []).append(name)
    return groups


def project_lists(cap: Capture, model, *, k: int = 10, normalized: bool = False,
                  impl: str = "auto") -> dict[str, tuple[torch.Tensor, ...]]:
    """The lens lists of every captured example, layer and position (rows ordered example, layer, position):
    per list name in :data:`LISTS`, ``(indices, logits, probs, target_rank)`` on the CPU.

    One pass over the vocabulary per factor: the FF1 inputs' top-k, and the FF2 VJPs' top-k and bottom-k
    together, each with the rank of the example's first target token in that list's order.
    """
    in_module = "mlp.up" if "mlp.up" in cap.modules else "mlp.in"
    for needed in (in_module, "mlp.out"):
        if needed not in cap.modules:
            raise ValueError(f"the capture has no {needed!r}: capture modules=('mlp.in', 'mlp.out') for the lens")
    modules = {"in": in_module, "out": "mlp.out"}
    token_ids = torch.cat([torch.full((e.num_tokens,), e.target_ids[0], dtype=torch.long)
                           for e in cap.examples for _ in cap.layers])
    lists = {}
    for (part, factor), names in lists_by_factor().items():
        store = cap.x if factor == "x" else cap.delta
        rows = torch.cat([store[(layer, modules[part])][i] for i in range(cap.num_examples) for layer in cap.layers])
        found = project_factor_lists(model, rows, token_ids.to(rows.device), names, k=k, normalized=normalized,
                                     impl=impl)
        for name, (chosen, ranks) in found.items():
            lists[name] = (chosen.indices.cpu(), chosen.values.cpu(), chosen.probs().cpu(), ranks.cpu())
    return {name: lists[name] for name in LISTS}


def analyze(cap: Capture, model, tokenizer=None, *, k: int = 10, normalized: bool = False,
            impl: str = "auto") -> list[LensReport]:
    """One :class:`LensReport` per captured example (the capture must hold ``mlp.in``/``mlp.up`` and ``mlp.out``).

    All vectors of all examples go through the fused projection together (:func:`project_lists`).
    """
    per_list = project_lists(cap, model, k=k, normalized=normalized, impl=impl)
    vocabulary = _vocabulary(tokenizer)
    sizes = [e.num_tokens for e in cap.examples]
    found = cap.ranks_and_norms()  # module -> (ranks, norms), (layers, examples) each
    reports, offset = [], 0
    n_layers = len(cap.layers)
    for i, example in enumerate(cap.examples):
        t = sizes[i]
        span = slice(offset, offset + n_layers * t)
        offset += n_layers * t
        shaped = {name: [v[span].reshape(n_layers, t, *v.shape[1:]) for v in values]
                  for name, values in per_list.items()}
        grads = [dict(layer=layer, module=module, tokens=t, rank=int(found[module][0][li, i]),
                      norm=float(found[module][1][li, i])) for li, layer in enumerate(cap.layers)
                 for module in cap.modules]
        tokens = tuple(vocabulary[j] if vocabulary else str(j) for j in example.input_ids)
        first = example.target_ids[0]
        reports.append(LensReport(
            prompt=example.prompt, target=example.target, tokens=tokens,
            target_token=vocabulary[first] if vocabulary else str(first), target_token_id=first,
            layers=cap.layers, k=k, normalized=normalized,
            indices={n: s[0] for n, s in shaped.items()}, logits={n: s[1] for n, s in shaped.items()},
            probs={n: s[2] for n, s in shaped.items()}, target_rank={n: s[3] for n, s in shaped.items()},
            gradients=pd.DataFrame(grads), vocabulary=vocabulary))
    return reports


def lens(model, tokenizer, prompt: str, target: str, *, layers=None, k: int = 10, normalized: bool = False,
         impl: str = "auto") -> LensReport:
    """The Backward Lens of one fact: capture (one forward + backward), then fused projections.

    ``k`` tokens per list (1..V); ``normalized`` projects unit-normalised vectors (the paper's variant);
    ``layers`` defaults to all. See :class:`LensReport` for the tables, plots and HTML.
    """
    if not isinstance(prompt, str) or not isinstance(target, str):
        raise TypeError(f"prompt and target must be strings, got {type(prompt).__name__} and {type(target).__name__}")
    vocab_size = get_adapter(model).lens(model).weight.shape[0]
    check_positive_int(k, "k", upper=vocab_size)
    cap = capture(model, tokenizer, [prompt], [target], layers=layers, modules=("mlp.in", "mlp.out"))
    return analyze(cap, model, tokenizer, k=k, normalized=normalized, impl=impl)[0]
