"""Imprint and shift: the paper's reading of a gradient step, measured step by step while a fact is edited.

Katz et al. (2024) read one gradient step on the MLPs as two mechanisms: the step **imprints** the forward inputs
``x_i`` into FF1 (the update of the up-projection is ``-lr * sum_i outer(x_i, delta_i)``, so its input side lies in
span{x_i} and the edited neurons fire on those inputs), and it **shifts** FF2's output toward the target token's
embedding. :func:`imprint_shift` trains the FF1 and FF2 weights of the chosen layers on one fact with a real
optimizer (ordinary autograd, ``torch.optim.SGD`` or ``Adam``) and measures, per step and layer:

* ``imprint``: the fraction of FF1's weight update (``mlp.in`` in (in, out) terms, ``dW``; a gated MLP's gate and up
  side by side) that lies in span{x_i} of that step's forward inputs, ``||Q^T dW||_F^2 / ||dW||_F^2`` with ``Q`` an
  orthonormal basis of the inputs (from the captured factors). Exactly 1 for an SGD step; below 1 when the
  optimizer reshapes the gradient (Adam).
* ``key_match`` per position: how strongly the edited keys now respond to that position's input,
  ``||x_i^T dW|| / (||x_i|| ||dW||_2)`` (1 when ``x_i`` is the update's leading input direction).
* ``shift``: the change ``dO`` of the layer's FF2 output at the prompt's last position (``a_n^T dW2``), read through
  the lens on the target token (``shift_target_rank``: its rank among all tokens when ``dO`` is projected like a FF2
  vector; 1 = first) and as the cosine between ``dO`` and the target's unembedding row (``shift_cosine``), beside the
  same cosine for random tokens (``shift_baseline``: their mean and standard deviation).
* the Backward Lens lists of every step (:class:`~blens_fast.lens.LensReport`) and the target's probability.

The model comes back bit for bit (checked) and its parameters' ``requires_grad``/``.grad`` as they were.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ._checks import check_choice, check_positive_int
from ._report import figure_png, pyplot, write_file
from .batching import target_log_probs
from .capture import capture_examples, loss_logits
from .context import ModelContext, with_context
from .forward import eval_mode
from .lens import LensReport, analyze
from .lists import LENS_MODULES
from .project import project_lists

OPTIMIZERS = ("sgd", "adam")
#: default step size per optimizer
DEFAULT_LR = {"sgd": 1.0, "adam": 1e-3}


@dataclass(frozen=True)
class ImprintShiftReport:
    """Per step (``steps`` optimizer steps) and layer: the imprint of FF1, the shift of FF2, the lens lists and the
    target's probability (``steps + 1`` values: before the first step and after each)."""

    prompt: str
    target: str
    target_token: str
    optimizer: str
    lr: float
    layers: tuple[int, ...]
    tokens: tuple[str, ...]
    target_prob: torch.Tensor = field(repr=False)
    imprint: dict = field(repr=False)
    key_match: dict = field(repr=False)
    shift_cosine: torch.Tensor = field(repr=False)
    shift_baseline: torch.Tensor = field(repr=False)
    shift_target_rank: torch.Tensor = field(repr=False)
    lens: tuple[LensReport, ...] = field(repr=False)

    @property
    def steps(self) -> int:
        """How many optimizer steps were taken."""
        return len(self.target_prob) - 1

    def to_pandas(self) -> pd.DataFrame:
        """Long format: ``step, layer, module, position, quantity, value``; what a row is not about is missing
        (``pd.NA``/None): ``position`` for per-layer quantities, ``layer``, ``module`` and ``position`` for the target's
        probability. ``step`` s of an update quantity is the step from weights s to s + 1."""
        rows = [dict(step=s, layer=None, module=None, position=None, quantity="target_prob", value=float(p))
                for s, p in enumerate(self.target_prob)]
        for (layer, module), values in self.imprint.items():
            for s, value in enumerate(values.tolist()):
                rows.append(dict(step=s, layer=layer, module=module, position=None, quantity="imprint", value=value))
                for position, match in enumerate(self.key_match[(layer, module)][s].tolist()):
                    rows.append(dict(step=s, layer=layer, module=module, position=position, quantity="key_match",
                                     value=match))
        for li, layer in enumerate(self.layers):
            for s in range(self.steps):
                for quantity, value in (("shift_cosine", self.shift_cosine[s, li]),
                                        ("shift_baseline_mean", self.shift_baseline[s, li, 0]),
                                        ("shift_baseline_std", self.shift_baseline[s, li, 1]),
                                        ("shift_target_rank", self.shift_target_rank[s, li])):
                    rows.append(dict(step=s, layer=layer, module="mlp.out", position=None, quantity=quantity,
                                     value=float(value)))
        return pd.DataFrame(rows).astype({"layer": "Int64", "position": "Int64"})

    def lens_ranks(self) -> pd.DataFrame:
        """The target's rank in every lens list, per step: ``step, layer, position, list, target_rank, degenerate``."""
        frames = []
        for s, report in enumerate(self.lens):
            frame = report.target_rank_table()
            frame.insert(0, "step", s)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def first_entry(self, k: int = 10, list_name: str = "ff2_bottom") -> pd.DataFrame:
        """Per layer, the first step at which the target is among the top ``k`` of ``list_name`` at the last position,
        and its rank then (both missing, ``pd.NA``, when it never is)."""
        ranks = self.lens_ranks()
        last = ranks[(ranks.list == list_name) & (ranks.position == ranks.position.max()) & ~ranks.degenerate]
        rows = []
        for layer in self.layers:
            hits = last[(last.layer == layer) & (last.target_rank <= k)]
            first = int(hits.step.min()) if len(hits) else None
            rows.append(dict(layer=layer, list=list_name, k=k, first_step=first,
                             rank=int(hits[hits.step == first].target_rank.iloc[0]) if first is not None else None))
        return pd.DataFrame(rows).astype({"first_step": "Int64", "rank": "Int64"})

    def __str__(self) -> str:
        lines = [f"Imprint and shift  prompt={self.prompt!r} target={self.target!r} ({self.optimizer}, lr {self.lr:g}, "
                 f"{self.steps} steps)",
                 "target probability: " + " -> ".join(f"{float(p):.3g}" for p in self.target_prob)]
        for li, layer in enumerate(self.layers):
            imprint = float(self.imprint[(layer, "mlp.in")].mean())
            lines.append(f"layer {layer}: imprint mlp.in {imprint:.3f}; shift cosine "
                         f"{float(self.shift_cosine[:, li].mean()):+.3f} (random tokens "
                         f"{float(self.shift_baseline[:, li, 0].mean()):+.3f} +- "
                         f"{float(self.shift_baseline[:, li, 1].mean()):.3f}); target rank in the shift "
                         f"{int(self.shift_target_rank[-1, li])}")
        return "\n".join(lines)

    def plot(self, path) -> Path:
        """Four panels: the target's probability per step; FF1's imprint fraction per layer; the FF2 shift's cosine with
        the target against random tokens; the target's rank in each layer's FF2 bottom list per step."""
        return write_file(path, self._png())

    def _png(self) -> bytes:
        return figure_png(self._figure(), dpi=110)

    def _figure(self):
        """The four panels. Steps and layers are integers and ticked as such; lines of several layers are drawn side
        by side around each step (and with their own markers), so that equal values (an SGD imprint is exactly 1 at
        every layer) do not hide one another."""
        from matplotlib.ticker import MaxNLocator

        plt = pyplot()
        fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
        steps = range(self.steps + 1)
        axes[0].plot(list(steps), self.target_prob.tolist(), "o-")
        axes[0].set(title=f"P({self.target_token!r}) per step", xlabel="weights after step", ylim=(0, 1.02))
        series = list(self.imprint.items())
        for i, ((layer, module), values) in enumerate(series):
            axes[1].plot(_dodged(self.steps, i, len(series)), values.tolist(), marker=MARKERS[i % len(MARKERS)],
                         label=f"layer {layer} {module}")
        axes[1].set(title="FF1 imprint: update share in span{x_i}", xlabel="step", ylim=(0, 1.05))
        axes[1].legend(fontsize=7)
        for li, layer in enumerate(self.layers):
            x = _dodged(self.steps, li, len(self.layers))
            line, = axes[2].plot(x, self.shift_cosine[:, li].tolist(), marker=MARKERS[li % len(MARKERS)],
                                 label=f"layer {layer}")
            mean, std = self.shift_baseline[:, li, 0], self.shift_baseline[:, li, 1]
            axes[2].fill_between(x, (mean - 2 * std).tolist(), (mean + 2 * std).tolist(), color=line.get_color(),
                                 alpha=0.15)
        axes[2].axhline(0, color="grey", lw=0.5)
        axes[2].set(title="FF2 shift: cos(dO, target row)\nband: random tokens, mean +- 2 sd", xlabel="step")
        axes[2].legend(fontsize=7)
        for ax in axes[:3]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ranks = self.lens_ranks()
        last = ranks[(ranks.list == "ff2_bottom") & (ranks.position == ranks.position.max())]
        grid = last.pivot_table(index="layer", columns="step", values="target_rank")
        image = axes[3].imshow(grid.apply(lambda c: c.map(lambda v: max(v, 1))).transform("log10").to_numpy(),
                               aspect="auto", cmap="viridis_r", vmin=0)
        axes[3].set(title=f"log10 rank of {self.target_token!r} in ff2_bottom\n(last position; yellow: rank 1)",
                    xlabel="weights after step", xticks=range(len(grid.columns)),
                    xticklabels=[str(s) for s in grid.columns], ylabel="layer", yticks=range(len(grid.index)),
                    yticklabels=[str(i) for i in grid.index])
        fig.colorbar(image, ax=axes[3], fraction=0.04)
        fig.suptitle(f"{self.prompt!r} -> {self.target!r}: {self.optimizer}, lr {self.lr:g}", fontsize=10)
        fig.tight_layout()
        return fig

    def _html_body(self, png: bytes) -> str:
        image = base64.b64encode(png).decode()
        summary = self.to_pandas().pivot_table(index=["layer", "module"], columns="quantity", values="value",
                                               aggfunc="mean")
        return (f"<pre>{html.escape(str(self))}</pre><img alt='imprint and shift' src='data:image/png;base64,{image}'>"
                f"<h3>Means over the steps</h3>{summary.to_html()}"
                f"<h3>First step with the target in the top 10 of ff2_bottom</h3>"
                f"{self.first_entry().to_html(index=False)}")

    def _repr_html_(self) -> str:
        return f"<div><h2>Imprint and shift</h2>{self._html_body(self._png())}</div>"

    def save(self, directory) -> dict[str, Path]:
        """Write ``imprint_shift.png``, ``imprint_shift.html``, ``imprint_shift.csv`` and ``imprint_shift_lens.csv``
        (the panels are drawn once, for the PNG and the page)."""
        directory = Path(directory)
        png = self._png()
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Imprint and shift</title></head><body>"
                f"<h1>Imprint and shift</h1>{self._html_body(png)}</body></html>")
        return {"png": write_file(directory / "imprint_shift.png", png),
                "html": write_file(directory / "imprint_shift.html", page),
                "csv": write_file(directory / "imprint_shift.csv", self.to_pandas().to_csv(index=False)),
                "lens": write_file(directory / "imprint_shift_lens.csv", self.lens_ranks().to_csv(index=False))}


#: markers of the lines of one panel, in order
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
#: how far apart (in steps) the lines of one panel are drawn around each step
DODGE = 0.3


def _dodged(steps: int, i: int, count: int) -> list[float]:
    """The x positions of line ``i`` of ``count``: the steps ``0 .. steps - 1`` moved by at most ``DODGE / 2``."""
    offset = 0.0 if count == 1 else DODGE * (i / (count - 1) - 0.5)
    return [s + offset for s in range(steps)]


def imprint_fraction(x: torch.Tensor, update_io: torch.Tensor) -> float:
    """The share of ``||dW||_F^2`` (``dW``: ``d_in x d_out``) in the span of the rows of ``x`` (``T x d_in``)."""
    q = torch.linalg.qr(x.double().T).Q
    total = update_io.double().square().sum()
    return float((q.T @ update_io.double()).square().sum() / total) if total > 0 else 0.0


def key_match(x: torch.Tensor, update_io: torch.Tensor) -> torch.Tensor:
    """Per row ``x_i``: ``||x_i^T dW|| / (||x_i|| ||dW||_2)``."""
    dw = update_io.double()
    spectral = torch.linalg.matrix_norm(dw, ord=2)
    x = x.double()
    response = (x @ dw).norm(dim=-1)
    return (response / (x.norm(dim=-1) * spectral).clamp_min(1e-300)).float()


@with_context
def imprint_shift(ctx: ModelContext, prompt: str, target: str, *, steps: int = 5, lr: float | None = None,
                  optimizer: str = "sgd", layers=None, k: int = 10, baseline_tokens: int = 2000,
                  seed: int = 0) -> ImprintShiftReport:
    """Train the FF1 and FF2 weights of ``layers`` (default all) on one fact for ``steps`` optimizer steps and measure
    the imprint and the shift of each step (module docstring); the model comes back bit for bit.

    Called as ``imprint_shift(model, tokenizer, prompt, target)`` or ``imprint_shift(ctx, prompt, target)``.
    ``optimizer``: ``"sgd"`` or ``"adam"``; ``lr``: default :data:`DEFAULT_LR`; ``k``: tokens per lens list;
    ``baseline_tokens``: random tokens (drawn with ``seed``) whose cosines with the shift form the baseline.
    """
    if not isinstance(prompt, str) or not isinstance(target, str):
        raise TypeError(f"prompt and target must be strings, got {type(prompt).__name__} and {type(target).__name__}")
    check_choice(optimizer, "optimizer", OPTIMIZERS)
    steps = check_positive_int(steps, "steps")
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr={lr!r}: expected a positive number")
    check_positive_int(baseline_tokens, "baseline_tokens", upper=ctx.vocab_size)
    layer_ids = ctx.check_layers(layers)
    ff1 = ctx.module_parts("mlp.in")  # a gated MLP's gate and up, side by side
    examples = ctx.tokenize([prompt], [target])
    example = examples[0]
    trained = {(layer, m): ctx.weight(layer, m) for layer in layer_ids for m in ctx.resolve_modules(LENS_MODULES)}
    snapshot = {name: p.detach().clone() for name, p in ctx.model.named_parameters()}
    flags = {name: (p.requires_grad, p.grad) for name, p in ctx.model.named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    others = torch.randperm(ctx.vocab_size, generator=generator)
    others = others[others != example.target_ids[0]][:baseline_tokens].to(ctx.device)
    unembedding = ctx.lens.weight.detach().float()
    target_row = unembedding[example.target_ids[0]]
    imprint = {(layer, "mlp.in"): [] for layer in layer_ids}
    matches = {(layer, "mlp.in"): [] for layer in layer_ids}
    cosines, baselines, shift_ranks, probs, reports = [], [], [], [], []
    try:
        for p in ctx.model.parameters():
            p.requires_grad_(False)
            p.grad = None
        params = list(trained.values())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.Adam(params, lr=lr)
        for step in range(steps + 1):
            cap = capture_examples(ctx, examples, layer_ids, LENS_MODULES)
            probs.append(float(torch.exp(-cap.losses[0])))
            reports.append(analyze(ctx, cap, k=k)[0])
            if step == steps:
                break
            before = {key: ctx.weight_io(*key).detach().clone() for key in trained}
            _optimizer_step(ctx, examples, opt)
            updates = {key: ctx.weight_io(*key).detach() - before[key] for key in trained}  # d_in x d_out each
            for layer in layer_ids:
                x = cap.x[(layer, "mlp.in")][0]
                update = ff1.join({part: updates[(layer, part)] for part in ff1.parts})
                imprint[(layer, "mlp.in")].append(imprint_fraction(x, update))
                matches[(layer, "mlp.in")].append(key_match(x, update))
            shifts = torch.stack([cap.x[(layer, "mlp.out")][0][-1].float() @ updates[(layer, "mlp.out")].float()
                                  for layer in layer_ids])  # L x d: dO at the last position
            cos = torch.nn.functional.cosine_similarity(shifts, target_row[None], dim=-1)
            random_cos = torch.nn.functional.cosine_similarity(shifts[:, None], unembedding[others][None], dim=-1)
            cosines.append(cos.cpu())
            baselines.append(torch.stack([random_cos.mean(-1), random_cos.std(-1)], -1).cpu())
            read = project_lists(ctx, shifts, k=1, top=False, bottom=False, targets=example.target_ids[0])
            shift_ranks.append(read.target_rank_top.cpu())
    finally:
        with torch.no_grad():
            for name, p in ctx.model.named_parameters():
                p.copy_(snapshot[name])
                p.requires_grad_(flags[name][0])
                p.grad = flags[name][1]
    changed = [name for name, p in ctx.model.named_parameters() if not torch.equal(p, snapshot[name])]
    if changed:
        raise RuntimeError(f"the model did not come back bit for bit ({changed[:3]}): please report this")
    vocabulary = ctx.vocabulary
    return ImprintShiftReport(
        prompt=prompt, target=target, target_token=vocabulary[example.target_ids[0]], optimizer=optimizer,
        lr=float(lr), layers=layer_ids, tokens=tuple(vocabulary[i] for i in example.input_ids),
        target_prob=torch.tensor(probs), imprint={key: torch.tensor(v) for key, v in imprint.items()},
        key_match={key: torch.stack(v) for key, v in matches.items()}, shift_cosine=torch.stack(cosines),
        shift_baseline=torch.stack(baselines), shift_target_rank=torch.stack(shift_ranks), lens=tuple(reports))


def _optimizer_step(ctx: ModelContext, examples, opt) -> None:
    """One ordinary autograd step of the teacher-forced loss (the trained weights only require grad)."""
    ids, mask = ctx.pad([e.input_ids for e in examples])
    opt.zero_grad(set_to_none=True)
    with eval_mode(ctx.model), torch.enable_grad():
        logits, positions = loss_logits(ctx.model, ids, mask, examples)
        (-target_log_probs(logits, examples, positions)).sum().backward()
    opt.step()
