"""The Backward Lens two ways, side by side: the naive way a user would write today, and blens_fast.

**Naive** (per prompt, as one writes it with plain PyTorch): ``loss.backward()`` with ordinary parameter
gradients; forward hooks keep the MLP input projection's inputs and ``retain_grad`` keeps the output
projection's output gradients; per layer ``torch.linalg.matrix_rank`` and ``matrix_norm`` of the dense
``module.weight.grad``; the lens through the full logits ``lm_head(ln_f(vectors))`` (``N x V``) and
``torch.topk``.

**blens_fast** (in batches): :func:`blens_fast.capture` (X and Delta only, no parameter gradient),
:meth:`LowRankGradient.svdvals` / :meth:`~LowRankGradient.norm` on the factors, and the fused projection
:func:`blens_fast.lens.project_lists` (one pass over the vocabulary per factor: top-k, bottom-k and the
target's rank together; exactly what :func:`blens_fast.lens.analyze` runs).

Both give, per prompt: every layer's gradient rank and norm of ``mlp.in`` and ``mlp.out``, and for every
layer and position the lists ``ff1_top``, ``ff2_bottom`` and ``ff2_top`` (k tokens each) with the target's
rank in each list's order. :func:`run_bench` checks that they agree and measures time and peak memory per
stage (``gradients``, ``rank``, ``projection``) and end to end.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` (peak reset at each stage). On the CPU, the bytes held
by torch's CPU allocator, tracked exactly by ``torch.profiler`` (``profile_memory=True``) in a separate
pass (the profiler is not running while time is measured); the process' peak RSS (``VmHWM`` after a reset
through ``/proc/self/clear_refs``) is recorded beside it as a coarse second opinion. Memory "beyond the
weights" is the peak minus what was allocated before the way started (the model's parameters and buffers).
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._checks import check_choice, check_positive_int
from .adapters import get_adapter
from .capture import Example, tokenize_examples
from .lens import LISTS

STAGES = ("gradients", "rank", "projection")
#: Target ranks of the two ways agree when they differ by at most the number of tokens whose logit lies within
#: this fraction of the row's largest |logit| of the target's (rounding, batching and threads move those).
RANK_TOLERANCE = 1e-5
WAYS = ("naive", "blens_fast")
LIST_NAMES = tuple(LISTS)
#: per-list results each way collects (one row per vector)
LIST_FIELDS = ("indices", "values", "target_rank", "target_band")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Randomly initialised models at real dimensions (``layers`` = full depth).
MODEL_SPECS = {
    "gpt2-small": dict(arch="gpt2", layers=12, d=768, heads=12, vocab=50257, positions=1024,
                       about="GPT-2 small dimensions (d=768, 4d=3072, V=50,257), random initialisation"),
    "gpt-j": dict(arch="gptj", layers=28, d=4096, heads=16, vocab=50400, positions=2048, rotary_dim=64,
                  about="GPT-J dimensions (d=4096, 4d=16384, V=50,400), random initialisation"),
    "tiny": dict(arch="gpt2", layers=2, d=64, heads=4, vocab=50257, positions=128,
                 about="a tiny GPT-2 (d=64), random initialisation: for tests"),
    "tiny-gptj": dict(arch="gptj", layers=2, d=64, heads=4, vocab=50400, positions=128, rotary_dim=8,
                      about="a tiny GPT-J (d=64, with an unembedding bias), random initialisation: for tests"),
}
#: GPT-J blocks built by default on the CPU (the full 28 do not fit a CPU run of minutes).
CPU_GPTJ_LAYERS = 2


# -- models and prompts -----------------------------------------------------------------------------------
def build_model(spec: str, *, layers: int | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0):
    """``(model, tokenizer, info)``: a random-init model of ``MODEL_SPECS[spec]`` with ``layers`` blocks (default:
    full depth, but :data:`CPU_GPTJ_LAYERS` for GPT-J on the CPU), or a loaded model (``"default"`` or a folder)."""
    import transformers

    from .default_model import load_default_tokenizer

    if spec in MODEL_SPECS:
        s = MODEL_SPECS[spec]
        full = s["layers"]
        if layers is None:
            layers = CPU_GPTJ_LAYERS if spec == "gpt-j" and device == "cpu" else full
        check_positive_int(layers, "layers")
        if s["arch"] == "gpt2":
            config = transformers.GPT2Config(n_layer=layers, n_embd=s["d"], n_head=s["heads"], vocab_size=s["vocab"],
                                             n_positions=s["positions"])
        else:
            config = transformers.GPTJConfig(n_layer=layers, n_embd=s["d"], n_head=s["heads"], vocab_size=s["vocab"],
                                             n_positions=s["positions"], rotary_dim=s["rotary_dim"])
        torch.manual_seed(seed)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
        tokenizer = load_default_tokenizer()
        about = s["about"] + (f"; {layers} of {full} layers" if layers != full else f"; all {full} layers")
        name = spec if layers == full else f"{spec}-{layers}layers"
        return model, tokenizer, dict(name=name, spec=spec, about=about, layers=layers, full_layers=full,
                                      random_init=True)
    from .models import load_model

    model, tokenizer = load_model(spec, dtype=dtype, device=device)
    n = get_adapter(model).num_layers(model)
    if layers is not None:
        check_positive_int(layers, "layers", upper=n)
    used = n if layers is None else layers
    name = "default" if spec == "default" else Path(spec).name
    about = f"{'the shipped default model' if spec == 'default' else spec} (trained weights); " + (
        f"layers 0..{used - 1} of {n} analysed" if used != n else f"all {n} layers analysed")
    return model, tokenizer, dict(name=name if used == n else f"{name}-{used}layers", spec=spec, about=about,
                                  layers=used, full_layers=n, random_init=False)


def make_prompts(tokenizer, n: int, tokens: int | None = None, *, offset: int = 0) -> tuple[list[str], list[str]]:
    """``n`` CounterFact prompts and their true objects (records ``offset..``, wrapping around).

    ``tokens=None`` keeps them as they are (CounterFact length: about 8 positions); otherwise each prompt is
    made ``tokens`` positions long (prompt + object - 1) by continuing it with the following records' prompts
    or cutting it, on token boundaries.
    """
    from .default_model import load_counterfact

    check_positive_int(n, "prompts")
    records = load_counterfact()
    prompts, targets = [], []
    for i in range(n):
        r = records[(offset + i) % len(records)]
        target = " " + r["target_true"]["str"] if "target_true" in r else " " + r["ground_truth"]
        prompt = r["prompt"]
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


# -- measuring ------------------------------------------------------------------------------------------
class OutOfMemory(RuntimeError):
    pass


class Meter:
    """Time and peak memory per stage for one way.

    ``mode="time"``: wall time per stage (CUDA synchronised); on CUDA also ``max_memory_allocated`` per stage.
    ``mode="memory"`` (CPU): the stages are marked with ``record_function`` inside a ``torch.profiler``
    session that records every allocation and free of torch's CPU allocator; :meth:`finish` replays them.
    """

    def __init__(self, device: torch.device, mode: str):
        self.device = device
        self.mode = mode
        self.seconds = {s: 0.0 for s in STAGES}
        self.peak = {s: 0 for s in STAGES}  # bytes beyond the baseline
        self.cuda = device.type == "cuda"
        self.baseline = 0
        self._profiler = None
        self._rss_start = None
        self.rss_peak = None

    @contextmanager
    def session(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            self.baseline = torch.cuda.memory_allocated()
        self._rss_start = _reset_rss_peak()
        if self.mode == "memory" and not self.cuda:
            from torch.profiler import ProfilerActivity, profile

            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with self._profiler:
                yield self
            self._replay()
        else:
            yield self
        hwm = _read_status("VmHWM")
        if hwm is not None and self._rss_start is not None:
            self.rss_peak = hwm - self._rss_start

    @contextmanager
    def stage(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        marker = torch.profiler.record_function(f"blens_bench::{name}") if self._profiler else nullcontext()
        start = time.perf_counter()
        with marker:
            try:
                yield
            except torch.OutOfMemoryError as error:
                raise OutOfMemory(f"out of memory in stage {name!r}: {str(error).splitlines()[0]}") from None
            if self.cuda:
                torch.cuda.synchronize()
        self.seconds[name] += time.perf_counter() - start
        if self.cuda:
            self.peak[name] = max(self.peak[name], torch.cuda.max_memory_allocated() - self.baseline)

    def _replay(self):
        events = self._profiler.profiler.kineto_results.events()
        spans = sorted((e.start_ns(), e.start_ns() + e.duration_ns(), e.name().split("::", 1)[1]) for e in events
                       if e.name().startswith("blens_bench::"))
        memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        current, j = 0, 0
        for start, end, name in spans:
            while j < len(memory) and memory[j][0] < start:
                current += memory[j][1]
                j += 1
            peak = current
            while j < len(memory) and memory[j][0] <= end:
                current += memory[j][1]
                peak = max(peak, current)
                j += 1
            self.peak[name] = max(self.peak[name], peak)
        self._profiler = None

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    @property
    def total_peak(self) -> int:
        return max(self.peak.values())


def _read_status(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> int | None:
    """Reset the process' peak RSS to its current RSS (Linux ``clear_refs``); returns the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _read_status("VmRSS")


# -- the naive way ----------------------------------------------------------------------------------------
def naive_way(model, examples: list[Example], layers, *, k: int, normalized: bool, meter: Meter,
              progress: bool = True, desc: str = "naive") -> dict:
    """The Backward Lens as one writes it with plain PyTorch, one prompt at a time (each prompt needs its own
    dense gradient, so its own backward). Returns per-prompt gradient ranks/norms and the token lists."""
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    ln_f = model.get_submodule(adapter.final_norm)
    lm_head = model.get_submodule(adapter.unembedding)
    fc_in, fc_out = ("mlp.up" if "mlp.up" in adapter.modules else "mlp.in"), "mlp.out"
    modules = (fc_in, fc_out)
    out = _empty_result(len(examples), len(layers), len(modules))
    for e, example in enumerate(tqdm(examples, desc=desc, unit="prompt", disable=not progress, leave=False)):
        with meter.stage("gradients"):
            inputs, outputs, handles = {}, {}, []

            def keep_input(layer):
                def hook(module, args, output):
                    inputs[layer] = args[0].detach()
                return hook

            def keep_output(layer):
                def hook(module, args, output):
                    output.retain_grad()
                    outputs[layer] = output
                return hook

            for layer in layers:
                handles.append(adapter.module(model, layer, fc_in).register_forward_hook(keep_input(layer)))
                handles.append(adapter.module(model, layer, fc_out).register_forward_hook(keep_output(layer)))
            try:
                model.zero_grad(set_to_none=True)
                ids = torch.tensor([example.input_ids], device=device)
                logits = model(input_ids=ids, use_cache=False).logits[0]
                positions = torch.tensor(list(example.loss_positions), device=device)
                log_probs = logits[positions].float().log_softmax(-1)
                loss = -log_probs[torch.arange(len(example.target_ids), device=device),
                                  torch.tensor(example.target_ids, device=device)].sum()
                loss.backward()
            finally:
                for handle in handles:
                    handle.remove()
            del logits, log_probs, loss
            x = torch.stack([inputs[layer].reshape(example.num_tokens, -1) for layer in layers])
            delta = torch.stack([outputs[layer].grad.reshape(example.num_tokens, -1) for layer in layers])
            del inputs, outputs
        with meter.stage("rank"):
            for li, layer in enumerate(layers):
                for mi, module in enumerate(modules):
                    grad = adapter.weight(model, layer, module).grad.float()
                    out["rank"][e, li, mi] = int(torch.linalg.matrix_rank(grad))
                    out["norm"][e, li, mi] = float(torch.linalg.matrix_norm(grad))
            del grad
            model.zero_grad(set_to_none=True)
        with meter.stage("projection"):
            target = example.target_ids[0]
            if e == 0:  # for the projection check on identical vectors (projection_agreement)
                out["vectors"] = dict(x=x.reshape(-1, x.shape[-1]), delta=delta.reshape(-1, delta.shape[-1]),
                                      target=target)
            for vectors, names in ((x, ("ff1_top",)), (delta, ("ff2_bottom", "ff2_top"))):
                v = vectors.reshape(-1, vectors.shape[-1])
                if normalized:
                    v = v / v.norm(dim=-1, keepdim=True)
                with torch.no_grad():
                    # N x V, in float32 like the fused kernels' logits (a bf16 GEMM output would round
                    # 50k logits onto a few hundred values and tie most of them)
                    normed = ln_f(v).float()
                    logits = F.linear(normed, lm_head.weight.float(),
                                      None if lm_head.bias is None else lm_head.bias.float())
                for name in names:
                    largest = LISTS[name][2]
                    top = torch.topk(logits, k, dim=-1, largest=largest)
                    at_target = logits[:, target:target + 1]
                    # ties: a lower token id comes first (the library's rule)
                    beaten = ((logits > at_target) if largest else (logits < at_target)) | (
                        (logits == at_target) & (torch.arange(logits.shape[1], device=logits.device) < target))
                    out["indices"][name].append(top.indices.cpu())
                    out["values"][name].append(top.values.cpu())
                    out["target_rank"][name].append((beaten.sum(-1) + 1).cpu())
                    # tokens within rounding of the target's logit: where two correct ranks may differ
                    tol = RANK_TOLERANCE * logits.abs().amax(-1, keepdim=True)
                    out["target_band"][name].append(((logits - at_target).abs() <= tol).sum(-1).cpu() - 1)
                del logits
    return _finish_result(out)


# -- blens_fast ---------------------------------------------------------------------------------------------
def fast_way(model, tokenizer, examples: list[Example], layers, *, k: int, normalized: bool, meter: Meter,
             batch_size: int, max_tokens: int | None = None, impl: str = "auto", progress: bool = True,
             desc: str = "blens_fast") -> dict:
    """The Backward Lens with the library's calls: consecutive captures of at most ``batch_size`` prompts and
    ``max_tokens`` padded positions (memory flat in N)."""
    from .capture import capture, token_batches
    from .lens import project_lists

    out = None
    batches = token_batches([e.num_tokens for e in examples], batch_size, max_tokens)
    for indices in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        start = indices[0]
        batch = examples[start:start + len(indices)]
        with meter.stage("gradients"):
            cap = capture(model, tokenizer, [e.prompt for e in batch], [e.target for e in batch], layers=layers,
                          modules=("mlp.in", "mlp.out"))
        modules = tuple(m for m in cap.modules if m != "mlp.gate")
        if out is None:
            out = _empty_result(len(examples), len(layers), len(modules))
        with meter.stage("rank"):
            rows = slice(start, start + cap.num_examples)
            # torch.linalg.matrix_rank's default rule for a float32 matrix of the gradient's shape
            for mi, (module_ranks, module_norms) in enumerate(cap.ranks_and_norms(modules, dtype=torch.float32)
                                                               .values()):
                out["rank"][rows, :, mi] = module_ranks.T
                out["norm"][rows, :, mi] = module_norms.T
        with meter.stage("projection"):
            lists = project_lists(cap, model, k=k, normalized=normalized, impl=impl)
            for name in LIST_NAMES:
                indices, values, _, target_ranks = lists[name]
                out["indices"][name].append(indices)
                out["values"][name].append(values)
                out["target_rank"][name].append(target_ranks)
        del cap
    return _finish_result(out)


def _empty_result(n, n_layers, n_modules):
    return dict(rank=torch.zeros(n, n_layers, n_modules, dtype=torch.long),
                norm=torch.zeros(n, n_layers, n_modules, dtype=torch.float64),
                **{key: {name: [] for name in LIST_NAMES} for key in LIST_FIELDS})


def _finish_result(out):
    for key in LIST_FIELDS:
        out[key] = {name: torch.cat(parts) for name, parts in out[key].items() if parts}
    return out


def compare(naive: dict, fast: dict, n: int) -> dict:
    """Agreement of the two ways on their first ``n`` prompts (fractions; 1.0 = identical)."""
    result = {"prompts_compared": n}
    r_naive, r_fast = naive["rank"][:n], fast["rank"][:n]
    result["gradient_rank_equal"] = float((r_naive == r_fast).double().mean())
    norm_n, norm_f = naive["norm"][:n], fast["norm"][:n]
    result["gradient_norm_max_rel_err"] = float(((norm_n - norm_f).abs() / norm_f.abs().clamp_min(1e-300)).max())
    return {**result, **_compare_lists(naive, fast)}


def _compare_lists(naive: dict, fast: dict, prefix: str = "") -> dict:
    """Token lists and target ranks of ``fast`` against ``naive`` over the rows both have."""
    rows = None
    exact, tied, values, target, within = [], [], [], [], []
    for name in LIST_NAMES:
        a, b = naive["indices"][name], fast["indices"][name]
        rows = min(a.shape[0], b.shape[0])
        a, b = a[:rows], b[:rows]
        va, vb = naive["values"][name][:rows], fast["values"][name][:rows]
        # rows whose list holds exactly equal logits (e.g. a zero vector: every token ties) have no defined
        # order among the tied tokens; there the two ways agree when their values do
        has_tie = (va[:, 1:] == va[:, :-1]).any(-1)
        same_values = torch.isclose(va, vb, rtol=1e-4, atol=1e-6 * va.abs().max().clamp_min(1e-30)).all(-1)
        exact.append(((a == b).all(-1) | (has_tie & same_values)).double())
        tied.append(has_tie)
        values.append(((va - vb).abs().amax(-1) / va.abs().amax(-1).clamp_min(1e-30)))
        gap = (naive["target_rank"][name][:rows] - fast["target_rank"][name][:rows]).abs()
        target.append((gap == 0).double())
        within.append((gap <= naive["target_band"][name][:rows]).double())
    return {f"{prefix}rows_compared": int(rows) * len(LIST_NAMES),
            f"{prefix}rows_with_exact_ties": int(torch.cat(tied).sum()),
            f"{prefix}topk_tokens_equal": float(torch.cat(exact).mean()),
            f"{prefix}topk_values_max_rel_err": float(torch.cat(values).max()),
            f"{prefix}target_rank_exactly_equal": float(torch.cat(target).mean()),
            f"{prefix}target_rank_equal": float(torch.cat(within).mean())}


def _decides_agreement(key: str, dtype: str) -> bool:
    """In float32 every ``*_equal`` fraction must pass (the exact target ranks are only reported); in 16-bit dtypes the end-to-end token lists are reported
    but only the gradient ranks and the projection of identical vectors decide (16-bit activations of a padded
    batch and of a single prompt differ, which moves near-tied tokens)."""
    if not key.endswith("_equal") or key.endswith("_exactly_equal"):  # exact ranks are reported, not required
        return False
    return dtype == "float32" or key.startswith(("gradient_", "same_vectors_"))


def projection_agreement(model, naive: dict, *, k: int, normalized: bool, impl: str) -> dict:
    """The fused projection of the naive way's own vectors (its first prompt) against its full-logits lists.

    This separates the kernels from the capture's numerics: in bfloat16 a padded batch and a single prompt
    round activations differently, and over many layers that alone can reorder near-tied tokens.
    """
    from .lens import lists_by_factor, project_factor_lists

    vectors = naive["vectors"]
    fused = {key: {} for key in ("indices", "values", "target_rank")}
    for (_, factor), names in lists_by_factor().items():
        found = project_factor_lists(model, vectors[factor], vectors["target"], names, k=k, normalized=normalized,
                                     impl=impl)
        for name, (part, ranks) in found.items():
            fused["indices"][name], fused["values"][name] = part.indices.cpu(), part.values.cpu()
            fused["target_rank"][name] = ranks.cpu()
    return _compare_lists(naive, fused, prefix="same_vectors_")


# -- the benchmark ------------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    model: str = "gpt2-small"
    layers: int | None = None
    prompts: tuple[int, ...] = (100,)
    tokens: tuple[int | None, ...] = (None,)
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 8
    max_tokens: int | None = None
    naive_prompts: int | None = None
    memory_prompts: int | None = None
    k: int = 10
    normalized: bool = False
    impl: str = "auto"
    threads: int | None = None
    seed: int = 0
    agreement: float = 0.99
    naive_single_pass: bool = False
    progress: bool = True
    out: str | None = None


def run_bench(config: BenchConfig, *, log=print) -> dict:
    """Run both ways at every (N, T) of the sweep, check agreement, measure; write files when ``config.out``.

    The main comparison is at the largest N and the first T. At other sweep points only blens_fast runs
    (for the scaling plots). The naive way runs on the first ``naive_prompts`` prompts (default: all); its
    time for N prompts is then its measured per-prompt time times N (it is a loop over prompts), marked
    ``extrapolated``. On the CPU the memory pass covers the ``memory_prompts`` longest prompts (default: all).
    """
    check_choice(config.device, "device", ("cpu", "cuda"))
    check_choice(config.dtype, "dtype", tuple(DTYPES))
    check_positive_int(config.batch_size, "batch_size")
    if config.max_tokens is not None:
        check_positive_int(config.max_tokens, "max_tokens")
    check_positive_int(config.k, "k")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    for n in config.prompts:
        check_positive_int(n, "prompts")
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(check_positive_int(config.threads, "threads"))
    try:
        return _run_bench(config, log)
    finally:
        torch.set_num_threads(threads)


def _run_bench(config: BenchConfig, log) -> dict:
    device = torch.device(config.device)
    dtype = DTYPES[config.dtype]

    started = time.time()
    model, tokenizer, info = build_model(config.model, layers=config.layers, device=config.device, dtype=dtype,
                                         seed=config.seed)
    layer_ids = tuple(range(info["layers"]))
    for p in model.parameters():
        p.requires_grad_(True)
    weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    log(f"blens bench: {info['about']}; {config.dtype} on {config.device}; "
        f"weights {weight_bytes / 2**20:.1f} MiB")

    n_main = max(config.prompts)
    t_main = config.tokens[0]
    points = [(n, t_main) for n in sorted(set(config.prompts))] + [(n_main, t) for t in config.tokens[1:]]
    runs = []
    # warm up both ways on one prompt (lazy initialisation, kernel compilation), untimed
    warm = tokenize_examples(tokenizer, *make_prompts(tokenizer, 1, t_main), max_positions=None)
    scratch = Meter(device, "time")
    try:  # one layer is enough to initialise every kernel both ways use (on the CPU nothing needs it)
        if device.type == "cuda":
            naive_way(model, warm, layer_ids[:1], k=config.k, normalized=config.normalized, meter=scratch,
                      progress=False)
    except OutOfMemory:
        _cleanup(model)
    fast_way(model, tokenizer, warm, layer_ids[:1], k=config.k, normalized=config.normalized, meter=scratch,
             batch_size=1, impl=config.impl, progress=False)
    _cleanup(model)
    for n, t in points:
        main = (n, t) == (n_main, t_main)
        prompts, targets = make_prompts(tokenizer, n, t)
        examples = tokenize_examples(tokenizer, prompts, targets)
        run = dict(prompts=n, tokens=t, main=main,
                   positions_mean=sum(e.num_tokens for e in examples) / n,
                   positions_max=max(e.num_tokens for e in examples), ways={})
        ways = WAYS if main else ("blens_fast",)
        results = {}
        for way in ways:
            run["ways"][way], results[way] = _measure_way(way, model, tokenizer, examples, layer_ids, config,
                                                          device, weight_bytes)
            log(_way_line(way, n, t, run["ways"][way]))
        if main:
            ok = run["ways"]["naive"].get("error") is None
            if ok:
                m = run["ways"]["naive"]["prompts_run"]
                run["agreement"] = {**compare(results["naive"], results["blens_fast"], m),
                                    **projection_agreement(model, results["naive"], k=config.k,
                                                           normalized=config.normalized, impl=config.impl)}
                run["agree"] = all(v >= config.agreement for key, v in run["agreement"].items()
                                   if _decides_agreement(key, config.dtype))
                log("agreement: " + ", ".join(f"{k_}={v:.4g}" for k_, v in run["agreement"].items()))
            run["ratios"] = _ratios(run["ways"]["naive"], run["ways"]["blens_fast"])
        runs.append(run)
        if config.out:  # what is done so far survives a run cut short (a timeout, an out-of-memory kill)
            partial = Path(config.out) / f"bench_{config.device}_{info['name']}.partial.json"
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(dict(model=info, dtype=config.dtype, runs=runs), indent=2, default=str))

    try:
        from .ops.topk import _resolve_impl

        impl_used = _resolve_impl(config.impl, device, config.k)
    except Exception as error:  # noqa: BLE001 - only a label for the report
        impl_used = f"{config.impl} ({type(error).__name__})"
    report = dict(
        config={**asdict(config), "prompts": list(config.prompts), "tokens": list(config.tokens)},
        model=info, weights_bytes=weight_bytes, dtype=config.dtype, device=config.device,
        machine=_machine(device), torch=torch.__version__, threads=torch.get_num_threads(),
        created=time.strftime("%Y-%m-%d %H:%M:%S %Z"), wall_seconds=None, runs=runs,
        memory_method=_memory_method(device),
        naive_method=("per prompt: loss.backward() with parameter gradients (all parameters require grad); "
                      "torch.linalg.matrix_rank and matrix_norm of each MLP weight's .grad (cast to float32); "
                      "lm_head(ln_f(vectors)) full logits (float32 GEMM), torch.topk, target rank from the full logits"),
        fast_method=(f"batches of {config.batch_size} prompts"
                     + (f" and at most {config.max_tokens} padded positions" if config.max_tokens else "")
                     + ": blens_fast.capture (mlp.in, mlp.out), "
                     "Capture.ranks_and_norms(): one batched SVD per module over layers and examples (matrix_rank's float32 rule), "
                     f"blens_fast.lens.project_lists(impl={config.impl!r} -> {impl_used!r}): one pass per factor"),
    )
    report["wall_seconds"] = time.time() - started
    report["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if config.out:
        report["files"] = {k_: str(v) for k_, v in write_report(report, config.out).items()}
        (Path(config.out) / f"bench_{config.device}_{info['name']}.partial.json").unlink(missing_ok=True)
    return report


def _measure_way(way, model, tokenizer, examples, layers, config, device, weight_bytes):
    n = len(examples)
    kwargs = dict(k=config.k, normalized=config.normalized, progress=config.progress)
    subset = examples
    if way == "naive" and config.naive_prompts is not None:
        subset = examples[:min(n, config.naive_prompts)]

    def call(exs, meter, tag):
        if way == "naive":
            return naive_way(model, exs, layers, meter=meter, desc=f"naive ({tag})", **kwargs)
        return fast_way(model, tokenizer, exs, layers, meter=meter, batch_size=config.batch_size,
                        max_tokens=config.max_tokens, impl=config.impl, desc=f"blens_fast ({tag})", **kwargs)

    record = dict(prompts_run=len(subset), extrapolated=len(subset) < n, error=None)
    single = way == "naive" and config.naive_single_pass and device.type == "cpu"
    record["time_from_profiled_pass"] = single
    meter = Meter(device, "memory" if single else "time")
    try:
        with meter.session():
            result = call(subset, meter, "time")
    except OutOfMemory as error:
        record["error"] = str(error)
        record["oom"] = True
        _cleanup(model)
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
            order = sorted(range(len(subset)), key=lambda i: -subset[i].num_tokens)[:config.memory_prompts]
            mem_subset = [subset[i] for i in sorted(order)]
        mem = Meter(device, "memory")
        with mem.session():
            call(mem_subset, mem, "memory")
        peaks, rss = mem.peak, mem.rss_peak
        record["memory_prompts"] = len(mem_subset)
        record["seconds_profiled_pass"] = mem.total_seconds
    record["peak_bytes_beyond_weights"] = {s: int(peaks[s]) for s in STAGES}
    record["peak_bytes_beyond_weights"]["end_to_end"] = int(max(peaks.values()))
    record["peak_bytes_total"] = {s: int(v) + weight_bytes for s, v in record["peak_bytes_beyond_weights"].items()}
    record["rss_peak_beyond_start_bytes"] = rss
    return record, result


def _cleanup(model):
    model.zero_grad(set_to_none=True)
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

    return dict(
        time={s: div(naive["seconds"][s], fast["seconds"][s]) for s in keys},
        memory_beyond_weights={s: div(naive["peak_bytes_beyond_weights"][s], fast["peak_bytes_beyond_weights"][s])
                               for s in keys},
        memory_total={s: div(naive["peak_bytes_total"][s], fast["peak_bytes_total"][s]) for s in keys},
    )


def _way_line(way, n, t, rec):
    if rec.get("error"):
        return f"{way:>10} N={n} T={t}: {rec['error']}"
    extra = f" (measured on {rec['prompts_run']} prompts, scaled)" if rec["extrapolated"] else ""
    return (f"{way:>10} N={n} T={t or 'CounterFact'}: {rec['seconds']['end_to_end']:.2f} s{extra}, peak beyond "
            f"weights {rec['peak_bytes_beyond_weights']['end_to_end'] / 2**20:.1f} MiB")


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU {cpu}, {cores} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def _memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return ("torch.cuda.max_memory_allocated, peak reset at the start of each stage, minus the memory "
                "allocated before the way started (the model's weights)")
    return ("torch's CPU allocator, every allocation and free recorded by torch.profiler (profile_memory=True) "
            "in a separate pass and replayed: the peak of bytes held per stage, beyond what was allocated "
            "before the way started (the model's weights). Memory that libraries allocate outside torch's "
            "allocator (e.g. LAPACK/BLAS workspaces) is not in it; rss_peak_beyond_start_bytes (VmHWM after a "
            "clear_refs reset, minus VmRSS at the start) is the coarser whole-process view")


# -- writing -------------------------------------------------------------------------------------------------
def _mib(b):
    return "n/a" if b is None else f"{b / 2**20:,.1f}"


def output_stem(report: dict) -> str:
    stem = f"bench_{report['device']}_{report['model']['name']}"
    return stem if report["dtype"] == "float32" else f"{stem}_{report['dtype']}"


def write_report(report: dict, directory) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = output_stem(report)
    paths = {"json": directory / f"{stem}.json", "md": directory / f"{stem}.md", "png": directory / f"{stem}.png"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    paths["md"].write_text(markdown_report(report, png_name=paths["png"].name), encoding="utf-8")
    plot_report(report, paths["png"])
    return paths


def markdown_report(report: dict, *, png_name: str | None = None) -> str:
    main = next(r for r in report["runs"] if r["main"])
    naive, fast = main["ways"]["naive"], main["ways"]["blens_fast"]
    cfg = report["config"]
    t = main["tokens"]
    lines = [
        f"# Backward Lens benchmark: {report['model']['about']}",
        "",
        f"- machine: {report['machine']}",
        f"- torch {report['torch']}, device {report['device']}, dtype {report['dtype']}, "
        f"{report['threads']} threads",
        f"- N = {main['prompts']} CounterFact prompts, "
        + (f"T = {t} positions each" if t else f"CounterFact length ({main['positions_mean']:.1f} positions on "
                                              f"average, at most {main['positions_max']})")
        + f"; layers analysed: {report['model']['layers']} (mlp.in and mlp.out); k = {cfg['k']}"
        + (", normalized" if cfg["normalized"] else ""),
        f"- model weights: {_mib(report['weights_bytes'])} MiB",
        f"- naive: {report['naive_method']}",
        f"- blens_fast: {report['fast_method']}",
        f"- memory: {report['memory_method']}",
    ]
    if naive.get("time_from_profiled_pass"):
        lines.append("- the naive way ran once, under the memory profiler, and its times are from that pass "
                     "(few, large ops: the profiler's per-op overhead is negligible there)")
    for way, rec in (("naive", naive), ("blens_fast", fast)):
        if rec.get("seconds_profiled_pass") and not rec.get("time_from_profiled_pass"):
            lines.append(f"- {way}: {rec['seconds_measured']:.3g} s in the timed pass, "
                         f"{rec['seconds_profiled_pass']:.3g} s in the profiled memory pass over "
                         f"{rec['memory_prompts']} prompts")
    if naive.get("extrapolated"):
        lines.append(f"- **the naive way ran on {naive['prompts_run']} of the {main['prompts']} prompts**: its "
                     "times are its measured time x N / prompts run (a loop over prompts, so linear in N); its "
                     "memory is the peak over the prompts it ran (per prompt, so flat in N)")
    lines.append(f"- memory pass over {fast.get('memory_prompts')} prompts (blens_fast) and "
                 f"{naive.get('memory_prompts')} (naive)" + (" (the longest ones)" if report["device"] == "cpu"
                                                              and cfg.get("memory_prompts") else ""))
    if naive.get("error"):
        lines += ["", f"**naive way failed: {naive['error']}**"]
    lines += ["", "## Time and peak memory per stage", "",
              "| stage | naive s | blens_fast s | time ratio | naive MiB beyond weights | blens_fast MiB beyond "
              "weights | memory ratio (beyond weights) | naive MiB total | blens_fast MiB total | memory ratio "
              "(total) |", "|---|---|---|---|---|---|---|---|---|---|"]
    ratios = main.get("ratios") or {}
    for s in STAGES + ("end_to_end",):
        def get(rec, key):
            return rec.get(key, {}).get(s) if not rec.get("error") else None

        def fmt_s(v):
            return "n/a" if v is None else f"{v:.3g}"

        def fmt_r(kind):
            v = ratios.get(kind, {}).get(s)
            return "n/a" if v is None else f"{v:.3g}x"

        lines.append(f"| {s.replace('_', ' ')} | {fmt_s(get(naive, 'seconds'))} | {fmt_s(get(fast, 'seconds'))} | "
                     f"{fmt_r('time')} | {_mib(get(naive, 'peak_bytes_beyond_weights'))} | "
                     f"{_mib(get(fast, 'peak_bytes_beyond_weights'))} | {fmt_r('memory_beyond_weights')} | "
                     f"{_mib(get(naive, 'peak_bytes_total'))} | {_mib(get(fast, 'peak_bytes_total'))} | "
                     f"{fmt_r('memory_total')} |")
    if naive.get("rss_peak_beyond_start_bytes") is not None and report["device"] == "cpu":
        lines += ["", f"Whole-process peak RSS beyond the start of each way's memory pass (coarse: pages freed by "
                      f"earlier passes in this process are reused without raising RSS, so later passes read low): "
                      f"naive {_mib(naive['rss_peak_beyond_start_bytes'])} MiB, blens_fast "
                      f"{_mib(fast['rss_peak_beyond_start_bytes'])} MiB."]
    if "agreement" in main:
        a = main["agreement"]
        lines += ["", f"## Agreement ({'PASS' if main['agree'] else 'FAIL'} at >= {cfg['agreement']:.3g})", "",
                  f"On the {a['prompts_compared']} prompts both ways ran ({a['rows_compared']} projected rows in "
                  "all; in rows whose list holds exactly equal logits, e.g. a zero vector, the order of tied tokens "
                  "is undefined and the values are compared instead): "
                  + ", ".join(f"{k_.replace('_', ' ')} {v:.4g}" for k_, v in a.items()
                                         if k_ not in ("prompts_compared",)),
                  "", "The \"same vectors\" fields project the naive way's own vectors of its first prompt with "
                  "the fused kernel (the kernels alone, without the capture's numerics). \"Target rank equal\" "
                  "accepts two ranks that differ by at most the number of tokens whose logit lies within "
                  f"{RANK_TOLERANCE:g} x the row's largest |logit| of the target's (\"exactly equal\" is shown "
                  "beside it). The gradient norms are compared with `torch.linalg.matrix_norm` of the dense "
                  "float32 (on the GPU: bfloat16 cast to float32) gradient; on the CPU its float32 reduction over "
                  "d x 4d entries is itself off by up to about 1% at GPT-J dims (pytorch/pytorch#169237), while "
                  "blens_fast's norms are float64 from the factors. "
                  + " ".join(line.strip() for line in _decides_agreement.__doc__.split("\n")).replace("``", "`")]
    scaling = [r for r in report["runs"]]
    if len(scaling) > 1:
        lines += ["", "## Scaling (blens_fast)", "", "| N | T | positions (mean) | seconds | s per prompt | "
                  "peak MiB beyond weights |", "|---|---|---|---|---|---|"]
        for r in scaling:
            f = r["ways"]["blens_fast"]
            lines.append(f"| {r['prompts']} | {r['tokens'] or 'CF'} | {r['positions_mean']:.1f} | "
                         f"{f['seconds']['end_to_end']:.3g} | {f['seconds']['end_to_end'] / r['prompts']:.3g} | "
                         f"{_mib(f['peak_bytes_beyond_weights']['end_to_end'])} |")
    if png_name:
        lines += ["", f"![memory and time per stage]({png_name})"]
    load = report.get("load_average_at_end")
    lines += ["", f"Total wall time of the benchmark: {report['wall_seconds']:.0f} s"
              + (f"; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) on "
                 f"{os.cpu_count()} cores" if load else "") + ".", ""]
    return "\n".join(lines)


def plot_report(report: dict, path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = next(r for r in report["runs"] if r["main"])
    sweep_n = [r for r in report["runs"] if r["tokens"] == main["tokens"]]
    sweep_t = [r for r in report["runs"] if r["prompts"] == main["prompts"]]
    panels = 2 + (len(sweep_n) > 1) + (len(sweep_t) > 1)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), squeeze=False)
    axes = axes[0]
    keys = STAGES + ("end_to_end",)
    colors = {"naive": "#c0504d", "blens_fast": "#4f81bd"}
    for ax, (field_name, unit, scale, title) in zip(axes[:2], (
            ("peak_bytes_beyond_weights", "MiB", 2**20, "peak memory beyond weights"),
            ("seconds", "s", 1.0, "time"))):
        for j, way in enumerate(WAYS):
            rec = main["ways"][way]
            if rec.get("error"):
                continue
            vals = [max(rec[field_name][s] / scale, 1e-6) for s in keys]
            xs = [i + (j - 0.5) * 0.38 for i in range(len(keys))]
            bars = ax.bar(xs, vals, 0.38, label=way + (" (scaled)" if way == "naive" and rec["extrapolated"]
                                                       and field_name == "seconds" else ""), color=colors[way])
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
        ax.set_yscale("log")
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom, top * 8)
        ax.set_xticks(range(len(keys)), [k.replace("_", " ") for k in keys])
        ax.set_ylabel(unit)
        ax.set_title(f"{title} (N={main['prompts']})", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    extra = 2
    for sweep, key, label in ((sweep_n, "prompts", "N (prompts)"), (sweep_t, "tokens", "T (positions)")):
        if len(sweep) < 2:
            continue
        ax = axes[extra]
        extra += 1
        xs = [r[key] if r[key] is not None else r["positions_mean"] for r in sweep]
        secs = [r["ways"]["blens_fast"]["seconds"]["end_to_end"] for r in sweep]
        mem = [r["ways"]["blens_fast"]["peak_bytes_beyond_weights"]["end_to_end"] / 2**20 for r in sweep]
        ax.plot(xs, secs, "o-", color=colors["blens_fast"], label="blens_fast time (s)")
        naive = main["ways"]["naive"]
        if key == "prompts" and not naive.get("error"):
            per = naive["seconds"]["end_to_end"] / main["prompts"]
            ax.plot(xs, [per * x for x in xs], "--", color=colors["naive"], label="naive time (s), per-prompt x N")
            ax.set_xscale("log")  # both ways visible at once; time linear in N is a slope of 1
            ax.set_yscale("log")
            label += ", log-log"
        ax.set_xlabel(label)
        ax.set_ylabel("s")
        ax2 = ax.twinx()
        ax2.plot(xs, mem, "s:", color="#9bbb59", label="blens_fast peak MiB beyond weights")
        ax2.set_ylabel("MiB")
        ax2.set_ylim(0, max(mem) * 1.3 + 1e-9)
        lines_, labels_ = ax.get_legend_handles_labels()
        l2, lb2 = ax2.get_legend_handles_labels()
        ax.legend(lines_ + l2, labels_ + lb2, fontsize=7, loc="upper left")
        ax.set_title(f"scaling with {label}", fontsize=10)
    fig.suptitle(f"{report['model']['about']} | {report['dtype']} | {report['machine']}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
