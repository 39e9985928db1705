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

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ._checks import check_positive_int
from ._io import atomic_save_tensors
from ._ui import plural, progress_bar
from .capture import Capture, capture_examples
from .context import ModelContext, with_context
from .lists import LENS_MODULES
from .ops.lowrank import sketch_update
from .records import batched, id_prompt_target

__all__ = ["GradientStats", "ModuleSketch", "ModuleStats", "StatsAccumulator", "gradient_stats", "sketch_sizes"]


# Mutation testing's core (setup.cfg) in this module is the merge of statistics and their saved state; the
# sketch maths (exercised through gradient_stats' accuracy tests) and the public call are left out.
# pragma: no mutate start
#: rows of a factor or of a weight-sized matrix read at a time (bounds every temporary)
BLOCK_ROWS = 256


def block_rows(n: int) -> int:
    """Rows of an ``n``-row weight-sized matrix read at a time: at most :data:`BLOCK_ROWS` and an eighth of them, so
    that no float32 copy of a block holds more."""
    return max(1, min(BLOCK_ROWS, -(-n // 8)))


def skinny_product(matrix: torch.Tensor, other: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    """``matrix @ other`` (``transpose``: ``matrix.T @ other``) in float32 for a weight-sized ``matrix`` and a narrow
    ``other``: a float32 ``matrix`` read in place, another in blocks of :func:`block_rows` rows (no float32 copy of it
    whole)."""
    rows = block_rows(matrix.shape[0])
    other = other.to(matrix.device)
    if matrix.dtype == torch.float32:  # the narrow factor on the left: BLAS runs such products several times faster
        return (other.T @ (matrix if transpose else matrix.T)).T
    if transpose:
        out = torch.zeros(matrix.shape[1], other.shape[1], dtype=torch.float32, device=matrix.device)
        for first in range(0, matrix.shape[0], rows):
            out.addmm_(matrix[first:first + rows].float().T, other[first:first + rows])
        return out
    return torch.cat([matrix[first:first + rows].float() @ other for first in range(0, matrix.shape[0], rows)])


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

    ``shape`` is ``(d_in, d_out)``, ``u`` (``d_in x r``) and ``v`` (``d_out x r``):
    ``sum_i grad_i ~ u @ diag(singular_values) @ v.T`` in (in, out) terms, whatever the weight's own layout.
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
        """The rank-``r`` approximation as a ``d_in x d_out`` matrix (costs ``d_in * d_out``)."""
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
        """How many examples the statistics were accumulated over."""
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


class ModuleSketch:
    """The streaming state of one (layer, module): sketches ``y`` (``p x (k + m)``) and ``w`` (``l x q``) of the summed
    gradient in the sketch's orientation, its token count and the per-example squared norms."""

    def __init__(self, key, d_in: int, d_out: int, sizes: tuple[int, int, int], device):
        self.key = (int(key[0]), str(key[1]))
        self.d_in, self.d_out = int(d_in), int(d_out)
        k, l, m = sizes
        # The range sketch (k + m columns) goes on the larger side when the co-range sketch is wider.
        self.swap = (d_in < d_out) if l >= k + m else (d_in > d_out)
        p, q = (d_out, d_in) if self.swap else (d_in, d_out)
        self.residual_columns = m
        self.y = torch.zeros(p, k + m, dtype=torch.float32, device=device)
        self.w = torch.zeros(l, q, dtype=torch.float32, device=device)
        self.tokens = 0
        self.norms_sq: list[torch.Tensor] = []

    @property
    def sketch_shape(self) -> tuple[int, int]:
        """``(p, q)``: the sketched matrix's shape (the gradient's ``(d_in, d_out)``, or swapped)."""
        return self.y.shape[0], self.w.shape[1]

    def update(self, xs: list[torch.Tensor], deltas: list[torch.Tensor], test_matrices, impl: str) -> torch.Tensor:
        """Add examples given as per-example factors; returns their ``||grad||_F^2`` (float64, on the CPU)."""
        lengths = [x.shape[0] for x in xs]
        offsets = torch.zeros(len(xs) + 1, dtype=torch.long)
        offsets[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
        x, d = torch.cat(xs).to(self.y.device), torch.cat(deltas).to(self.y.device)
        a, b = (d, x) if self.swap else (x, d)
        right, left_t = test_matrices
        norms_sq = sketch_update(a, b, offsets, right, left_t, self.y, self.w, impl=impl).cpu()
        self.tokens += int(offsets[-1])
        self.norms_sq.append(norms_sq)
        return norms_sq

    def add_rows(self, x: torch.Tensor, delta: torch.Tensor, test_matrices) -> None:
        """Add the summed gradient ``x^T delta`` of token rows (``N x d_in``, ``N x d_out``) with no per-example norm
        (one training step's tokens), :data:`BLOCK_ROWS` rows at a time so that no temporary holds more rows. Plain
        matrix products: without per-example norms (what the fused op is for) BLAS is 1.6-1.8x faster here."""
        right, left_t = test_matrices
        for start in range(0, x.shape[0], BLOCK_ROWS):
            rows = x[start:start + BLOCK_ROWS].to(self.y.device, torch.float32)
            deltas = delta[start:start + BLOCK_ROWS].to(self.y.device, torch.float32)
            a, b = (deltas, rows) if self.swap else (rows, deltas)
            self.y.addmm_(a.T, b @ right)
            self.w.addmm_((a @ left_t).T, b)
            self.tokens += rows.shape[0]


    def sketch_matrix(self, matrix: torch.Tensor, test_matrices, *, probes_only: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sketches ``(y, w)`` of a dense ``d_in x d_out`` matrix (a weight or its ``.grad``, any strides) with
        this module's test matrices, as :meth:`update` would build them (:func:`skinny_product`: a float32 matrix is
        read in place, another in blocks). ``probes_only``: only ``y``'s residual-probe columns (``p x m``) and
        ``w = None``."""
        right, left_t = test_matrices
        k = self.y.shape[1] - self.residual_columns
        oriented = matrix.T if self.swap else matrix  # p x q, a view
        y = skinny_product(oriented, right[:, k:] if probes_only else right).to(self.y.device)
        if probes_only:
            return y, None
        return y, skinny_product(oriented, left_t, transpose=True).T.contiguous().to(self.w.device)

    def clear(self) -> None:
        """Back to the state of no examples."""
        self.y.zero_()
        self.w.zero_()
        self.tokens = 0
        self.norms_sq.clear()

    # pragma: no mutate end
    def merge(self, other: "ModuleSketch") -> None:
        """Add another state of the same module (other examples): sketches are linear, counts and norms add up."""
        if (other.key, other.d_in, other.d_out) != (self.key, self.d_in, self.d_out):
            raise ValueError(f"cannot merge the sketch of {other.key} ({other.d_in} x {other.d_out}) into {self.key} "
                             f"({self.d_in} x {self.d_out})")
        self.y += other.y.to(self.y.device)
        self.w += other.w.to(self.w.device)
        self.tokens += other.tokens
        self.norms_sq.extend(other.norms_sq)

    def all_norms_sq(self) -> torch.Tensor:
        return torch.cat(self.norms_sq) if self.norms_sq else torch.zeros(0, dtype=torch.float64)

    def state(self, prefix: str) -> tuple[dict, dict]:
        """``(tensors, metadata)`` of this state, tensor names under ``prefix``."""
        tensors = {f"{prefix}.y": self.y, f"{prefix}.w": self.w, f"{prefix}.norms_sq": self.all_norms_sq()}
        return tensors, {"key": list(self.key), "d_in": self.d_in, "d_out": self.d_out, "tokens": self.tokens}

    @classmethod
    def from_state(cls, meta: dict, tensors: dict, prefix: str, sizes, device) -> "ModuleSketch":
        sketch = cls(meta["key"], meta["d_in"], meta["d_out"], sizes, device)
        for name in ("y", "w"):
            found = tensors[f"{prefix}.{name}"]
            expected = getattr(sketch, name)
            if tuple(found.shape) != tuple(expected.shape):
                raise ValueError(f"the saved {name} of {sketch.key} has shape {tuple(found.shape)}, expected "
                                 f"{tuple(expected.shape)}")
            expected.copy_(found)
        sketch.tokens = int(meta["tokens"])
        sketch.norms_sq = [tensors[f"{prefix}.norms_sq"].double()]
        return sketch

    # pragma: no mutate start
    def finalize(self, sizes, rank: int, left_t: torch.Tensor, norms: torch.Tensor) -> ModuleStats:
        """The small exact step: the rank-``rank`` approximation and the norm estimates (module docstring)."""
        k, l, m = sizes
        y = self.y.double().cpu()
        w = self.w.double().cpu()
        p = y.shape[0]
        left_t = left_t.double().cpu()
        y_range, z = y[:, :k], y[:, k:]
        kk = min(k, p)
        q_basis = torch.linalg.qr(y_range).Q[:, :kk]  # p x kk, orthonormal even when Y is rank deficient
        core = torch.linalg.lstsq(left_t.T @ q_basis, w).solution  # kk x q: (Psi Q)^+ W
        u_core, s, vh = torch.linalg.svd(core, full_matrices=False)
        r = min(rank, s.shape[0])
        u_s, s, v_s = q_basis @ u_core[:, :r], s[:r], vh[:r].T
        captured_sq = float((core ** 2).sum())
        tail = float(((z - q_basis @ (q_basis.T @ z)) ** 2).sum()) / m if m > 0 else 0.0
        bias = kk / (l - kk - 1) if l > kk + 1 else 0.0
        total_sq = max(captured_sq + (1.0 - bias) * tail if m > 0 else captured_sq, float((s ** 2).sum()), 0.0)
        frobenius = total_sq ** 0.5
        approx = ((1.0 + bias) * tail) ** 0.5 / frobenius if frobenius > 0 else 0.0
        # the sketched matrix is a^T b with (a, b) = (Delta, X) when swapped, else the gradient X^T Delta itself
        u, v = (v_s, u_s) if self.swap else (u_s, v_s)
        return ModuleStats(layer=self.key[0], module=self.key[1], shape=(self.d_in, self.d_out),
                           num_examples=int(norms.numel()), num_tokens=self.tokens, singular_values=s, u=u, v=v,
                           frobenius=frobenius, residual=tail ** 0.5, approximation_error=approx,
                           sum_of_norms=float(norms.sum()))


class StatsAccumulator:
    """Streaming state of :func:`gradient_stats`: one :class:`ModuleSketch` per (layer, module) and the example ids.

    ``update(capture, ids)`` adds one captured batch; ``state()`` / :meth:`from_state` (and ``save`` / ``load``, a
    safetensors file) store and restore it; ``merge`` adds another state of other examples (the sketches are
    linear: partial states of disjoint examples sum to the state of their union); ``finalize()`` does the small
    exact step.
    """

    FORMAT = "blens_fast.stats/2"

    def __init__(self, shapes: Mapping, *, rank: int = 8, sketch_size: int | None = None,
                 cosketch_size: int | None = None, residual_size: int | None = None, seed: int = 0,
                 device="cpu", impl: str = "auto"):
        self.rank = check_positive_int(rank, "rank")
        self.sizes = sketch_sizes(rank, sketch_size, cosketch_size, residual_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = seed
        self.device = torch.device(device)
        self.impl = impl
        self.sketches = {tuple(key): ModuleSketch(key, *shapes[key], self.sizes, self.device) for key in shapes}
        self.ids: list = []
        self._matrices: dict = {}

    @property
    def keys(self) -> list:
        return list(self.sketches)

    def _test(self, p: int, q: int):
        """The test matrices of a ``p x q`` sketched matrix (shared by modules of that shape)."""
        if (p, q) not in self._matrices:
            self._matrices[(p, q)] = _test_matrices(p, q, *self.sizes, self.seed, self.device)
        return self._matrices[(p, q)]

    def nbytes(self) -> int:
        """Bytes held: accumulators plus (shared) test matrices, whether built yet or not."""
        k, l, m = self.sizes
        total = sum(t.numel() * t.element_size() for s in self.sketches.values() for t in (s.y, s.w))
        shapes = {s.sketch_shape for s in self.sketches.values()}
        return total + sum(4 * (q * (k + m) + p * l) for p, q in shapes)

    # -- streaming ----------------------------------------------------------------------------------
    def update_factors(self, key, xs: list[torch.Tensor], deltas: list[torch.Tensor]) -> torch.Tensor:
        """Add examples given as per-example factors of one (layer, module); returns their ``||grad||_F^2``."""
        if key not in self.sketches:
            raise ValueError(f"{key} is not accumulated here: expected one of {self.keys}")
        sketch = self.sketches[key]
        return sketch.update(xs, deltas, self._test(*sketch.sketch_shape), self.impl)

    def add_rows(self, key, x: torch.Tensor, delta: torch.Tensor) -> None:
        """Add the summed gradient ``x^T delta`` of token rows of one (layer, module), with no per-example norm."""
        sketch = self.sketches[key]
        sketch.add_rows(x, delta, self._test(*sketch.sketch_shape))

    def sketch_matrix(self, key, matrix: torch.Tensor, *, probes_only: bool = False):
        """:meth:`ModuleSketch.sketch_matrix` of a dense ``d_in x d_out`` matrix with the test matrices of ``key``."""
        sketch = self.sketches[key]
        return sketch.sketch_matrix(matrix, self._test(*sketch.sketch_shape), probes_only=probes_only)

    def reset(self) -> None:
        """Empty every sketch (the test matrices stay): the state of no examples."""
        for sketch in self.sketches.values():
            sketch.clear()
        self.ids.clear()

    def update(self, cap: Capture, ids=None) -> dict:
        """Add every example of a capture; ``ids`` name them (default: running indices). Returns the per-key
        ``||grad_i||_F`` (float64) of this batch."""
        ids = list(range(len(self.ids), len(self.ids) + cap.num_examples)) if ids is None else list(ids)
        if len(ids) != cap.num_examples:
            raise ValueError(f"got {plural(len(ids), 'id')} for {plural(cap.num_examples, 'captured example')}")
        missing = [key for key in self.sketches if key not in cap.x]
        if missing:
            raise ValueError(f"the capture has no {missing[0]}: it holds {sorted(cap.x)}")
        out = {key: self.update_factors(key, cap.x[key], cap.delta[key]).sqrt() for key in self.sketches}
        self.ids.extend(ids)
        return out

    # -- partial states ------------------------------------------------------------------------------
    def _settings(self) -> dict:
        return {"rank": self.rank, "sizes": list(self.sizes), "seed": self.seed}

    # pragma: no mutate end
    def state(self) -> tuple[dict, dict]:
        """``(tensors, metadata)``: every sketch's tensors and a JSON-able description (settings, ids, modules)."""
        tensors, modules = {}, []
        for i, sketch in enumerate(self.sketches.values()):
            part, meta = sketch.state(f"m{i}")
            tensors.update(part)
            modules.append(meta)
        return tensors, {"format": self.FORMAT, **self._settings(), "ids": list(self.ids), "modules": modules}

    @classmethod
    def from_state(cls, tensors: Mapping, metadata: Mapping, *, device="cpu", impl: str = "auto"
                   ) -> "StatsAccumulator":
        """The accumulator a :meth:`state` describes."""
        if metadata.get("format") != cls.FORMAT:
            raise ValueError(f"not a blens_fast statistics state (format {metadata.get('format')!r}, expected "
                             f"{cls.FORMAT!r})")
        k, l, m = metadata["sizes"]
        modules = metadata["modules"]
        acc = cls({tuple(meta["key"]): (meta["d_in"], meta["d_out"]) for meta in modules},
                  rank=metadata["rank"], sketch_size=k, cosketch_size=l, residual_size=m, seed=metadata["seed"],
                  device=device, impl=impl)
        for i, meta in enumerate(modules):
            acc.sketches[tuple(meta["key"])] = ModuleSketch.from_state(meta, tensors, f"m{i}", acc.sizes, acc.device)
        acc.ids = list(metadata["ids"])
        return acc

    def save(self, path) -> Path:
        """Write the state as a safetensors file (tensors; settings and ids as JSON metadata)."""
        tensors, metadata = self.state()
        return atomic_save_tensors(path, tensors, {"state": json.dumps(metadata)})

    @classmethod
    def load(cls, path, *, device="cpu", impl: str = "auto") -> "StatsAccumulator":
        """A state written by :meth:`save`; a ``ValueError`` naming the file when it is damaged or foreign."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = json.loads((f.metadata() or {}).get("state", "null"))
            tensors = load_file(str(path))
            if not isinstance(metadata, dict):
                raise ValueError("no statistics metadata")
            return cls.from_state(tensors, metadata, device=device, impl=impl)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{str(path)!r} is not a readable blens_fast statistics state ({error})") from None

    def merge(self, other: "StatsAccumulator") -> None:
        """Add another accumulator's state (same settings and modules, other examples) to this one."""
        mine, theirs = (self._settings(), self.keys), (other._settings(), other.keys)
        if mine != theirs:
            raise ValueError(f"cannot merge gradient statistics of different settings: {theirs} vs {mine}")
        for key, sketch in self.sketches.items():
            sketch.merge(other.sketches[key])
        self.ids.extend(other.ids)

    # -- the exact small step -------------------------------------------------------------------------
    # pragma: no mutate start
    def finalize_module(self, key) -> ModuleStats:
        """The small exact step of one (layer, module) (:meth:`finalize` does every one)."""
        sketch = self.sketches[key]
        norms = sketch.all_norms_sq().double().clamp_min(0).sqrt()
        return sketch.finalize(self.sizes, self.rank, self._test(*sketch.sketch_shape)[1], norms)

    def finalize(self, order=None) -> GradientStats:
        """The rank-``r`` summed gradients and norms; ``order`` (a list of ids) sorts the per-example norms."""
        norms = {key: s.all_norms_sq().double().clamp_min(0).sqrt() for key, s in self.sketches.items()}
        summed = {key: self.finalize_module(key) for key in self.sketches}
        ids = list(self.ids)
        if order is not None:
            position = {i: j for j, i in enumerate(ids)}
            missing = [i for i in order if i not in position]
            if missing or len(order) != len(ids):
                raise ValueError(f"order does not match the accumulated ids (missing {missing[:5]})")
            index = torch.tensor([position[i] for i in order], dtype=torch.long)
            norms = {key: v[index] for key, v in norms.items()}
            ids = list(order)
        layers = tuple(dict.fromkeys(key[0] for key in self.sketches))
        modules = tuple(dict.fromkeys(key[1] for key in self.sketches))
        return GradientStats(self.rank, self.sizes, self.seed, layers, modules, tuple(ids), norms, summed)


def module_shapes(ctx: ModelContext, layers, modules) -> dict:
    """``{(layer, module): (d_in, d_out)}`` for the context's validated layers and checked public modules."""
    return {(layer, name): ctx.gradient_shape(layer, name) for layer in ctx.check_layers(layers)
            for name in ctx.check_modules(modules)}


@with_context
def gradient_stats(ctx: ModelContext, records, *, layers=None, modules=LENS_MODULES, rank: int = 8,
                   batch_size: int = 8, sketch_size: int | None = None, cosketch_size: int | None = None,
                   residual_size: int | None = None, seed: int = 0, impl: str = "auto", progress: bool = True,
                   prompt_field: str = "prompt", target_field: str = "target", id_field: str = "id") -> GradientStats:
    """Per-example gradient norms and the rank-``rank`` summed gradient of each (layer, module), streaming.

    Called as ``gradient_stats(model, tokenizer, records)`` or ``gradient_stats(ctx, records)``. ``records``: an
    iterable of mappings with the prompt, target and optional id fields (as :func:`blens_fast.counterfact.load`
    gives them) or of ``(prompt, target)`` pairs; read ``batch_size`` at a time (memory is bounded by the batch).
    ``impl`` picks the fused kernel (:func:`blens_fast.ops.lowrank.sketch_update`). See the module docstring for the
    sketch, its sizes ``(k, l, m)`` and the accuracy of each number.
    """
    check_positive_int(batch_size, "batch_size")
    shapes = module_shapes(ctx, layers, modules)
    acc = StatsAccumulator(shapes, rank=rank, sketch_size=sketch_size, cosketch_size=cosketch_size,
                           residual_size=residual_size, seed=seed, device=ctx.device, impl=impl)
    layer_ids = tuple(dict.fromkeys(key[0] for key in shapes))
    names = tuple(dict.fromkeys(key[1] for key in shapes))
    facts = id_prompt_target(records, prompt_field=prompt_field, target_field=target_field, id_field=id_field)
    seen = 0
    with progress_bar(desc="gradient_stats", unit="rec", enabled=progress) as bar:
        for batch in batched(facts, batch_size):
            examples = ctx.tokenize([b[1] for b in batch], [b[2] for b in batch])
            acc.update(capture_examples(ctx, examples, layer_ids, names), [b[0] for b in batch])
            seen += len(batch)
            bar.update(len(batch))
    if seen == 0:
        raise ValueError("records is empty: expected at least one record")
    return acc.finalize()
# pragma: no mutate end
