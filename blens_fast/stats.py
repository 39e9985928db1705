"""Dataset-level gradient statistics in one streaming pass, without a single dense gradient.

For every captured (layer, module) and every example ``i`` with factors ``X_i`` (``T x d_in``) and
``Delta_i`` (``T x d_out``):

* the Frobenius norm of its gradient, ``||X_i^T Delta_i||_F^2 = sum((X_i X_i^T) * (Delta_i Delta_i^T))``;
* the summed gradient ``G = sum_i X_i^T Delta_i`` (``p x q`` in the sketch's orientation) enters three
  fixed Gaussian sketches, updated in place by the fused kernels of :mod:`blens_fast.ops.lowrank`:
  ``Y = G Omega`` (``p x k``, the range), ``Z = G Phi`` (``p x m``, an independent residual probe) and
  ``W = Psi G`` (``l x q``, the co-range). Each update costs ``O(T (p + q) (k + l + m))``.

At the end a small exact step (Tropp, Yurtsever, Udell & Cevher, "Practical sketching algorithms for
low-rank matrix approximation", SIAM J. Matrix Anal. Appl. 2017, the single-pass reconstruction) gives the
rank-``r`` approximation: ``Q = qr(Y)``, ``B = (Psi Q)^+ W``, ``G ~ Q B`` and the SVD of the small ``B``.

* Exactness: when ``rank(G) <= k`` (e.g. few examples), ``Q B = G`` up to rounding, so the top singular
  values and vectors equal the dense computation's.
* Frobenius norm of the sum: ``||G||_F^2 = ||Q^T G||_F^2 + ||(I - Q Q^T) G||_F^2``. The residual term is
  estimated from the independent sketch, ``tail = ||(I - Q Q^T) Z||_F^2 / m`` (unbiased, since ``Phi`` is
  independent of ``Q``; relative standard deviation ``sqrt(2 sum s_j^4 / m) / sum s_j^2 <= sqrt(2 / m)`` over
  the residual's singular values ``s_j``). The captured term uses ``E ||B||_F^2 = ||Q^T G||_F^2 +
  k / (l - k - 1) tail`` (Gaussian ``Psi``), so ``||G||_F^2 ~ ||B||_F^2 + (1 - k / (l - k - 1)) tail``. Its error
  scales with the residual energy only: exact when ``rank(G) <= k``, a few percent of the residual energy
  otherwise.
* ``residual`` reports ``sqrt(tail)``, the estimated energy of ``G`` outside the sketch's range, and
  ``approximation_error ~ sqrt((1 + k / (l - k - 1)) tail) / ||G||_F`` the expected relative Frobenius error of
  ``Q B`` (Tropp et al. 2017, Theorem 4.3 with the residual in place of the best rank-``k`` tail).

Defaults: ``k = 2 r + 1``, ``l = 2 k + 1``, ``m = 8``. The test matrices depend only on (shape, sizes, seed), so
every rank of a ``torchrun`` job and every resumed run build the same ones, and sketches add up exactly.
Memory per module: ``(k + m) p + l q`` accumulators plus the test matrices, shared by modules of the same
shape (``(k + m) q + l p``); about 1.6% of one dense GPT-J MLP gradient at ``r = 8`` (see
``benchmarks/bench_stats.py``).
"""
from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pandas as pd
import torch

from ._checks import check_positive_int
from .adapters import get_adapter
from .capture import Capture, capture, model_device
from .ops.lowrank import sketch_update

__all__ = ["GradientStats", "ModuleStats", "StatsAccumulator", "gradient_stats", "sketch_sizes"]


def sketch_sizes(rank: int, sketch_size: int | None = None, cosketch_size: int | None = None,
                 residual_size: int | None = None) -> tuple[int, int, int]:
    """``(k, l, m)``: range sketch ``k = 2r + 1``, co-range sketch ``l = 2k + 1``, residual probes ``m = 8``."""
    rank = check_positive_int(rank, "rank")
    k = 2 * rank + 1 if sketch_size is None else check_positive_int(sketch_size, "sketch_size")
    if k < rank:
        raise ValueError(f"sketch_size={k} is smaller than rank={rank}: expected at least the rank (2 * rank + 1 "
                         "recommended)")
    l = 2 * k + 1 if cosketch_size is None else check_positive_int(cosketch_size, "cosketch_size")
    if l < k:
        raise ValueError(f"cosketch_size={l} is smaller than sketch_size={k}: expected at least sketch_size "
                         "(2 * sketch_size + 1 recommended)")
    if residual_size is None:
        m = 8
    elif isinstance(residual_size, bool) or not isinstance(residual_size, int) or residual_size < 0:
        raise ValueError(f"residual_size={residual_size!r}: expected an int >= 0")
    else:
        m = residual_size
    return k, l, m


def _test_matrices(p: int, q: int, k: int, l: int, m: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``right = [Omega | Phi]`` (``q x (k + m)``) and ``left_t = Psi^T`` (``p x l``), standard Gaussian, float32,
    a pure function of the arguments (generated on the CPU, then moved)."""
    key = zlib.crc32(f"blens_fast.stats/{seed}/{p}/{q}/{k}/{l}/{m}".encode())
    gen = torch.Generator().manual_seed(key)
    right = torch.randn(q, k + m, generator=gen, dtype=torch.float32)
    left_t = torch.randn(p, l, generator=gen, dtype=torch.float32)
    return right.to(device), left_t.to(device)


@dataclass(frozen=True)
class ModuleStats:
    """The summed gradient of one (layer, module) over the dataset, as a rank-``r`` approximation.

    ``u`` (``shape[0] x r``) and ``v`` (``shape[1] x r``) are in the module weight's own layout:
    ``sum_i grad_i ~ u @ diag(singular_values) @ v.T``.
    """

    layer: int
    module: str
    shape: tuple[int, int]
    num_examples: int
    num_tokens: int
    singular_values: torch.Tensor
    u: torch.Tensor = field(repr=False)
    v: torch.Tensor = field(repr=False)
    frobenius: float
    residual: float
    approximation_error: float
    sum_of_norms: float

    @property
    def energy_share(self) -> float:
        """Share of ``||sum||_F^2`` that the rank-``r`` part captures (``sum s_i^2 / frobenius^2``)."""
        if self.frobenius <= 0:
            return 1.0
        return min(1.0, float((self.singular_values.double() ** 2).sum()) / self.frobenius ** 2)

    def dense(self) -> torch.Tensor:
        """The rank-``r`` approximation as a matrix in the weight's layout (costs ``shape[0] * shape[1]``)."""
        return (self.u * self.singular_values) @ self.v.T


@dataclass(frozen=True)
class GradientStats:
    """Per-example gradient norms and the rank-``r`` summed gradient of each (layer, module).

    ``norms[(layer, module)]`` is a float64 tensor with one ``||grad_i||_F`` per example, in ``ids`` order.
    """

    rank: int
    sketch: tuple[int, int, int]
    seed: int
    layers: tuple[int, ...]
    modules: tuple[str, ...]
    ids: tuple = field(repr=False)
    norms: dict = field(repr=False)
    summed: dict = field(repr=False)

    @property
    def num_examples(self) -> int:
        return len(self.ids)

    def __getitem__(self, key) -> ModuleStats:
        return self.summed[key]

    def to_pandas(self, table: str = "summary") -> pd.DataFrame:
        """``"summary"``: one row per (layer, module) with ``examples, tokens, frobenius, residual,
        approximation_error, energy_share, top_singular_value, sum_of_norms, coherence`` (``frobenius /
        sum_of_norms``: 1 when every example pushes the same way); ``"spectrum"``: ``layer, module, index,
        singular_value, energy_share`` (cumulative); ``"norms"``: ``id, layer, module, norm`` per example."""
        if table == "summary":
            rows = []
            for (layer, module), s in self.summed.items():
                rows.append(dict(layer=layer, module=module, rows=s.shape[0], cols=s.shape[1],
                                 examples=s.num_examples, tokens=s.num_tokens, frobenius=s.frobenius,
                                 residual=s.residual, approximation_error=s.approximation_error,
                                 energy_share=s.energy_share,
                                 top_singular_value=float(s.singular_values[0]) if len(s.singular_values) else 0.0,
                                 sum_of_norms=s.sum_of_norms,
                                 coherence=s.frobenius / s.sum_of_norms if s.sum_of_norms > 0 else 0.0))
            return pd.DataFrame(rows)
        if table == "spectrum":
            rows = []
            for (layer, module), s in self.summed.items():
                total = s.frobenius ** 2
                cumulative = 0.0
                for i, value in enumerate(s.singular_values.tolist()):
                    cumulative += value * value
                    rows.append(dict(layer=layer, module=module, index=i + 1, singular_value=value,
                                     energy_share=min(1.0, cumulative / total) if total > 0 else 1.0))
            return pd.DataFrame(rows)
        if table == "norms":
            frames = [pd.DataFrame({"id": list(self.ids), "layer": layer, "module": module, "norm": norms.numpy()})
                      for (layer, module), norms in self.norms.items()]
            return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
                columns=["id", "layer", "module", "norm"])
        raise ValueError(f"table={table!r} is not one of 'summary', 'spectrum', 'norms'")


class StatsAccumulator:
    """Streaming state of :func:`gradient_stats`: sketches per (layer, module) and per-example norms.

    ``update(capture, ids)`` adds one captured batch; ``state_dict()``/``merge_state()`` save and add up states
    (the sketches are linear: partial states of disjoint examples sum to the state of their union);
    ``finalize()`` does the small exact step.
    """

    def __init__(self, shapes: Mapping, *, rank: int = 8, sketch_size: int | None = None,
                 cosketch_size: int | None = None, residual_size: int | None = None, seed: int = 0,
                 device="cpu", impl: str = "auto"):
        self.rank = check_positive_int(rank, "rank")
        self.k, self.l, self.m = sketch_sizes(rank, sketch_size, cosketch_size, residual_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = seed
        self.device = torch.device(device)
        self.impl = impl
        self.keys = list(shapes)
        self.layouts: dict = {}
        self.swap: dict = {}
        self.y: dict = {}
        self.w: dict = {}
        self.tokens: dict = {}
        self.norms_sq: dict = {key: [] for key in self.keys}
        self.ids: list = []
        self._matrices: dict = {}
        for key in self.keys:
            d_in, d_out, layout = shapes[key]
            # The range sketch (k + m columns) goes on the larger side when the co-range sketch is wider.
            swap = (d_in < d_out) if self.l >= self.k + self.m else (d_in > d_out)
            p, q = (d_out, d_in) if swap else (d_in, d_out)
            self.layouts[key] = (d_in, d_out, layout)
            self.swap[key] = swap
            self.y[key] = torch.zeros(p, self.k + self.m, dtype=torch.float32, device=self.device)
            self.w[key] = torch.zeros(self.l, q, dtype=torch.float32, device=self.device)
            self.tokens[key] = 0

    # -- memory ---------------------------------------------------------------------------------
    def _test(self, p: int, q: int):
        if (p, q) not in self._matrices:
            self._matrices[(p, q)] = _test_matrices(p, q, self.k, self.l, self.m, self.seed, self.device)
        return self._matrices[(p, q)]

    def nbytes(self) -> int:
        """Bytes held: accumulators plus (shared) test matrices, whether built yet or not."""
        total = sum(t.numel() * t.element_size() for t in (*self.y.values(), *self.w.values()))
        shapes = {(self.y[key].shape[0], self.w[key].shape[1]) for key in self.keys}
        total += sum(4 * (q * (self.k + self.m) + p * self.l) for p, q in shapes)
        return total

    # -- streaming ----------------------------------------------------------------------------------
    def update_factors(self, key, xs: list[torch.Tensor], deltas: list[torch.Tensor]) -> torch.Tensor:
        """Add examples given as per-example factors of one (layer, module); returns their ``||grad||_F^2``."""
        if key not in self.y:
            raise ValueError(f"{key} is not accumulated here: expected one of {self.keys}")
        lengths = [x.shape[0] for x in xs]
        offsets = torch.zeros(len(xs) + 1, dtype=torch.long)
        offsets[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
        x = torch.cat(xs).to(self.device)
        d = torch.cat(deltas).to(self.device)
        a, b = (d, x) if self.swap[key] else (x, d)
        right, left_t = self._test(a.shape[1], b.shape[1])
        norms_sq = sketch_update(a, b, offsets, right, left_t, self.y[key], self.w[key], impl=self.impl)
        self.tokens[key] += int(offsets[-1])
        return norms_sq.cpu()

    def update(self, cap: Capture, ids=None) -> dict:
        """Add every example of a capture; ``ids`` name them (default: running indices). Returns the
        per-key ``||grad_i||_F`` (float64) of this batch."""
        if ids is None:
            ids = list(range(len(self.ids), len(self.ids) + cap.num_examples))
        ids = list(ids)
        if len(ids) != cap.num_examples:
            raise ValueError(f"got {len(ids)} ids for {cap.num_examples} captured examples")
        out = {}
        for key in self.keys:
            if key not in cap.x:
                raise ValueError(f"the capture has no {key}: it holds {sorted(cap.x)}")
            norms_sq = self.update_factors(key, cap.x[key], cap.delta[key])
            self.norms_sq[key].append(norms_sq)
            out[key] = norms_sq.sqrt()
        self.ids.extend(ids)
        return out

    # -- partial states ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return dict(version=1, rank=self.rank, sizes=(self.k, self.l, self.m), seed=self.seed, keys=self.keys,
                    layouts=self.layouts, swap=self.swap, ids=list(self.ids),
                    y={key: t.cpu() for key, t in self.y.items()}, w={key: t.cpu() for key, t in self.w.items()},
                    tokens=dict(self.tokens),
                    norms_sq={key: (torch.cat(v) if v else torch.zeros(0, dtype=torch.float64))
                              for key, v in self.norms_sq.items()})

    def merge_state(self, state: Mapping) -> None:
        """Add a saved partial state (same sizes, seed and modules) of other examples to this one."""
        mine = (self.rank, (self.k, self.l, self.m), self.seed, list(self.keys))
        theirs = (state["rank"], tuple(state["sizes"]), state["seed"], list(state["keys"]))
        if mine != theirs:
            raise ValueError(f"cannot merge gradient statistics of different settings: {theirs} vs {mine}")
        for key in self.keys:
            self.y[key] += state["y"][key].to(self.device)
            self.w[key] += state["w"][key].to(self.device)
            self.tokens[key] += int(state["tokens"][key])
            self.norms_sq[key].append(state["norms_sq"][key])
        self.ids.extend(state["ids"])

    # -- the exact small step -------------------------------------------------------------------------
    def finalize(self, order=None) -> GradientStats:
        """The rank-``r`` summed gradients and norms; ``order`` (a list of ids) sorts the per-example norms."""
        summed, norms = {}, {}
        for key in self.keys:
            n_sq = torch.cat(self.norms_sq[key]) if self.norms_sq[key] else torch.zeros(0, dtype=torch.float64)
            norms[key] = n_sq.double().clamp_min(0).sqrt()
            summed[key] = self._finalize_key(key, norms[key])
        ids = list(self.ids)
        if order is not None:
            position = {i: j for j, i in enumerate(ids)}
            missing = [i for i in order if i not in position]
            if missing or len(order) != len(ids):
                raise ValueError(f"order does not match the accumulated ids (missing {missing[:5]})")
            index = torch.tensor([position[i] for i in order], dtype=torch.long)
            norms = {key: v[index] for key, v in norms.items()}
            ids = list(order)
        layers = tuple(dict.fromkeys(key[0] for key in self.keys))
        modules = tuple(dict.fromkeys(key[1] for key in self.keys))
        return GradientStats(self.rank, (self.k, self.l, self.m), self.seed, layers, modules, tuple(ids), norms,
                             summed)

    def _finalize_key(self, key, norms: torch.Tensor) -> ModuleStats:
        k, l, m = self.k, self.l, self.m
        y = self.y[key].double().cpu()
        w = self.w[key].double().cpu()
        p, q = y.shape[0], w.shape[1]
        _, left_t = self._test(p, q)
        left_t = left_t.double().cpu()
        y_range, z = y[:, :k], y[:, k:]
        kk = min(k, p)
        q_basis = torch.linalg.qr(y_range).Q[:, :kk]  # p x kk, orthonormal even when Y is rank deficient
        core = torch.linalg.lstsq(left_t.T @ q_basis, w).solution  # kk x q: (Psi Q)^+ W
        u_core, s, vh = torch.linalg.svd(core, full_matrices=False)
        r = min(self.rank, s.shape[0])
        u_s, s, v_s = q_basis @ u_core[:, :r], s[:r], vh[:r].T
        captured_sq = float((core ** 2).sum())
        tail = float(((z - q_basis @ (q_basis.T @ z)) ** 2).sum()) / m if m > 0 else 0.0
        bias = kk / (l - kk - 1) if l > kk + 1 else 0.0
        total_sq = max(captured_sq + (1.0 - bias) * tail if m > 0 else captured_sq, float((s ** 2).sum()), 0.0)
        frobenius = total_sq ** 0.5
        approx = ((1.0 + bias) * tail) ** 0.5 / frobenius if frobenius > 0 else 0.0
        d_in, d_out, layout = self.layouts[key]
        # the sketched matrix is a^T b with (a, b) = (Delta, X) when swapped, else (X, Delta); the weight's
        # layout is X^T Delta for "in_out" and Delta^T X for "out_in".
        sketched_is_x_delta = not self.swap[key]
        weight_is_x_delta = layout == "in_out"
        u, v = (u_s, v_s) if sketched_is_x_delta == weight_is_x_delta else (v_s, u_s)
        shape = (d_in, d_out) if weight_is_x_delta else (d_out, d_in)
        return ModuleStats(layer=key[0], module=key[1], shape=shape, num_examples=int(norms.numel()),
                           num_tokens=self.tokens[key], singular_values=s, u=u, v=v, frobenius=frobenius,
                           residual=tail ** 0.5, approximation_error=approx, sum_of_norms=float(norms.sum()))


def module_shapes(model, layers, modules, adapter=None) -> dict:
    """``{(layer, module): (d_in, d_out, layout)}`` for the adapter's resolved modules."""
    adapter = get_adapter(model, adapter)
    layer_ids = adapter.check_layers(model, layers)
    names = adapter.resolve_modules(modules)
    shapes = {}
    for layer in layer_ids:
        for name in names:
            weight = adapter.weight(model, layer, name)
            if adapter.weight_layout == "in_out":
                d_in, d_out = weight.shape
            else:
                d_out, d_in = weight.shape
            shapes[(layer, name)] = (int(d_in), int(d_out), adapter.weight_layout)
    return shapes


def _record_pairs(records) -> Iterable[tuple]:
    for i, record in enumerate(records):
        if isinstance(record, Mapping):
            missing = [f for f in ("prompt", "target") if f not in record]
            if missing:
                raise ValueError(f"records[{i}] has no {missing[0]!r} field: expected 'prompt' and 'target' "
                                 f"(and an optional 'id'), got keys {sorted(record)}")
            yield record.get("id", i), record["prompt"], record["target"]
        elif isinstance(record, (tuple, list)) and len(record) == 2:
            yield i, record[0], record[1]
        else:
            raise TypeError(f"records[{i}] must be a mapping with 'prompt' and 'target' or a (prompt, target) pair, "
                            f"got {type(record).__name__}")


def gradient_stats(model, tokenizer, records, *, layers=None, modules=("mlp.in", "mlp.out"), rank: int = 8,
                   batch_size: int = 8, sketch_size: int | None = None, cosketch_size: int | None = None,
                   residual_size: int | None = None, seed: int = 0, impl: str = "auto", adapter=None,
                   progress: bool = False) -> GradientStats:
    """Per-example gradient norms and the rank-``rank`` summed gradient of each (layer, module), streaming.

    ``records``: an iterable of mappings with ``prompt`` and ``target`` (and an optional ``id``) or of
    ``(prompt, target)`` pairs; read ``batch_size`` at a time (memory is bounded by the batch). ``impl`` picks
    the fused kernel (see :func:`blens_fast.ops.lowrank.sketch_update`). See the module docstring for the
    sketch, its sizes ``(k, l, m)`` and the accuracy of each number.
    """
    check_positive_int(batch_size, "batch_size")
    shapes = module_shapes(model, layers, modules, adapter)
    acc = StatsAccumulator(shapes, rank=rank, sketch_size=sketch_size, cosketch_size=cosketch_size,
                           residual_size=residual_size, seed=seed, device=model_device(model), impl=impl)
    layer_ids = tuple(dict.fromkeys(key[0] for key in shapes))
    names = tuple(dict.fromkeys(key[1] for key in shapes))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="gradient_stats", unit="ex")
    batch: list[tuple] = []
    seen = 0

    def flush():
        cap = capture(model, tokenizer, [b[1] for b in batch], [b[2] for b in batch], layers=layer_ids,
                      modules=names, adapter=adapter)
        acc.update(cap, [b[0] for b in batch])
        if bar is not None:
            bar.update(len(batch))
        batch.clear()

    for item in _record_pairs(records):
        batch.append(item)
        seen += 1
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if bar is not None:
        bar.close()
    if seen == 0:
        raise ValueError("records is empty: expected at least one record")
    return acc.finalize()
