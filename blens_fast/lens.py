"""The Backward Lens report: what each layer's gradient writes, read through the model's own lens.

For every layer and prompt position it projects (final norm + unembedding, fused top-k):
- ``ff1_top``: the top tokens of the MLP input projection's forward input ``x_i`` (what the gradient of FF1
  writes through its rows);
- ``ff2_bottom``: the bottom tokens of the output projection's VJP ``delta_i`` (gradient descent subtracts
  ``delta``, so these are the tokens an update promotes);
- ``ff2_top``: the top tokens of the same VJP (what an update demotes);
and the rank of the target token among all V tokens in each list's own order (1 = first; ties: lower index first;
the target's first token, or its last with ``loss="last_position"``). The FF2 lists and both ranks come from one
pass over the vocabulary (one GEMM).

A vector that is exactly zero (the last layer's FF2 VJP before the positions the loss scores, say) or whose logits
are all equal has no ranking: such cells are flagged ``degenerate``, greyed in the heatmap and marked in the tables
instead of being listed as if their tie-broken tokens were findings.
"""
from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ._checks import check_positive_int
from ._report import figure_png, pyplot, write_file
from .capture import Capture, capture_examples
from .context import ModelContext, with_context
from .lists import BY_NAME, LENS_MODULES, LIST_NAMES, LISTS, by_factor
from .project import project_lists

if TYPE_CHECKING:  # pandas (and the pyarrow it loads) only when a table is asked for
    import pandas as pd

_DEGENERATE = "(zero or all-tied vector)"


@dataclass(frozen=True)
class LensReport:
    """The Backward Lens of one (prompt, target): per list, ``L x T x k`` tokens, ``L x T`` target ranks and
    ``L x T`` ``degenerate`` flags (zero or all-tied vectors, whose tokens mean nothing)."""

    prompt: str
    target: str
    tokens: tuple[str, ...]
    target_token: str
    target_token_id: int
    layers: tuple[int, ...]
    k: int
    unit_norm: bool
    indices: dict[str, torch.Tensor] = field(repr=False)
    logits: dict[str, torch.Tensor] = field(repr=False)
    probs: dict[str, torch.Tensor] = field(repr=False)
    target_rank: dict[str, torch.Tensor] = field(repr=False)
    degenerate: dict[str, torch.Tensor] = field(repr=False)
    gradients: pd.DataFrame = field(repr=False)
    vocabulary: tuple[str, ...] = field(repr=False, default=())

    @property
    def num_positions(self) -> int:
        """How many token positions the report covers."""
        return len(self.tokens)

    def token(self, token_id: int) -> str:
        """The text of ``token_id`` (the id itself when the report has no vocabulary)."""
        return self.vocabulary[token_id] if self.vocabulary else str(token_id)

    def to_pandas(self) -> pd.DataFrame:
        """Long format: ``layer, module, position, input_token, list, rank, token_id, token, logit, prob,
        degenerate`` (rows of degenerate vectors are kept, flagged)."""
        import pandas as pd

        frames = []
        for entry in LISTS:
            name = entry.name
            idx, logit, prob = self.indices[name], self.logits[name], self.probs[name]
            n_layers, n_pos, k = idx.shape
            layer = torch.tensor(self.layers).repeat_interleave(n_pos * k)
            position = torch.arange(n_pos).repeat_interleave(k).repeat(n_layers)
            ids = idx.flatten().tolist()
            frames.append(pd.DataFrame({
                "layer": layer.numpy(), "module": entry.module, "position": position.numpy(),
                "input_token": [self.tokens[p] for p in position.tolist()], "list": name,
                "rank": torch.arange(1, k + 1).repeat(n_layers * n_pos).numpy(),
                "token_id": ids, "token": [self.token(i) for i in ids],
                "logit": logit.flatten().numpy(), "prob": prob.flatten().numpy(),
                "degenerate": self.degenerate[name].repeat_interleave(k, dim=-1).flatten().numpy(),
            }))
        return pd.concat(frames, ignore_index=True)

    def target_rank_table(self) -> pd.DataFrame:
        """Long format: ``layer, position, input_token, list, target_rank, degenerate`` (1 = the list's first)."""
        import pandas as pd

        rows = []
        for name, ranks in self.target_rank.items():
            for li, layer in enumerate(self.layers):
                for position in range(self.num_positions):
                    rows.append(dict(layer=layer, position=position, input_token=self.tokens[position], list=name,
                                     target_rank=int(ranks[li, position]),
                                     degenerate=bool(self.degenerate[name][li, position])))
        return pd.DataFrame(rows)

    # Presentation (text, PNG, HTML, files) is left out of mutation testing (setup.cfg): its tests check that it
    # renders, not each character.
    # pragma: no mutate start
    def format(self, *, positions: str = "last") -> str:
        """A readable table per layer (the last position by default, ``positions="all"`` for every one)."""
        chosen = range(self.num_positions) if positions == "all" else [self.num_positions - 1]
        lines = [f"Backward Lens  prompt={self.prompt!r}  target={self.target!r} "
                 f"(ranked token {self.target_token!r})  k={self.k}{'  unit-norm' if self.unit_norm else ''}"]
        grads = self.gradients.set_index(["layer", "module"])
        for li, layer in enumerate(self.layers):
            stats = "  ".join(f"{module}: norm {grads.loc[(layer, module), 'norm']:.3g} rank "
                              f"{grads.loc[(layer, module), 'rank']}/{grads.loc[(layer, module), 'tokens']}"
                              for module in self.gradients[self.gradients.layer == layer].module)
            lines.append(f"\nlayer {layer}   {stats}")
            for position in chosen:
                lines.append(f"  position {position} {self.tokens[position]!r}")
                for name in LIST_NAMES:
                    if bool(self.degenerate[name][li, position]):
                        lines.append(f"    {name:<10} {_DEGENERATE}")
                        continue
                    toks = ", ".join(repr(self.token(i)) for i in self.indices[name][li, position].tolist())
                    lines.append(f"    {name:<10} target rank {int(self.target_rank[name][li, position]):>6}  {toks}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def plot(self, path) -> Path:
        """Heatmaps (layers x positions) of the target's rank in the FF2 VJP's bottom list and in FF1's top list,
        each cell annotated with its leading token (degenerate cells grey, marked with a dash); written as PNG."""
        return write_file(path, self._png())

    def _png(self) -> bytes:
        import matplotlib

        plt = pyplot()
        import numpy as np

        names = ("ff2_bottom", "ff1_top")
        vmax = max(1.0, math.log10(len(self.vocabulary) or max(int(r.max()) for r in self.target_rank.values())))
        width = max(6.0, 1.3 * self.num_positions + 2)
        fig, axes = plt.subplots(len(names), 1, figsize=(width, 2.5 + 0.55 * len(self.layers) * len(names)),
                                 squeeze=False)
        cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad="#d0d0d0")
        for ax, name in zip(axes[:, 0], names):
            flat = self.degenerate[name].numpy()
            ranks = np.ma.masked_array(self.target_rank[name].double().log10().numpy(), mask=flat)
            image = ax.imshow(ranks, aspect="auto", cmap=cmap, vmin=0, vmax=vmax)
            for li in range(len(self.layers)):
                for position in range(self.num_positions):
                    if flat[li, position]:
                        ax.text(position, li, "-", ha="center", va="center", fontsize=7, color="#606060")
                        continue
                    ax.text(position, li, self.token(int(self.indices[name][li, position, 0]))[:10], ha="center",
                            va="center", fontsize=7, color="white" if ranks[li, position] > 2 else "black")
            ax.set_yticks(range(len(self.layers)), [str(layer) for layer in self.layers])
            ax.set_xticks(range(self.num_positions), [t[:10] for t in self.tokens], rotation=45, ha="right",
                          fontsize=8)
            ax.set_ylabel("layer")
            ax.set_title(f"{name}: log10 rank of {self.target_token!r} (cell: leading token; grey: zero or all-tied "
                         "vector)", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.03)
        fig.tight_layout()
        return figure_png(fig)

    def _html_body(self, png: bytes) -> str:
        image = base64.b64encode(png).decode()
        last = self.to_pandas()
        last = last[last.position == self.num_positions - 1]
        ranks = self.target_rank_table().pivot_table(index=["list", "layer"], columns="position", values="target_rank")
        return f"""<p>prompt: <b>{html.escape(self.prompt)}</b> &rarr; target: <b>{html.escape(self.target)}</b>
(ranked token {html.escape(repr(self.target_token))}), k={self.k}{', unit-norm' if self.unit_norm else ''}</p>
<img alt="heatmaps" src="data:image/png;base64,{image}">
<h3>Gradient norm and rank per layer</h3>{self.gradients.to_html(index=False)}
<h3>Target rank per layer and position</h3>{ranks.to_html()}
<h3>Tokens at the last position</h3>{last.to_html(index=False)}"""

    def _repr_html_(self) -> str:
        """The report in a notebook: heatmaps and tables."""
        return f"<div><h2>Backward Lens</h2>{self._html_body(self._png())}</div>"

    def to_html(self, path) -> Path:
        """One self-contained page with the heatmaps and the tables."""
        return write_file(path, self._page(self._png()))

    def _page(self, png: bytes) -> str:
        return f"""<!doctype html><html><head><meta charset="utf-8"><title>Backward Lens</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px}}</style></head><body>
<h1>Backward Lens</h1>{self._html_body(png)}
</body></html>"""

    def save(self, directory) -> dict[str, Path]:
        """Write ``lens.png``, ``lens.html``, ``lens_tokens.csv``, ``lens_target_ranks.csv`` and
        ``lens_gradients.csv`` into ``directory`` (the heatmaps are drawn once, for the PNG and the page)."""
        directory = Path(directory)
        png = self._png()
        written = {"png": write_file(directory / "lens.png", png),
                   "html": write_file(directory / "lens.html", self._page(png))}
        for name, frame in (("tokens", self.to_pandas()), ("target_ranks", self.target_rank_table()),
                            ("gradients", self.gradients)):
            written[name] = write_file(directory / f"lens_{name}.csv", frame.to_csv(index=False))
        return written

    # pragma: no mutate end


def factor_lists(ctx: ModelContext, rows: torch.Tensor, targets: torch.Tensor, names, *, k: int, unit_norm: bool,
                 impl: str) -> dict[str, tuple]:
    """The lists ``names`` (of one factor) of ``rows`` in one pass over the vocabulary: per name, the
    :class:`~blens_fast.ops.topk.TopK`, the targets' ranks in that list's order and each row's ``degenerate`` flag
    (a zero vector, or all logits equal when both directions are read)."""
    largest = {BY_NAME[name].largest for name in names}
    found = project_lists(ctx, rows, k=k, top=True in largest, bottom=False in largest, targets=targets,
                          unit_norm=unit_norm, impl=impl)
    flat = rows.detach().abs().amax(-1) == 0
    if found.top is not None and found.bottom is not None:
        flat = flat | (found.top.values[..., 0] == found.bottom.values[..., 0])
    return {name: (found.top, found.target_rank_top, flat) if BY_NAME[name].largest
            else (found.bottom, found.target_rank_bottom, flat) for name in names}


def lens_lists(ctx: ModelContext, cap: Capture, *, k: int, unit_norm: bool, impl: str
               ) -> dict[str, tuple[torch.Tensor, ...]]:
    """The lens lists of every captured example, layer and position (rows ordered example, layer, position): per
    list name of :data:`~blens_fast.lists.LISTS`, ``(indices, logits, probs, target_rank, degenerate)`` on the CPU.

    One pass over the vocabulary per factor: the FF1 inputs' top-k, and the FF2 VJPs' top-k and bottom-k together,
    each with the rank of the example's target token in that list's order.
    """
    for needed in LENS_MODULES:
        if needed not in cap.modules:
            raise ValueError(f"the capture has no {needed!r}: capture modules={LENS_MODULES} for the lens")
    token_ids = torch.cat([torch.full((e.num_tokens,), e.rank_token, dtype=torch.long)
                           for e in cap.examples for _ in cap.layers])
    lists = {}
    for (module, factor), names in by_factor().items():
        rows = cap.rows(module, factor)
        found = factor_lists(ctx, rows, token_ids.to(rows.device), names, k=k, unit_norm=unit_norm, impl=impl)
        for name, (chosen, ranks, flat) in found.items():
            lists[name] = (chosen.indices.cpu(), chosen.values.cpu(), chosen.probs().cpu(), ranks.cpu(), flat.cpu())
    return {name: lists[name] for name in LIST_NAMES}


@with_context
def analyze(ctx: ModelContext, cap: Capture, *, k: int = 10, unit_norm: bool = False,
            impl: str = "auto") -> list[LensReport]:
    """One :class:`LensReport` per captured example (the capture must hold ``mlp.in`` and ``mlp.out``).

    Called as ``analyze(model, tokenizer, cap)`` or ``analyze(ctx, cap)``; a context without a tokenizer gives
    token ids instead of token texts. All vectors of all examples go through the fused projection together
    (:func:`lens_lists`).
    """
    import pandas as pd

    check_positive_int(k, "k", upper=ctx.vocab_size)
    per_list = lens_lists(ctx, cap, k=k, unit_norm=unit_norm, impl=impl)
    vocabulary = ctx.vocabulary if ctx.tokenizer is not None else ()
    found = cap.ranks_and_norms()  # module -> (ranks, norms), (layers, examples) each
    reports, offset = [], 0
    n_layers = len(cap.layers)
    for i, example in enumerate(cap.examples):
        t = example.num_tokens
        span = slice(offset, offset + n_layers * t)
        offset += n_layers * t
        shaped = {name: [v[span].reshape(n_layers, t, *v.shape[1:]) for v in values]
                  for name, values in per_list.items()}
        grads = [dict(layer=layer, module=module, tokens=t, rank=int(found[module][0][li, i]),
                      norm=float(found[module][1][li, i])) for li, layer in enumerate(cap.layers)
                 for module in cap.modules]
        tokens = tuple(vocabulary[j] if vocabulary else str(j) for j in example.input_ids)
        ranked = example.rank_token
        reports.append(LensReport(
            prompt=example.prompt, target=example.target, tokens=tokens,
            target_token=vocabulary[ranked] if vocabulary else str(ranked), target_token_id=ranked,
            layers=cap.layers, k=k, unit_norm=unit_norm,
            indices={n: s[0] for n, s in shaped.items()}, logits={n: s[1] for n, s in shaped.items()},
            probs={n: s[2] for n, s in shaped.items()}, target_rank={n: s[3] for n, s in shaped.items()},
            degenerate={n: s[4] for n, s in shaped.items()}, gradients=pd.DataFrame(grads), vocabulary=vocabulary))
    return reports


@with_context
def lens(ctx: ModelContext, prompt: str, target: str, *, layers=None, k: int = 10, unit_norm: bool = False,
         impl: str = "auto", loss: str = "teacher_forced") -> LensReport:
    """The Backward Lens of one fact: capture (one forward + backward), then fused projections.

    Called as ``lens(model, tokenizer, prompt, target)`` or ``lens(ctx, prompt, target)``. ``k`` tokens per list
    (1..V); ``unit_norm`` projects unit-normalised vectors (the paper's normalised variant); ``layers`` defaults to
    all; ``loss`` as in :func:`blens_fast.capture` (the ranks refer to the target's first token, or its last with
    ``"last_position"``). See :class:`LensReport` for the tables, plots and HTML.
    """
    if not isinstance(prompt, str) or not isinstance(target, str):
        raise TypeError(f"prompt and target must be strings, got {type(prompt).__name__} and {type(target).__name__}")
    check_positive_int(k, "k", upper=ctx.vocab_size)
    examples = ctx.tokenize([prompt], [target], loss=loss)
    cap = capture_examples(ctx, examples, ctx.check_layers(layers), ctx.check_modules(LENS_MODULES))
    return analyze(ctx, cap, k=k, unit_norm=unit_norm, impl=impl)[0]
