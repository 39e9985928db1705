"""The Backward Lens two ways on the same prompts, checked against each other and measured.

**Naive** (:func:`blens_fast.lens_reference.reference_lens`, one prompt at a time: each prompt needs its own dense
gradient, so its own backward) and **blens_fast** (in batches: :func:`~blens_fast.capture.capture_examples` keeps X
and Delta only, :meth:`~blens_fast.lowrank.LowRankGradient.svdvals` gives every gradient's rank and norm from its
factors, and :func:`~blens_fast.lens.lens_lists` projects each factor in one fused pass: top-k, bottom-k and the
target's rank together). Both give, per prompt, the gradient ranks and norms of FF1's input projection and ``mlp.out``
at every layer, and per layer and position the lists ``ff1_top``, ``ff2_bottom`` and ``ff2_top``. :func:`run_bench`
checks that they agree (:func:`compare`, :func:`same_vectors`) and measures time and peak memory per stage
(:mod:`blens_fast.bench.meter`).
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._checks import DTYPE_NAMES, check_device, check_dtype, check_positive_int
from .._io import atomic_write_json, make_folder, remove_inside
from .._report import machine_info
from .._ui import plural, progress_bar
from ..batching import Example, token_batches
from ..capture import capture_examples
from ..context import BUILTIN_MODELS, ModelContext, bind, load_model, model_source
from ..lens import factor_lists, lens_lists
from ..lens_reference import RankRule, ReferenceLens, TokenList, reference_lens
from ..lists import LENS_MODULES, LIST_NAMES, by_factor
from ..lowrank import LowRankGradient
from ..ops.topk import TOPK
from ..records import load_counterfact
from .meter import STAGES, Meter, OutOfMemory, memory_method

WAYS = ("naive", "blens_fast")
#: GPT-J blocks built by default on the CPU (the full 28 do not fit a CPU run of minutes)
CPU_GPTJ_DEPTH = 2


# -- models and prompts -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A randomly initialised model at real dimensions: ``arch`` (``gpt2``, ``gptj`` or ``llama``), full ``depth``
    (blocks), width ``d``, attention ``heads``, vocabulary, positions; GPT-J's ``rotary_dim``, Llama's ``d_ff``."""

    arch: str
    depth: int
    d: int
    heads: int
    vocab: int
    positions: int
    about: str
    rotary_dim: int | None = None
    d_ff: int | None = None

    def config(self, depth: int):
        import transformers

        if self.arch == "gpt2":
            return transformers.GPT2Config(n_layer=depth, n_embd=self.d, n_head=self.heads, vocab_size=self.vocab,
                                           n_positions=self.positions)
        if self.arch == "gptj":
            return transformers.GPTJConfig(n_layer=depth, n_embd=self.d, n_head=self.heads, vocab_size=self.vocab,
                                           n_positions=self.positions, rotary_dim=self.rotary_dim)
        return transformers.LlamaConfig(num_hidden_layers=depth, hidden_size=self.d, num_attention_heads=self.heads,
                                        intermediate_size=self.d_ff, vocab_size=self.vocab,
                                        max_position_embeddings=self.positions)


MODEL_SPECS = {
    "gpt2-small": ModelSpec("gpt2", 12, 768, 12, 50257, 1024,
                            "GPT-2 small dimensions (d=768, 4d=3072, V=50,257), random initialisation"),
    "gpt-j": ModelSpec("gptj", 28, 4096, 16, 50400, 2048,
                       "GPT-J dimensions (d=4096, 4d=16384, V=50,400), random initialisation", rotary_dim=64),
    "tiny": ModelSpec("gpt2", 2, 64, 4, 50257, 128, "a tiny GPT-2 (d=64), random initialisation: for tests"),
    "tiny-gptj": ModelSpec("gptj", 2, 64, 4, 50400, 128,
                           "a tiny GPT-J (d=64, with an unembedding bias), random initialisation: for tests",
                           rotary_dim=8),
    "tiny-llama": ModelSpec("llama", 2, 64, 4, 50257, 128,
                            "a tiny Llama (d=64, gated MLP, RMSNorm), random initialisation: for tests", d_ff=172),
}


@dataclass(frozen=True)
class ModelInfo:
    """What was benchmarked: ``name`` (for file names), the ``spec`` asked for, a sentence ``about`` it, the layers
    analysed (``depth``) of ``full_depth``, and whether its weights are a random initialisation."""

    name: str
    spec: str
    about: str
    depth: int
    full_depth: int
    random_init: bool


def build_model(spec: str, *, depth: int | None = None, device="cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0) -> tuple[ModelContext, ModelInfo]:
    """A random-init model of ``MODEL_SPECS[spec]`` with ``depth`` blocks (default: full depth, but
    :data:`CPU_GPTJ_DEPTH` for GPT-J on the CPU), or a loaded model (``"default"`` or a folder) of which the first
    ``depth`` layers are analysed (default: all). A folder named like a random model wins over it
    (:func:`~blens_fast.context.model_source`)."""
    device = torch.device(device)
    source = model_source(spec, (*BUILTIN_MODELS, *MODEL_SPECS))
    if source in MODEL_SPECS:
        s = MODEL_SPECS[spec]
        if depth is None:
            depth = CPU_GPTJ_DEPTH if spec == "gpt-j" and device.type == "cpu" else s.depth
        check_positive_int(depth, "depth")
        import transformers

        from ..default_model import load_default_tokenizer

        torch.manual_seed(seed)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(s.config(depth), dtype=dtype)
        ctx = bind(model.eval(), load_default_tokenizer())
        about = s.about + (f"; {depth} of {s.depth} layers" if depth != s.depth
                           else f"; all {plural(s.depth, 'layer')}")
        name = spec if depth == s.depth else f"{spec}-{depth}layers"
        return ctx, ModelInfo(name, spec, about, depth, s.depth, True)
    ctx = load_model(source, device=device, dtype=dtype)
    full = ctx.num_layers
    used = full if depth is None else check_positive_int(depth, "depth", upper=full)
    shipped = source == "default"
    name = "default" if shipped else Path(source).resolve().name
    about = f"{'the shipped default model' if shipped else spec} (trained weights); " + (
        f"layers 0..{used - 1} of {full} analysed" if used != full else f"all {plural(full, 'layer')} analysed")
    return ctx, ModelInfo(name if used == full else f"{name}-{used}layers", spec, about, used, full, False)


def make_prompts(tokenizer, n: int, tokens: int | None = None, *, offset: int = 0) -> tuple[list[str], list[str]]:
    """``n`` CounterFact prompts and their true objects (records ``offset..``, wrapping around).

    ``tokens=None`` keeps them as they are (CounterFact length: about 8 positions); otherwise each prompt is made
    ``tokens`` positions long (prompt + object - 1) by continuing it with the following records' prompts or cutting
    it, on token boundaries.
    """
    check_positive_int(n, "prompts")
    records = load_counterfact()
    prompts, targets = [], []
    for i in range(n):
        record = records[(offset + i) % len(records)]
        target = " " + record["target"]
        prompt = record["prompt"]
        if tokens is not None:
            check_positive_int(tokens, "tokens")
            want = tokens - (len(tokenizer(target, add_special_tokens=False)["input_ids"]) - 1)
            if want < 1:
                raise ValueError(f"tokens={tokens} is shorter than the target {target!r}")
            ids = list(tokenizer(prompt)["input_ids"])
            j = 1
            while len(ids) < want:
                ids += tokenizer(" " + records[(offset + i + j) % len(records)]["prompt"])["input_ids"]
                j += 1
            prompt = _fit(tokenizer, ids[:want], want)
        prompts.append(prompt)
        targets.append(target)
    return prompts, targets


def _fit(tokenizer, ids, want):
    """Decoded text that re-tokenizes to exactly ``want`` tokens (BPE merges can change the count)."""
    text = tokenizer.decode(ids)
    for _ in range(8):
        got = len(tokenizer(text)["input_ids"])
        if got == want:
            return text
        if got > want:
            ids = ids[:-1]
        else:
            ids = ids + tokenizer(" the")["input_ids"]
        text = tokenizer.decode(ids)
    return text


# -- the configuration ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    """One ``blens bench`` run (the command's options; see :func:`run_bench`). ``dtype`` takes a name or a
    ``torch.dtype`` and keeps the name."""

    model: str = "default"
    depth: int | None = None
    prompts: tuple[int, ...] = (100,)
    tokens: tuple[int | None, ...] = (None,)
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 8
    max_tokens: int | None = None
    naive_prompts: int | None = None
    memory_prompts: int | None = None
    k: int = 10
    unit_norm: bool = False
    impl: str = "auto"
    threads: int | None = None
    seed: int = 0
    agreement: float = 0.99
    naive_single_pass: bool = False
    progress: bool = True
    out: str | None = None

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model={self.model!r}: expected one of {', '.join(MODEL_SPECS)}, 'default' or a folder")
        dtype = check_dtype(self.dtype)
        object.__setattr__(self, "dtype", next(name for name, value in DTYPE_NAMES.items() if value == dtype))
        object.__setattr__(self, "device", str(self.device))
        object.__setattr__(self, "prompts", tuple(check_positive_int(n, "prompts") for n in _values(self.prompts)))
        object.__setattr__(self, "tokens", tuple(t if t is None else check_positive_int(t, "tokens")
                                                 for t in _values(self.tokens)))
        if not self.prompts or not self.tokens:
            raise ValueError(f"prompts={self.prompts} and tokens={self.tokens}: expected at least one value each")
        for name in ("depth", "max_tokens", "naive_prompts", "memory_prompts", "threads"):
            if getattr(self, name) is not None:
                check_positive_int(getattr(self, name), name)
        check_positive_int(self.batch_size, "batch_size")
        check_positive_int(self.k, "k")
        if not 0 < self.agreement <= 1:
            raise ValueError(f"agreement={self.agreement}: expected a fraction in (0, 1]")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPE_NAMES[self.dtype]


def _values(value) -> tuple:
    """One value or a sequence of them, as a tuple (a sweep)."""
    return (value,) if value is None or isinstance(value, int) else tuple(value)


# -- the two ways ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WayResult:
    """What one way found for the prompts it ran: per prompt, layer and module (FF1, ``mlp.out``) the gradient's
    ``ranks`` (:class:`~blens_fast.lens_reference.RankRule`) and ``norms``; per list, every row; blens_fast's
    ``ranks_without_floor`` (``matrix_rank``'s rule alone, what its exact factors resolve); the naive way's
    ``first`` prompt (its vectors, for :func:`same_vectors`)."""

    ranks: torch.Tensor
    norms: torch.Tensor
    lists: dict[str, TokenList] = field(repr=False)
    ranks_without_floor: torch.Tensor | None = None
    first: ReferenceLens | None = field(default=None, repr=False)


def naive_way(ctx: ModelContext, examples: list[Example], layers, *, config: BenchConfig, meter: Meter,
              desc: str = "naive") -> WayResult:
    """The Backward Lens as one writes it with plain PyTorch (:func:`~blens_fast.lens_reference.reference_lens`),
    prompt by prompt."""
    ranks, norms, lists, first = [], [], {name: [] for name in LIST_NAMES}, None
    for example in progress_bar(examples, desc=desc, unit="prompt", enabled=config.progress):
        found = reference_lens(ctx, example.prompt, example.target, layers=layers, k=config.k,
                               unit_norm=config.unit_norm, stage=meter.stage)
        ranks.append(found.ranks)
        norms.append(found.norms)
        for name in LIST_NAMES:
            lists[name].append(found.lists[name])
        if first is None:
            first = found
        del found  # the next prompt's backward should not run beside this one's vectors
    return WayResult(torch.stack(ranks), torch.stack(norms), {n: TokenList.cat(p) for n, p in lists.items()},
                     first=first)


def fast_way(ctx: ModelContext, examples: list[Example], layers, *, config: BenchConfig, meter: Meter,
             desc: str = "blens_fast") -> WayResult:
    """The Backward Lens with the library's calls: consecutive captures of at most ``config.batch_size`` prompts and
    ``config.max_tokens`` padded positions (memory flat in N)."""
    ranks, plain, norms, lists = [], [], [], {name: [] for name in LIST_NAMES}
    batches = token_batches([e.num_tokens for e in examples], config.batch_size, config.max_tokens)
    for batch in progress_bar(batches, desc=desc, unit="batch", enabled=config.progress):
        with meter.stage("gradients"):
            cap = capture_examples(ctx, [examples[i] for i in batch], layers, LENS_MODULES)
        with meter.stage("rank"):
            found = [_ranks_and_norms(cap.gradients(module)) for module in LENS_MODULES]
        with meter.stage("projection"):
            projected = lens_lists(ctx, cap, k=config.k, unit_norm=config.unit_norm, impl=config.impl)
        for parts, values in zip((ranks, plain, norms), zip(*found)):
            parts.append(torch.stack(values, -1).transpose(0, 1))  # (layers, examples, module) -> (examples, ...)
        for name in LIST_NAMES:
            indices, logits, _, target_ranks, degenerate = projected[name]
            lists[name].append(TokenList(indices, logits, target_ranks, None, degenerate))
        del cap
    return WayResult(torch.cat(ranks), torch.cat(norms), {n: TokenList.cat(p) for n, p in lists.items()},
                     ranks_without_floor=torch.cat(plain))


def _ranks_and_norms(grads: LowRankGradient) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ranks by :class:`~blens_fast.lens_reference.RankRule`, by ``matrix_rank``'s rule alone, and Frobenius norms of
    a batch of gradients, from one batched SVD of their factors."""
    s = grads.svdvals().cpu()
    rule = RankRule.for_gradient(grads.x.dtype, grads.shape)
    return rule.count(s), RankRule(rule.rtol, 0.0).count(s), s.square().sum(-1).sqrt()


# -- agreement ---------------------------------------------------------------------------------------------------
def compare(naive: WayResult, fast: WayResult) -> dict:
    """Agreement of blens_fast with the naive way on the prompts the naive way ran (fractions; 1.0 = identical)."""
    n = naive.ranks.shape[0]
    norm_n, norm_f = naive.norms, fast.norms[:n]
    return {"prompts_compared": n,
            "gradient_rank_equal": float((naive.ranks == fast.ranks[:n]).double().mean()),
            "gradient_norm_max_rel_err": float(((norm_n - norm_f).abs() / norm_f.abs().clamp_min(1e-300)).max()),
            **compare_lists(naive.lists, fast.lists)}


def compare_lists(reference: dict[str, TokenList], other: dict[str, TokenList], prefix: str = "") -> dict:
    """Token lists and target ranks of ``other`` against ``reference`` (which has ``target_slack``) over the rows
    both have.

    A row whose reference list holds exactly equal values (a zero vector, say) has no defined order among the tied
    tokens: there the two agree when their values do. Target ranks are "equal" when they differ by at most the
    reference's slack, "exactly equal" when they do not differ.
    """
    exact, tied, errors, same_rank, within = [], [], [], [], []
    rows = 0
    for name in LIST_NAMES:
        a, b = reference[name], other[name]
        rows = min(len(a.indices), len(b.indices))
        a, b = a.head(rows), b.head(rows)
        has_tie = (a.values[:, 1:] == a.values[:, :-1]).any(-1)
        same_values = torch.isclose(a.values, b.values, rtol=1e-4,
                                    atol=1e-6 * float(a.values.abs().max().clamp_min(1e-30))).all(-1)
        exact.append(((a.indices == b.indices).all(-1) | (has_tie & same_values)).double())
        tied.append(has_tie)
        errors.append((a.values - b.values).abs().amax(-1) / a.values.abs().amax(-1).clamp_min(1e-30))
        gap = (a.target_rank - b.target_rank).abs()
        same_rank.append((gap == 0).double())
        within.append((gap <= a.target_slack).double())
    return {f"{prefix}rows_compared": rows * len(LIST_NAMES),
            f"{prefix}rows_with_exact_ties": int(torch.cat(tied).sum()),
            f"{prefix}topk_tokens_equal": float(torch.cat(exact).mean()),
            f"{prefix}topk_values_max_rel_err": float(torch.cat(errors).max()),
            f"{prefix}target_rank_exactly_equal": float(torch.cat(same_rank).mean()),
            f"{prefix}target_rank_equal": float(torch.cat(within).mean())}


def same_vectors(ctx: ModelContext, first: ReferenceLens, config: BenchConfig) -> dict[str, TokenList]:
    """The fused lists of the naive way's own vectors (its first prompt): the kernels alone, without the capture's
    numerics (in 16-bit dtypes a padded batch and a single prompt round activations differently, and over many
    layers that alone can reorder near-tied tokens)."""
    fused = {}
    for (_, factor), names in by_factor().items():
        vectors = getattr(first.backward, factor)
        rows = vectors.reshape(-1, vectors.shape[-1])
        targets = torch.full((rows.shape[0],), first.target_id, dtype=torch.long, device=rows.device)
        for name, (chosen, ranks, flat) in factor_lists(ctx, rows, targets, names, k=config.k,
                                                        unit_norm=config.unit_norm, impl=config.impl).items():
            fused[name] = TokenList(chosen.indices.cpu(), chosen.values.cpu(), ranks.cpu(), None, flat.cpu())
    return fused


def decides_agreement(key: str, dtype: str) -> bool:
    """Which agreement fields decide: in float32 (and float64) every ``*_equal`` fraction (the exact target ranks are
    only reported); in 16-bit dtypes the gradient ranks and the lists of the same vectors (16-bit activations of a
    padded batch and of a single prompt differ, which moves near-tied tokens end to end: those lists are reported)."""
    if not key.endswith("_equal") or key.endswith("_exactly_equal"):
        return False
    return dtype in ("float32", "float64") or key.startswith(("gradient_", "same_vectors_"))


def rank_records(ctx: ModelContext, layers, naive: WayResult, fast: WayResult,
                 fused: dict[str, TokenList]) -> dict:
    """Every compared gradient's rank by both ways and every row's target rank, as JSON lists: why they agree or
    not."""
    n = naive.ranks.shape[0]
    rows = {name: {"naive": naive.lists[name].target_rank.tolist(),
                   "naive_slack": naive.lists[name].target_slack.tolist(),
                   "blens_fast": fast.lists[name].target_rank[:len(naive.lists[name].target_rank)].tolist(),
                   "same_vectors": fused[name].target_rank.tolist(),
                   "degenerate": naive.lists[name].degenerate.tolist()} for name in LIST_NAMES}
    rules = {module: RankRule.for_gradient(ctx.dtype, ctx.gradient_shape(layers[0], module))
             for module in LENS_MODULES}
    return {"layers": list(layers), "modules": list(LENS_MODULES),
            "gradient_rank_rule": {"counted": "singular values above max(rtol x sigma_max, floor x ||G||_F)",
                                   **{module: asdict(rule) for module, rule in rules.items()}},
            "gradient_ranks": {"index": "[prompt][layer][module]", "naive": naive.ranks.tolist(),
                               "blens_fast": fast.ranks[:n].tolist(),
                               "blens_fast_without_floor": fast.ranks_without_floor[:n].tolist()},
            "target_ranks": {"index": "row: prompt, layer, position (same_vectors: the first prompt's rows)",
                             **rows}}


# -- the benchmark -----------------------------------------------------------------------------------------------
def run_bench(config: BenchConfig, *, log=print) -> dict:
    """Run both ways at every (N, T) of the sweep, check agreement, measure; write files when ``config.out``.

    The main comparison is at the largest N and the first T; at other sweep points only blens_fast runs (for the
    scaling plots). The naive way runs on the first ``naive_prompts`` prompts (default: all); its time for N prompts
    is then its measured per-prompt time times N (it is a loop over prompts), marked ``extrapolated``. On the CPU the
    memory pass covers the ``memory_prompts`` longest prompts (default: all).
    """
    device = check_device(config.device)
    impl_used = TOPK.resolve(config.impl, device, k=config.k).name
    if config.out:
        make_folder(config.out)
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run_bench(config, device, impl_used, log)
    finally:
        torch.set_num_threads(threads)


def _run_bench(config: BenchConfig, device: torch.device, impl_used: str, log) -> dict:
    from .report import partial_path, write_report

    started = time.time()
    ctx, info = build_model(config.model, depth=config.depth, device=device, dtype=config.torch_dtype,
                            seed=config.seed)
    layers = tuple(range(info.depth))
    weight_bytes = sum(t.numel() * t.element_size() for t in list(ctx.model.parameters()) + list(ctx.model.buffers()))
    log(f"blens bench: {info.about}; {config.dtype} on {device}; weights {weight_bytes / 2**20:.1f} MiB")

    n_main, t_main = max(config.prompts), config.tokens[0]
    points = [(n, t_main) for n in sorted(set(config.prompts))] + [(n_main, t) for t in config.tokens[1:]]
    _warm_up(ctx, layers[:1], config, device, t_main)
    runs = []
    for n, t in points:
        main = (n, t) == (n_main, t_main)
        examples = ctx.tokenize(*make_prompts(ctx.tokenizer, n, t))
        run = dict(prompts=n, tokens=t, main=main, positions_mean=sum(e.num_tokens for e in examples) / n,
                   positions_max=max(e.num_tokens for e in examples), ways={})
        results = {}
        for way in WAYS if main else ("blens_fast",):
            run["ways"][way], results[way] = _measure_way(way, ctx, examples, layers, config, device, weight_bytes)
            log(_way_line(way, n, t, run["ways"][way]))
        if main and results["naive"] is not None:
            fused = same_vectors(ctx, results["naive"].first, config)
            run["agreement"] = {**compare(results["naive"], results["blens_fast"]),
                                **compare_lists({name: results["naive"].first.lists[name] for name in LIST_NAMES},
                                                fused, prefix="same_vectors_")}
            run["agree"] = all(v >= config.agreement for key, v in run["agreement"].items()
                               if decides_agreement(key, config.dtype))
            run["ranks"] = rank_records(ctx, layers, results["naive"], results["blens_fast"], fused)
            log("agreement: " + ", ".join(f"{key}={v:.4g}" for key, v in run["agreement"].items()))
        if main:
            run["ratios"] = _ratios(run["ways"]["naive"], run["ways"]["blens_fast"])
        runs.append(run)
        if config.out:  # what is done so far survives a run cut short (a timeout, an out-of-memory kill)
            atomic_write_json(partial_path(config.out, device, info.name),
                              dict(model=asdict(info), dtype=config.dtype, runs=runs))

    machine = machine_info(device)
    report = dict(
        config=asdict(config), model=asdict(info), weights_bytes=weight_bytes, dtype=config.dtype,
        device=device.type, machine=machine["machine"], torch=torch.__version__, threads=machine["threads"],
        created=time.strftime("%Y-%m-%d %H:%M:%S %Z"), runs=runs, memory_method=memory_method(device),
        naive_method=("per prompt (blens_fast.lens_reference): loss.backward() with parameter gradients; "
                      "torch.linalg.matrix_norm and matrix_rank (RankRule) of each MLP weight's dense .grad (16-bit "
                      "gradients cast to float32); lm_head(final_norm(vectors)) full logits (float32 GEMM), "
                      "torch.topk, the target's rank from the full logits"),
        fast_method=(f"batches of {plural(config.batch_size, 'prompt')}"
                     + (f" and at most {config.max_tokens} padded positions" if config.max_tokens else "")
                     + ": blens_fast.capture_examples (FF1's input projection, mlp.out), LowRankGradient.svdvals: "
                       "one batched SVD of the factors per module over layers and examples (RankRule), "
                     f"blens_fast.lens.lens_lists(impl={config.impl!r} -> {impl_used!r}): one pass per factor"),
        wall_seconds=time.time() - started, load_average=machine["load_average"],
    )
    if config.out:
        report["files"] = {kind: str(path) for kind, path in write_report(report, config.out).items()}
        remove_inside(config.out, partial_path(config.out, device, info.name))
    return report


def _warm_up(ctx: ModelContext, layers, config: BenchConfig, device: torch.device, tokens) -> None:
    """Both ways once on one prompt and one layer, untimed (lazy initialisation, kernel compilation; on the CPU the
    naive way needs none)."""
    warm = ctx.tokenize(*make_prompts(ctx.tokenizer, 1, tokens))
    scratch = Meter(device, "time")
    quiet = BenchConfig(**{**asdict(config), "progress": False, "batch_size": 1})
    try:
        if device.type == "cuda":
            naive_way(ctx, warm, layers, config=quiet, meter=scratch)
    except OutOfMemory:
        _cleanup(ctx)
    fast_way(ctx, warm, layers, config=quiet, meter=scratch)
    _cleanup(ctx)


def _measure_way(way: str, ctx: ModelContext, examples: list[Example], layers, config: BenchConfig,
                 device: torch.device, weight_bytes: int) -> tuple[dict, WayResult | None]:
    """One way's time (and memory) record and its results; on the CPU memory comes from a second, profiled pass
    (or, with ``naive_single_pass``, the naive way's only pass)."""
    n = len(examples)
    subset = examples
    if way == "naive" and config.naive_prompts is not None:
        subset = examples[:min(n, config.naive_prompts)]
    run = naive_way if way == "naive" else fast_way

    record = dict(prompts_run=len(subset), extrapolated=len(subset) < n, error=None)
    single = way == "naive" and config.naive_single_pass and device.type == "cpu"
    record["time_from_profiled_pass"] = single
    meter = Meter(device, "memory" if single else "time")
    try:
        with meter.session():
            result = run(ctx, subset, layers, config=config, meter=meter, desc=f"{way} (time)")
    except OutOfMemory as error:
        record.update(error=str(error), oom=True)
        _cleanup(ctx)
        return record, None
    scale = n / len(subset)
    record["seconds"] = {s: meter.seconds[s] * scale for s in STAGES}
    record["seconds"]["end_to_end"] = meter.total_seconds * scale
    record["seconds_measured"] = meter.total_seconds
    if device.type == "cuda" or single:
        peaks, rss = meter.peak, meter.rss_peak
        record["memory_prompts"] = len(subset)
        record["seconds_profiled_pass"] = meter.total_seconds if single else None
    else:
        mem_subset = subset
        if config.memory_prompts is not None and config.memory_prompts < len(subset):
            longest = sorted(range(len(subset)), key=lambda i: -subset[i].num_tokens)[:config.memory_prompts]
            mem_subset = [subset[i] for i in sorted(longest)]
        memory = Meter(device, "memory")
        with memory.session():
            run(ctx, mem_subset, layers, config=config, meter=memory, desc=f"{way} (memory)")
        peaks, rss = memory.peak, memory.rss_peak
        record["memory_prompts"] = len(mem_subset)
        record["seconds_profiled_pass"] = memory.total_seconds
    record["peak_bytes_beyond_weights"] = {s: int(peaks[s]) for s in STAGES}
    record["peak_bytes_beyond_weights"]["end_to_end"] = int(max(peaks.values()))
    record["peak_bytes_total"] = {s: v + weight_bytes for s, v in record["peak_bytes_beyond_weights"].items()}
    record["rss_peak_beyond_start_bytes"] = rss
    return record, result


def _cleanup(ctx: ModelContext) -> None:
    ctx.model.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _ratios(naive: dict, fast: dict) -> dict:
    """naive / blens_fast for time and memory (beyond weights and total), per stage and end to end."""
    if naive.get("error") or fast.get("error"):
        return {}
    keys = STAGES + ("end_to_end",)

    def div(a, b):
        return a / b if b else math.inf

    return {kind: {s: div(naive[field_][s], fast[field_][s]) for s in keys}
            for kind, field_ in (("time", "seconds"), ("memory_beyond_weights", "peak_bytes_beyond_weights"),
                                 ("memory_total", "peak_bytes_total"))}


def _way_line(way, n, t, rec):
    if rec.get("error"):
        return f"{way:>10} N={n} T={t}: {rec['error']}"
    extra = f" (measured on {plural(rec['prompts_run'], 'prompt')}, scaled)" if rec["extrapolated"] else ""
    return (f"{way:>10} N={n} T={t or 'CounterFact'}: {rec['seconds']['end_to_end']:.2f} s{extra}, peak beyond "
            f"weights {rec['peak_bytes_beyond_weights']['end_to_end'] / 2**20:.1f} MiB")
