"""The training lens's cost and accuracy (results: benchmarks/results/training_lens_*.{json,md}).

cost:     trains the shipped default model and a GPT-2-small-dims model (12 layers, d=768, random init) with AdamW
          (fp32, the CPU) on packed CounterFact sentences, without the lens and with it at every=10 and every=1
          (FF1 + FF2 of every layer, rank 4, k 10: the defaults), interleaved round by round in one process, at 1 and
          2 torch threads. Step-time overhead = mean step time with the lens / without - 1 (every=10: over whole
          rounds of 10 steps, one of them sampled), medians over the rounds; beside it the time spent inside the
          lens's own code per sampled step over the step time without the lens (the same overhead, free of the
          shared machine's noise between rounds). Extra peak memory: peak RSS of a fresh process training the
          same steps with the lens at every=1 minus that of one without, both measured from the state after one
          warm-up step with the lens (the optimizer's state and the compiled kernels loaded in both) (the peak is reset through /proc/self/clear_refs; glibc is told to return every block of
          64 KiB or more, so RSS follows live memory), against the bytes of the weights' gradients.
accuracy: one AdamW step of the shipped model on a batch of 128 tokens (the step's rank far above the sketch's 9):
          the sketch's singular values against the dense ``.grad``'s SVD (relative to the stated error bar), the
          overlap of the leading direction's lists with the dense ones beside its angle bound, and, for the change of
          the weights, the share of
          ``W_after - W_before`` inside the span of the step's inputs (why it is read from a sketch of the
          difference) and the sketch of the difference against the dense change.

    python benchmarks/bench_training_lens.py cost [--models default,gpt2-small] [--threads-list 1,2] [--rounds 2]
                                                  [--device cuda]  (results: training_lens_cost_cuda.*)
    python benchmarks/bench_training_lens.py accuracy
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import RESULTS, machine_info, markdown_table, setup, write_result

MODELS = ("default", "gpt2-small")
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def build(name: str):
    """``(model in train mode, tokenizer)``."""
    import transformers

    import blens_fast as bl

    ctx = bl.load_default_model()
    if name == "default":
        return ctx.model.train(), ctx.tokenizer
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12)
    return transformers.GPT2LMHeadModel(config).train(), ctx.tokenizer


def batches(tokenizer, batch: int, tokens: int, count: int) -> list[torch.Tensor]:
    """``count`` batches of ``batch`` x ``tokens`` ids: CounterFact fact sentences, packed (no padding)."""
    import blens_fast as bl

    records = bl.counterfact.load(n=4000)
    stream: list[int] = []
    for r in records:
        stream += tokenizer(r["prompt"] + r["target"] + ".")["input_ids"] + [tokenizer.eos_token_id]
    size = batch * tokens
    need = size * count
    stream = (stream * (need // len(stream) + 1))[:need]
    return [torch.tensor(stream[i * size:(i + 1) * size]).view(batch, tokens) for i in range(count)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model, opt, data, steps: int, start: int) -> list[float]:
    times = []
    for i in range(steps):
        ids = data[(start + i) % len(data)]
        _synchronize(ids.device)
        begin = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _synchronize(ids.device)
        times.append(time.perf_counter() - begin)
    return times


def lens_for(model, tokenizer, every: int, start_step: int):
    import blens_fast as bl

    return bl.TrainingLens(model, tokenizer, every=every, start_step=start_step)


class LensClock:
    """Seconds spent inside the lens's own code (hooks and optimizer hooks) while ``on``."""

    def __init__(self):
        self.seconds = 0.0
        self.on = False

    def wrap(self, cls) -> None:
        import functools

        for name in ("_forward_hook", "_gradient_hook", "_pre_step", "_post_step"):
            original = getattr(cls, name)

            @functools.wraps(original)
            def timed(*args, _original=original, **kwargs):
                if not self.on:
                    return _original(*args, **kwargs)
                begin = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - begin

            setattr(cls, name, timed)


def cost_one(name: str, threads: int, rounds: int, batch: int, tokens: int, every1_steps: int,
             device: str = "cpu") -> dict:
    torch.set_num_threads(threads)
    model, tokenizer = build(name)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    data = [ids.to(device) for ids in batches(tokenizer, batch, tokens, 16)]
    done = 0
    train(model, opt, data, 2, done)  # warm-up: optimizer state, allocator
    done += 2
    with lens_for(model, tokenizer, 1, done):  # warm-up of the lens: the extension, the test matrices
        train(model, opt, data, 1, done)
    done += 1
    per = {"baseline": [], "every10": [], "every1": []}
    from blens_fast.training import TrainingLens

    clock = LensClock()
    clock.wrap(TrainingLens)
    inside = []
    for _ in range(rounds):
        per["baseline"].append(statistics.mean(train(model, opt, data, 10, done)))
        done += 10
        with lens_for(model, tokenizer, 10, done) as lens:  # 10 steps in a row: exactly one has step % 10 == 0
            per["every10"].append(statistics.mean(train(model, opt, data, 10, done)))
        assert len(lens.to_pandas("steps").step.unique()) == 1
        done += 10
        clock.seconds, clock.on = 0.0, True
        with lens_for(model, tokenizer, 1, done):
            per["every1"].append(statistics.mean(train(model, opt, data, every1_steps, done)))
        clock.on = False
        inside.append(clock.seconds / every1_steps)
        done += every1_steps
    base = statistics.median(per["baseline"])
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"model": name, "device": device, "threads": threads, "batch": f"{batch} x {tokens} tokens",
            "rounds": rounds,
            "step_seconds": {k: statistics.median(v) for k, v in per.items()},
            "step_seconds_per_round": per,
            "overhead_every10": statistics.median(per["every10"]) / base - 1,
            "overhead_every1": statistics.median(per["every1"]) / base - 1,
            "lens_seconds_per_sampled_step": statistics.median(inside),
            "lens_share_every1": statistics.median(inside) / base,
            "lens_share_every10": statistics.median(inside) / (10 * base),
            "gradient_bytes": grads}


class LensTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Live bytes of the tensors the lens's own code allocates (an operation's output whose storage no input shares,
    made while the lens runs), followed until their last tensor is gone; ``peak`` is their largest total. The fused
    C++ kernels' internal buffers are not seen (at most a few blocks of rows)."""

    METHODS = ("__init__", "start", "_forward_hook", "_gradient_hook", "_pre_step", "_post_step", "close")

    def __init__(self):
        super().__init__()
        self.inside = 0
        self.live = 0
        self.peak = 0
        self.refs: dict[int, list] = {}  # storage pointer -> [bytes, live tensors]

    def wrap(self, cls) -> None:
        import functools

        for name in self.METHODS:
            original = getattr(cls, name)

            @functools.wraps(original)
            def inside(*args, _original=original, **kwargs):
                self.inside += 1
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.inside -= 1

            setattr(cls, name, inside)

    def _release(self, key: int) -> None:
        entry = self.refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        if not self.inside:
            return out
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            key = t.untyped_storage().data_ptr()
            if key in self.refs:
                self.refs[key][1] += 1  # a view of a tensor the lens made
            elif key not in inputs:
                self.refs[key] = [t.untyped_storage().nbytes(), 1]
                self.live += self.refs[key][0]
                self.peak = max(self.peak, self.live)
            else:
                continue
            weakref.finalize(t, self._release, key)
        return out


def lens_tensors(name: str, batch: int, tokens: int, steps: int) -> dict:
    """The lens's own tensor bytes over ``steps`` sampled steps (every=1), and Arrow's pool after them (the buffered
    rows of those steps)."""
    import gc

    import pyarrow as pa

    from blens_fast.training import TrainingLens

    torch.set_num_threads(1)
    model, tokenizer = build(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    data = batches(tokenizer, batch, tokens, 4)
    with lens_for(model, tokenizer, 1, 0):
        train(model, opt, data, 1, 0)
    gc.collect()
    mode = LensTensors()
    mode.wrap(TrainingLens)
    arrow = pa.total_allocated_bytes()
    with mode:
        lens = lens_for(model, tokenizer, 1, 1).start()
        train(model, opt, data, steps, 1)
        between = mode.live  # what the lens holds between sampled steps
        rows = pa.total_allocated_bytes() - arrow
        lens.close()
    return {"lens_tensor_peak_bytes": mode.peak, "lens_tensor_bytes_between_steps": between,
            "arrow_bytes_per_buffered_step": rows / steps}


def memory_worker(args) -> None:
    """One fresh process: train ``--steps`` steps with or without the lens (every=1), print the peak RSS."""
    torch.set_num_threads(1)
    model, tokenizer = build(args.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    data = batches(tokenizer, args.batch, args.tokens, 4)
    with lens_for(model, tokenizer, 1, 0):  # in both processes: the optimizer's state, the compiled extension
        train(model, opt, data, 1, 0)
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from the current RSS
    if args.lens:
        with lens_for(model, tokenizer, 1, 1):
            train(model, opt, data, args.steps, 1)
    else:
        train(model, opt, data, args.steps, 1)
    status = Path("/proc/self/status").read_text()
    peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024
    print(json.dumps({"peak_rss_bytes": peak}))


def peak_rss(name: str, lens: bool, batch: int, tokens: int, steps: int) -> int:
    command = [sys.executable, __file__, "memory-worker", "--model", name, "--batch", str(batch), "--tokens",
               str(tokens), "--steps", str(steps)] + (["--lens"] if lens else [])
    done = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, **MEMORY_ENV})
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


def memory_one(name: str, batch: int, tokens: int, steps: int, repeats: int) -> dict:
    base, lens = [], []
    for _ in range(repeats):  # interleaved
        base.append(peak_rss(name, False, batch, tokens, steps))
        lens.append(peak_rss(name, True, batch, tokens, steps))
    model, _ = build(name)
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    extra = statistics.median(lens) - statistics.median(base)
    own = lens_tensors(name, batch, tokens, steps)
    return {"model": name, "gradient_bytes": grads, **own,
            "lens_tensor_peak_share_of_gradients": own["lens_tensor_peak_bytes"] / grads,
            "arrow_share_of_gradients_per_buffered_step": own["arrow_bytes_per_buffered_step"] / grads,
            "peak_rss_without": base, "peak_rss_with": lens, "rss_extra_peak_bytes": extra,
            "rss_extra_share_of_gradients": extra / grads, "rss_noise_bytes": max(base) - min(base)}


def cuda_memory_one(name: str, batch: int, tokens: int, steps: int) -> dict:
    """On a GPU: the peak of allocated memory over ``steps`` steps with the lens (every=1) minus that without, in one
    process after a warm-up step with the lens (the optimizer's state and the lens's test matrices exist in both)."""
    model, tokenizer = build(name)
    model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    data = [ids.cuda() for ids in batches(tokenizer, batch, tokens, 4)]
    with lens_for(model, tokenizer, 1, 0):
        train(model, opt, data, 1, 0)
    peaks = {}
    for lens in (False, True):
        torch.cuda.reset_peak_memory_stats()
        if lens:
            with lens_for(model, tokenizer, 1, 1):
                train(model, opt, data, steps, 1)
        else:
            train(model, opt, data, steps, 1)
        peaks[lens] = torch.cuda.max_memory_allocated()
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    extra = peaks[True] - peaks[False]
    return {"model": name, "gradient_bytes": grads, "cuda_peak_without": peaks[False], "cuda_peak_with": peaks[True],
            "cuda_extra_peak_bytes": extra, "cuda_extra_share_of_gradients": extra / grads}


def cost(args) -> dict:
    runs, memory = [], []
    for name in args.models.split(","):
        batch, tokens = (8, 64) if name == "default" else (4, 64)
        for threads in (int(t) for t in args.threads_list.split(",")):
            runs.append(cost_one(name, threads, args.rounds, batch, tokens, args.every1_steps, args.device))
            print(json.dumps(runs[-1]["step_seconds"]), runs[-1]["overhead_every10"], runs[-1]["overhead_every1"],
                  flush=True)
        if args.device == "cuda":
            memory.append(cuda_memory_one(name, batch, tokens, 2))
        else:
            memory.append(memory_one(name, batch, tokens, 2, args.memory_repeats))
        print(json.dumps(memory[-1]), flush=True)
    return {"benchmark": "training lens cost", "optimizer": "AdamW, fp32", "lens": "FF1 + FF2 of every layer, "
            "rank 4, k 10, change read (AdamW)", "targets": {"overhead_every10": 0.05, "overhead_every1": 0.25,
                                                             "extra_peak_share_of_gradients": 0.02},
            "runs": runs, "memory": memory, **machine_info()}


def accuracy(args) -> dict:
    import blens_fast as bl

    torch.set_num_threads(args.threads or 1)
    ctx = bl.load_default_model()
    model, tokenizer = ctx.model.train(), ctx.tokenizer
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = batches(tokenizer, 4, 32, 2)  # 128 tokens: fewer than either side of an MLP weight, so spans mean something
    keys = [(layer, name) for layer in range(ctx.num_layers) for name in ("mlp.in", "mlp.out")]
    inputs = {key: [] for key in keys}
    handles = [ctx.module(*key).register_forward_hook(
        lambda m, a, o, key=key: inputs[key].append(a[0].detach().reshape(-1, a[0].shape[-1]).double()))
        for key in keys]
    with bl.training_lens(model, tokenizer, every=1, k=10, rank=4) as tl:
        model(input_ids=data[0], labels=data[0]).loss.backward()
        grads = {key: ctx.grad_io(*key).detach().double().clone() for key in keys}
        before = {key: ctx.weight_io(*key).detach().double().clone() for key in keys}
        opt.step()
    for h in handles:
        h.remove()
    spectrum, rows = tl.to_pandas("spectrum"), tl.to_pandas("rows")
    out = []
    for key in keys:
        change = ctx.weight_io(*key).detach().double() - before[key]
        x = inputs[key][0]
        basis = torch.linalg.qr(x.T).Q  # the span of the step's inputs (d_in x N)
        span_share = float((basis.T @ change).square().sum() / change.square().sum())
        for source, dense in (("gradient", grads[key]), ("change", change)):
            s = torch.linalg.svdvals(dense)[:4]
            got = spectrum[(spectrum.layer == key[0]) & (spectrum.module.astype(str) == key[1])
                           & (spectrum.source.astype(str) == source)].sort_values("index")
            err = (torch.tensor(got.singular_value.to_numpy()) - s).abs()
            bar = float(got.error_bar.iloc[0])
            lists = _leading_overlap(ctx, dense, rows, key, source, inputs[key][0])
            bound = float(got.angle_bound.iloc[0])
            out.append({"layer": key[0], "module": key[1], "source": source, "tokens": int(x.shape[0]),
                        "sigma_1": float(s[0]), "max_abs_error_top4": float(err.max()), "error_bar": bar,
                        "error_within_bar": bool(err.max() <= bar), "angle_bound_1": bound,
                        "leading_list_overlap": lists,
                        "change_share_in_input_span": span_share if source == "change" else None})
    return {"benchmark": "training lens accuracy", "model": "default", "batch": "4 x 32 tokens", "rank": 4,
            "rows": out, **machine_info()}


def _leading_overlap(ctx, dense, rows, key, source, x) -> float:
    """Share of the leading direction's first list (ff1_top / ff2_bottom) that the dense SVD's leading direction
    (same orientation rule, full logits + topk) also lists."""
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    u1, v1 = u[:, 0], vh[0]
    if float(x.mean(0) @ u1) < 0:
        u1, v1 = -u1, -v1
    if source == "change":
        v1 = -v1
    name, vector, largest = ("ff2_bottom", v1, False) if key[1] == "mlp.out" else ("ff1_top", u1, True)
    normed = torch.nn.functional.layer_norm(vector.float()[None], (vector.numel(),), ctx.lens.norm_weight.detach(),
                                            ctx.lens.norm_bias.detach(), ctx.lens.eps)
    logits = (normed.double() @ ctx.lens.weight.detach().double().T)[0]
    expected = set(torch.topk(logits, 10, largest=largest).indices.tolist())
    got = rows[(rows.layer == key[0]) & (rows.module.astype(str) == key[1]) & (rows.source.astype(str) == source)
               & (rows.list.astype(str) == name) & (rows.direction == 1)]
    return len(expected & set(got.token_id.tolist())) / 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("cost", "accuracy", "memory-worker"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads-list", default="1,2")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the models train (cuda: the memory part measures allocated GPU memory)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--every1-steps", type=int, default=3)
    parser.add_argument("--memory-repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=str, default=str(RESULTS))
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--lens", action="store_true")
    args = parser.parse_args()
    if args.mode == "memory-worker":
        memory_worker(args)
        return
    if getattr(args, "device", "cpu") == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA GPU")
    args.out = Path(args.out) if args.out else None
    setup(args)
    if args.mode == "cost":
        result = cost(args)
        table = [{"model": r["model"], "device": r["device"], "threads": r["threads"], "batch": r["batch"],
                  "step s (no lens)": r["step_seconds"]["baseline"], "step s (every=10)": r["step_seconds"]["every10"],
                  "step s (every=1)": r["step_seconds"]["every1"],
                  "overhead every=10": f"{100 * r['overhead_every10']:+.1f}%",
                  "overhead every=1": f"{100 * r['overhead_every1']:+.1f}%",
                  "lens s per sampled step": r["lens_seconds_per_sampled_step"],
                  "lens time / step, every=10": f"{100 * r['lens_share_every10']:.1f}%",
                  "lens time / step, every=1": f"{100 * r['lens_share_every1']:.1f}%"} for r in result["runs"]]
        mem = [{"model": m["model"], "gradients MiB": m["gradient_bytes"] / 2 ** 20,
                "lens tensors, peak MiB": m["lens_tensor_peak_bytes"] / 2 ** 20,
                "share of gradients": f"{100 * m['lens_tensor_peak_share_of_gradients']:.2f}%",
                "buffered rows per sampled step MiB": m["arrow_bytes_per_buffered_step"] / 2 ** 20,
                "RSS: extra peak MiB": m["rss_extra_peak_bytes"] / 2 ** 20,
                "RSS: share": f"{100 * m['rss_extra_share_of_gradients']:.2f}%",
                "RSS noise MiB (runs without)": m["rss_noise_bytes"] / 2 ** 20} if "rss_noise_bytes" in m else
               {"model": m["model"], "gradients MiB": m["gradient_bytes"] / 2 ** 20,
                "GPU: extra peak MiB": m["cuda_extra_peak_bytes"] / 2 ** 20,
                "GPU: share": f"{100 * m['cuda_extra_share_of_gradients']:.2f}%"} for m in result["memory"]]
        name = "training_lens_cost" if args.device == "cpu" else "training_lens_cost_cuda"
        lines = [markdown_table(table), "", markdown_table(mem)]
    else:
        result = accuracy(args)
        lines = [markdown_table(result["rows"])]
        name = "training_lens_accuracy"
    if args.out is not None:
        write_result(args.out, name, result, table_key="runs" if args.mode == "cost" else "rows", table=lines)
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
