"""The training lens against a plain-PyTorch reading of the same steps (tests/training/reference.py): singular values
and lists equal the dense ``.grad``'s when the step's rank fits the sketch, within the stated error bar otherwise;
accumulation, checkpointing, masking, mixed precision, the actual change of AdamW; training bit-identical."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import transformers

import blens_fast as bl
from blens_fast.training import TrainingLens, read_training_lens, training_lens

from ..helpers import ARCHITECTURES, make_tiny_model, threads
from .reference import LiveInputs, in_out, lists, module_of, oriented, svd

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["Paris is in France", "Danielle speaks French"]
PUBLIC = {"mlp.in": ("mlp.in",), "mlp.out": ("mlp.out",)}


def encode(tokenizer, texts, device="cpu"):
    """Right-padded inputs with labels = -100 on the padding (a model's own shifted LM loss)."""
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
            "labels": labels.to(device)}


def reference_keys(model):
    """(layer, own module name) pairs the reference reads: FF1 (gate and up in a gated MLP) and FF2."""
    names = ("mlp.gate", "mlp.up", "mlp.out") if model.config.model_type in ("llama", "mistral", "qwen2") \
        else ("mlp.in", "mlp.out")
    return [(layer, name) for layer in range(model.config.num_hidden_layers) for name in names]


def dense_grads(model, keys):
    return {key: in_out(module_of(model, *key), module_of(model, *key).weight.grad).detach().double().clone()
            for key in keys}


def ours(tl: TrainingLens, table: str, **where) -> pd.DataFrame:
    frame = tl.to_pandas(table)
    for column, value in where.items():
        frame = frame[frame[column].astype(type(value)) == value] if column in ("module", "source", "list") \
            else frame[frame[column] == value]
    return frame


def check_lists_against_reference(model, tl, step, key, u, v, r, k, source="gradient", tol=1e-4):
    """Each direction's lists: our tokens' float64 reference logits are a valid top/bottom-k of the reference
    direction's logits (within ``tol`` of the k-th), in order."""
    layer, name = key
    checks = [("ff1_top", u, True)] if name != "mlp.out" else [("ff2_bottom", v, False), ("ff2_top", v, True)]
    for list_name, vectors, largest in checks:
        logits, expected = lists(model, vectors[:, :r], k, largest)
        got = ours(tl, "rows", step=step, layer=layer, module=name, source=source, list=list_name)
        assert len(got) == r * k, (key, list_name, len(got))
        for j in range(r):
            ids = torch.tensor(got[got.direction == j + 1].sort_values("rank").token_id.to_numpy(), dtype=torch.long)
            picked = logits[j, ids]
            kth = logits[j, expected[j, -1]]
            ok = (picked >= kth - tol).all() if largest else (picked <= kth + tol).all()
            assert ok, (key, list_name, j, ids.tolist(), expected[j].tolist())
            order = picked[1:] - picked[:-1]
            assert ((order <= tol) if largest else (order >= -tol)).all()


def one_sgd_step(model, tokenizer, batch, *, rank=4, k=5, lr=0.1, **options):
    """One SGD step under the lens, with the reference's live inputs and the dense gradients of that step."""
    keys = reference_keys(model)
    live = LiveInputs(model, keys)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with training_lens(model, tokenizer, every=1, k=k, rank=rank, **options) as tl:
        model(**batch).loss.backward()
        grads = dense_grads(model, keys)
        opt.step()
        opt.zero_grad()
    live.remove()
    return tl, grads, live


def assert_step_equals_the_dense_gradient(model, tl, grads, live, rank, k):
    """One SGD step's spectrum, norms and lists against the dense gradients, the step's rank fitting the sketch."""
    spectrum = tl.to_pandas("spectrum")
    steps = tl.to_pandas("steps")
    for key, grad in grads.items():
        count = live.counts[key]
        assert 0 < count <= 2 * rank + 1, (key, count)  # the step's rank fits the sketch
        u, s, v = svd(grad)
        r = min(rank, int((s > 1e-6 * s[0]).sum()))
        got = spectrum[(spectrum.layer == key[0]) & (spectrum.module.astype(str) == key[1])
                       & (spectrum.source.astype(str) == "gradient")].sort_values("index")
        torch.testing.assert_close(torch.tensor(got.singular_value.to_numpy()[:r]), s[:r], rtol=1e-4,
                                   atol=1e-6 * float(s[0]))
        row = steps[(steps.layer == key[0]) & (steps.module.astype(str) == key[1])].iloc[0]
        assert row.tokens == count
        assert row.norm == pytest.approx(float(grad.norm()), rel=1e-5)
        assert row.error_bar <= 1e-4 * float(s[0])
        assert row.scale == pytest.approx(1.0, rel=1e-5) and row.consistency < 1e-4
        u, v = oriented(u, v, live.sums[key] / count, r)
        check_lists_against_reference(model, tl, 1, key, u, v, r, k)
    assert set(spectrum.source.astype(str)) == {"gradient"}  # plain SGD: its change is -lr * grad, not read again


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_step_lens_equals_the_dense_gradient_when_its_rank_fits(arch, tokenizer):
    model = make_tiny_model(arch).train()
    rank, k = 4, 5
    tl, grads, live = one_sgd_step(model, tokenizer, encode(tokenizer, TEXTS), rank=rank, k=k)
    assert_step_equals_the_dense_gradient(model, tl, grads, live, rank, k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_step_lens_on_cuda_equals_the_dense_gradient(arch, tokenizer):
    """The same step on the GPU (hooks, the sketch op, the projection there), checked on the CPU in float64."""
    model = make_tiny_model(arch).train().cuda()
    rank, k = 4, 5
    tl, grads, live = one_sgd_step(model, tokenizer, encode(tokenizer, TEXTS, "cuda"), rank=rank, k=k)
    assert tl.ctx.device.type == "cuda"
    grads = {key: grad.cpu() for key, grad in grads.items()}
    live.sums = {key: total.cpu() for key, total in live.sums.items()}
    assert_step_equals_the_dense_gradient(model.cpu(), tl, grads, live, rank, k)


@pytest.mark.parametrize("refine", [True, False])
def test_singular_values_within_the_error_bar_when_the_rank_exceeds_the_sketch(tokenizer, refine):
    """The step's rank is far above the sketch: each singular value is within the stated error bar of the dense one
    (the sketch's expected error, or with ``refine`` the exact residual of the projection), and each direction is
    within its angle bound of the dense direction (Wedin), seen through its lists' reference logits."""
    model = make_tiny_model("gpt2").train()
    texts = ["The mother tongue of Danielle Darrieux is French and she was born in Bordeaux, France, in 1917",
             "The Eiffel Tower is in Paris, the capital of France, on the left bank of the Seine river"]
    rank, k = 2, 5
    tl, grads, live = one_sgd_step(model, tokenizer, encode(tokenizer, texts), rank=rank, k=k, refine=refine)
    spectrum, steps, rows = tl.to_pandas("spectrum"), tl.to_pandas("steps"), tl.to_pandas("rows")
    for key, grad in grads.items():
        assert live.counts[key] > 2 * rank + 1 + 10
        u, s, v = svd(grad)
        got = spectrum[(spectrum.layer == key[0]) & (spectrum.module.astype(str) == key[1])].sort_values("index")
        bar = float(got.error_bar.iloc[0])
        assert bar > 0
        assert (torch.tensor(got.singular_value.to_numpy()) - s[:rank]).abs().max() <= bar
        gaps = torch.minimum(torch.cat([torch.tensor([math.inf]), s[:rank - 1]]) - s[:rank], s[:rank] - s[1:rank + 1])
        assert torch.tensor(got.angle_bound.to_numpy()) == pytest.approx((bar / gaps).clamp(max=1), rel=0.3)
        row = steps[(steps.layer == key[0]) & (steps.module.astype(str) == key[1])].iloc[0]
        assert row.stable_rank == pytest.approx(float(grad.norm() ** 2 / float(got.singular_value.iloc[0]) ** 2))
        if refine and key[1] == "mlp.out":  # a pinned-down direction reads the dense direction's tokens
            u, v = oriented(u, v, live.sums[key] / live.counts[key], rank)
            for j in range(rank):
                bound = float(got.angle_bound.iloc[j])
                if bound < 0.05:
                    logits, expected = lists(model, v[:, j:j + 1], k, largest=False)
                    ids = rows[(rows.layer == key[0]) & (rows.module.astype(str) == "mlp.out")
                               & (rows.list.astype(str) == "ff2_bottom") & (rows.direction == j + 1)].token_id
                    assert len(set(ids) & set(expected[0].tolist())) >= k - 1, (key, j, bound)


def test_sgd_change_is_the_gradient_read_as_a_descent_step(tokenizer):
    """change="always" on plain SGD: the change is -lr * grad, so its lists (read as -(W_after - W_before)) are the
    gradient's, and its singular values lr times the gradient's: the sign convention of both sources is one."""
    model = make_tiny_model("gpt2").train()
    lr = 0.5
    tl, grads, live = one_sgd_step(model, tokenizer, encode(tokenizer, TEXTS), lr=lr, change="always")
    rows, spectrum = tl.to_pandas("rows"), tl.to_pandas("spectrum")
    by_source = {s: part.drop(columns=["source", "singular_value", "error_bar", "angle_bound", "logit", "score"])
                 .reset_index(drop=True)
                 for s, part in rows.groupby(rows.source.astype(str))}
    pd.testing.assert_frame_equal(by_source["gradient"], by_source["change"])
    grad_s = spectrum[spectrum.source.astype(str) == "gradient"].singular_value.to_numpy()
    change_s = spectrum[spectrum.source.astype(str) == "change"].singular_value.to_numpy()
    big = grad_s > 1e-3 * grad_s.max()
    torch.testing.assert_close(torch.tensor(change_s[big]), torch.tensor(lr * grad_s[big]), rtol=2e-3, atol=0)


def test_adamw_change_from_the_sketch_of_the_difference(tokenizer):
    """AdamW's change leaves the factors' span (it is nearly full rank): its singular values come within the error
    bar of the dense SVD of W_after - W_before, its norm within a few error estimates."""
    model = make_tiny_model("gpt2").train()
    keys = reference_keys(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    batch = encode(tokenizer, TEXTS)
    with training_lens(model, tokenizer, every=1, k=3, rank=3) as tl:
        for _ in range(2):
            model(**batch).loss.backward()
            before = {key: in_out(module_of(model, *key), module_of(model, *key).weight).detach().double().clone()
                      for key in keys}
            opt.step()
            opt.zero_grad()
    spectrum, steps = tl.to_pandas("spectrum"), tl.to_pandas("steps")
    for key in keys:
        change = in_out(module_of(model, *key), module_of(model, *key).weight).detach().double() - before[key]
        s = torch.linalg.svdvals(change)
        got = spectrum[(spectrum.step == 2) & (spectrum.layer == key[0]) & (spectrum.module.astype(str) == key[1])
                       & (spectrum.source.astype(str) == "change")].sort_values("index")
        assert (torch.tensor(got.singular_value.to_numpy()) - s[:3]).abs().max() <= got.error_bar.iloc[0]
        row = steps[(steps.step == 2) & (steps.layer == key[0]) & (steps.module.astype(str) == key[1])
                    & (steps.source.astype(str) == "change")].iloc[0]
        assert abs(row.norm - float(change.norm())) <= 4 * row.norm_error + 1e-3 * float(change.norm())


def test_gradient_accumulation_sums_micro_batches_into_one_step(tokenizer):
    model = make_tiny_model("gpt2").train()
    keys = reference_keys(model)
    live = LiveInputs(model, keys)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    micro = [encode(tokenizer, ["The Eiffel Tower is in"]), encode(tokenizer, ["Danielle speaks French"])]
    with training_lens(model, tokenizer, every=1, k=4, rank=4) as tl:
        for batch in micro:
            (model(**batch).loss / len(micro)).backward()
        grads = dense_grads(model, keys)
        opt.step()
        opt.zero_grad()
    live.remove()
    spectrum, steps = tl.to_pandas("spectrum"), tl.to_pandas("steps")
    assert set(steps.step) == {1}
    for key, grad in grads.items():
        u, s, v = svd(grad)
        r = int((s > 1e-6 * s[0]).sum().clamp(max=4))
        got = spectrum[(spectrum.layer == key[0]) & (spectrum.module.astype(str) == key[1])].sort_values("index")
        torch.testing.assert_close(torch.tensor(got.singular_value.to_numpy()[:r]), s[:r], rtol=1e-4,
                                   atol=1e-6 * float(s[0]))
        assert steps[(steps.layer == key[0]) & (steps.module.astype(str) == key[1])].tokens.iloc[0] == live.counts[key]
        u, v = oriented(u, v, live.sums[key] / live.counts[key], r)
        check_lists_against_reference(model, tl, 1, key, u, v, r, 4)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_counts_the_recomputed_forward_once(tokenizer, reentrant):
    batch = encode(tokenizer, TEXTS)
    plain = make_tiny_model("gpt2").train()
    tl_plain, grads, live = one_sgd_step(plain, tokenizer, batch)
    model = make_tiny_model("gpt2").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()
    tl, grads_ckpt, _ = one_sgd_step(model, tokenizer, batch)
    for key in grads:
        torch.testing.assert_close(grads_ckpt[key], grads[key])  # the same step, recomputed
    spectrum, spectrum_plain = tl.to_pandas("spectrum"), tl_plain.to_pandas("spectrum")
    torch.testing.assert_close(torch.tensor(spectrum.singular_value.to_numpy()),
                               torch.tensor(spectrum_plain.singular_value.to_numpy()), rtol=1e-5, atol=1e-7)
    pd.testing.assert_series_equal(tl.to_pandas("steps").tokens, tl_plain.to_pandas("steps").tokens)
    assert (tl.to_pandas("steps").scale - 1).abs().max() < 1e-5  # not twice the gradient
    pd.testing.assert_series_equal(tl.to_pandas("rows").token_id, tl_plain.to_pandas("rows").token_id)


def test_masked_and_padded_positions_add_nothing(tokenizer):
    """Labels = -100 on the prompt and the padding: only positions up to each row's last scored one carry a gradient,
    and the lens counts (and reads) exactly those."""
    model = make_tiny_model("gpt2").train()
    prompts, targets = ["Paris is in", "Ice is"], [" France", " cold"]
    enc = tokenizer([p + t for p, t in zip(prompts, targets)], return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    for row, p in enumerate(prompts):
        labels[row, : len(tokenizer(p)["input_ids"])] = -100
    labels[enc["attention_mask"] == 0] = -100
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
    tl, grads, live = one_sgd_step(model, tokenizer, batch)
    steps, spectrum = tl.to_pandas("steps"), tl.to_pandas("spectrum")
    last_layer = model.config.n_layer - 1
    for key, grad in grads.items():
        row = steps[(steps.layer == key[0]) & (steps.module.astype(str) == key[1])].iloc[0]
        assert row.tokens == live.counts[key]
        s = torch.linalg.svdvals(grad)
        got = spectrum[(spectrum.layer == key[0]) & (spectrum.module.astype(str) == key[1])].sort_values("index")
        r = int((s > 1e-6 * s[0]).sum().clamp(max=4))
        torch.testing.assert_close(torch.tensor(got.singular_value.to_numpy()[:r]), s[:r], rtol=1e-4,
                                   atol=1e-6 * float(s[0]))
    # the last layer's FF2 output reaches only the scored positions: one per row
    assert steps[(steps.layer == last_layer) & (steps.module.astype(str) == "mlp.out")].tokens.iloc[0] == 2
    assert (steps.tokens <= int(enc["attention_mask"].sum())).all()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_training_is_bit_identical_with_and_without_the_lens(tokenizer, optimizer, tmp_path):
    """Dropout on, every step sampled, tracked prompts, the change lens and Parquet output: the loss curve and the
    final weights are bit for bit those of the same training without the lens."""
    batches = [encode(tokenizer, TEXTS), encode(tokenizer, ["Rome is the capital of Italy", "Ice is cold"])]

    def train(with_lens: bool):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=4, n_positions=64, resid_pdrop=0.2, attn_pdrop=0.2, embd_pdrop=0.2)).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9) if optimizer == "sgd" else \
            torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        losses = []
        lens = training_lens(model, tokenizer, every=1, k=3, rank=2, change="always", out=tmp_path / optimizer,
                             track=[("The Eiffel Tower is in", " Paris")]) if with_lens else None
        if lens:
            lens.start()
        for step in range(4):
            loss = model(**batches[step % 2]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        if lens:
            lens.close()
        return torch.stack(losses), model.state_dict()

    losses, weights = train(False)
    losses_lens, weights_lens = train(True)
    assert torch.equal(losses, losses_lens)
    assert all(torch.equal(weights[name], weights_lens[name]) for name in weights)
    assert len(pd.read_parquet(tmp_path / optimizer / "rows")) > 0


def test_every_samples_only_its_steps_and_leaves_no_hooks(tokenizer):
    model = make_tiny_model("gpt2").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = encode(tokenizer, TEXTS)
    with training_lens(model, tokenizer, every=3, k=2, rank=1) as tl:
        for step in range(1, 8):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
            hooked = any(module._forward_hooks for module in model.modules())
            assert hooked == ((step + 1) % 3 == 0), step  # hooks only while a sampled step runs
    assert sorted(set(tl.to_pandas("steps").step)) == [3, 6]
    assert not any(module._forward_hooks for module in model.modules())
    assert tl.step == 7


def test_tracked_prompt_rank_matches_the_dense_gradient(tokenizer):
    """The target's rank in FF2's bottom list at the tracked prompt's last position: the dense ``x_t G`` with
    ``x_t`` from the model's own FF2 input, read with full logits."""
    model = make_tiny_model("gpt2").train()
    prompt, target = "The Eiffel Tower is in", " Paris"
    layer = 1
    x_t = {}
    module = module_of(model, layer, "mlp.out")
    def keep(module, args, output):
        x_t["x"] = args[0].detach()[0, -1].double()

    handle = module.register_forward_hook(keep)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model.eval()
        logp = model(ids).logits[0, -1].double().log_softmax(-1)
        model.train()
    handle.remove()
    target_id = tokenizer(target)["input_ids"][0]
    tl, grads, _ = one_sgd_step(model, tokenizer, encode(tokenizer, TEXTS), track=[(prompt, target)], k=5)
    written = (x_t["x"] @ grads[(layer, "mlp.out")])[None]
    logits, expected = lists(model, written.T, 5, largest=False)
    rank = int((logits[0] < logits[0, target_id]).sum()) + 1
    got = ours(tl, "tracked", layer=layer)
    assert got.target_rank.iloc[0] == rank
    assert got.token_id.tolist() == expected[0].tolist()
    assert got.target_prob.iloc[0] == pytest.approx(float(logp[target_id].exp()), rel=1e-4)


def test_bf16_autocast_and_a_bf16_model(tokenizer):
    batch = encode(tokenizer, TEXTS)
    for dtype, autocast in ((torch.float32, True), (torch.bfloat16, False)):
        model = make_tiny_model("llama", dtype=dtype).train()
        keys = reference_keys(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with training_lens(model, tokenizer, every=1, k=3, rank=4, change="always") as tl:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(**batch).loss
            loss.backward()
            grads = dense_grads(model, keys)
            opt.step()
        steps, spectrum = tl.to_pandas("steps"), tl.to_pandas("spectrum")
        assert steps.consistency.max() < 1e-2, steps.consistency.max()
        for key, grad in grads.items():
            s = torch.linalg.svdvals(grad)
            got = spectrum[(spectrum.layer == key[0]) & (spectrum.module.astype(str) == key[1])].sort_values("index")
            assert abs(got.singular_value.iloc[0] - float(s[0])) <= 2e-2 * float(s[0]), (dtype, key)


@pytest.mark.parametrize("refine", [True, False])
def test_grad_scaler_and_clipping_are_measured_as_the_scale(tokenizer, refine):
    """A GradScaler's loss scale and gradient clipping change what the optimizer reads by one number: the lens
    reports that number and the singular values of the gradient the optimizer reads (refined from ``.grad``, or read
    from the factors' sketch divided by that number)."""
    model = make_tiny_model("gpt2").train()
    keys = reference_keys(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    batch = encode(tokenizer, TEXTS)
    with training_lens(model, tokenizer, every=1, k=3, rank=4, refine=refine) as tl:
        scaler.scale(model(**batch).loss).backward()
        scaler.unscale_(opt)
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
        grads = dense_grads(model, keys)
        scaler.step(opt)
        scaler.update()
    steps, spectrum = tl.to_pandas("steps"), tl.to_pandas("spectrum")
    clip = min(1.0, 0.5 / (float(total) + 1e-6))
    assert steps.scale.to_numpy() == pytest.approx(1024.0 / clip, rel=1e-4)
    for key, grad in grads.items():
        s = torch.linalg.svdvals(grad)
        got = spectrum[(spectrum.layer == key[0]) & (spectrum.module.astype(str) == key[1])].sort_values("index")
        assert got.singular_value.iloc[0] == pytest.approx(float(s[0]), rel=1e-4)


def test_a_step_the_scaler_skipped_is_not_carried_into_the_next(tokenizer):
    model = make_tiny_model("gpt2").train()
    keys = reference_keys(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with training_lens(model, tokenizer, every=1, k=3, rank=4) as tl:
        model(**encode(tokenizer, ["Rome is the capital of Italy"])).loss.backward()
        opt.zero_grad()  # a skipped step: no optimizer step, the gradient dropped
        model(**encode(tokenizer, TEXTS)).loss.backward()
        grads = dense_grads(model, keys)
        opt.step()
    steps = tl.to_pandas("steps")
    assert steps.consistency.max() < 1e-4
    spectrum = tl.to_pandas("spectrum")
    for key, grad in grads.items():
        got = spectrum[(spectrum.layer == key[0]) & (spectrum.module.astype(str) == key[1])].sort_values("index")
        assert got.singular_value.iloc[0] == pytest.approx(float(torch.linalg.svdvals(grad)[0]), rel=1e-4)


def test_a_gradient_the_hooks_did_not_see_is_warned_about(tokenizer):
    model = make_tiny_model("gpt2").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with training_lens(model, tokenizer, every=1, k=3, rank=2) as tl:
        model(**encode(tokenizer, TEXTS)).loss.backward()
        tl._paused = True  # a micro-batch the hooks miss
        model(**encode(tokenizer, ["Rome is the capital of Italy"])).loss.backward()
        tl._paused = False
        with pytest.warns(UserWarning, match="not the sum of the factors"):
            opt.step()
    assert tl.to_pandas("steps").consistency.min() > 1e-2


def test_resized_vocabulary(tokenizer):
    model = make_tiny_model("gpt2").train()
    model.resize_token_embeddings(model.config.vocab_size + 7)
    with torch.no_grad():
        model.lm_head.weight[-7:] = 20 * torch.randn(7, model.config.n_embd)  # new tokens lead the lists
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with training_lens(model, tokenizer, every=1, k=3, rank=2) as tl:
        model(**encode(tokenizer, TEXTS)).loss.backward()
        opt.step()
    rows = tl.to_pandas("rows")
    assert rows.token_id.max() >= tokenizer.vocab_size
    assert rows[rows.token_id >= tokenizer.vocab_size].token.str.fullmatch(r"<\d+>").all()


def test_results_read_as_parquet_datasets(tokenizer, tmp_path):
    model = make_tiny_model("gpt2").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = encode(tokenizer, TEXTS)
    with training_lens(model, tokenizer, every=1, k=2, rank=2, out=tmp_path, flush_every=2,
                       track=[("The Eiffel Tower is in", " Paris")]) as tl:
        for _ in range(3):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    import pyarrow.dataset as ds

    assert sorted(p.name for p in (tmp_path / "rows").iterdir()) == ["part-000001.parquet", "part-000003.parquet"]
    rows = pd.read_parquet(tmp_path / "rows")
    assert set(rows.step) == {1, 2, 3} and set(rows.source.astype(str)) == {"gradient", "change"}
    assert ds.dataset(tmp_path / "steps").to_table().num_rows == 3 * 2 * 2 * 2
    assert set(pd.read_parquet(tmp_path / "tracked").step) == {1, 2, 3}
    assert {"timeline_mlp.out.png", "timeline_mlp.in.html"} <= {p.name for p in tmp_path.iterdir()}
    assert tl.scalars["blens/step"] == 3.0 and "blens/track0/L1/target_rank" in tl.scalars
    # the same settings append to the folder; other settings are refused
    with pytest.raises(ValueError, match="other settings"):
        training_lens(model, tokenizer, every=2, k=2, rank=2, out=tmp_path).start()


def test_bad_arguments_are_refused_with_their_value(tokenizer):
    model = make_tiny_model("gpt2").train()
    with pytest.raises(ValueError, match="every=0"):
        TrainingLens(model, tokenizer, every=0)
    with pytest.raises(ValueError, match="change='sometimes'"):
        TrainingLens(model, tokenizer, change="sometimes")
    with pytest.raises(ValueError, match="add 'mlp.out'"):
        TrainingLens(model, tokenizer, modules="mlp.in", track=[("a b", " c")])
    with pytest.raises(ValueError, match=r"track\[0\]"):
        TrainingLens(model, tokenizer, track=[("only a prompt",)])
    with pytest.raises(ValueError, match="tokenizer"):
        TrainingLens(model)
    with pytest.raises(ValueError, match="'fastest'"):
        TrainingLens(model, tokenizer, impl="fastest")
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="mlp.in at layer 0 does not require grad"):
        TrainingLens(model, tokenizer)
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(True)
    opt = torch.optim.SGD([model.transformer.h[0].mlp.c_fc.weight], lr=0.1)
    with training_lens(model, tokenizer, every=1):
        model(**encode(tokenizer, TEXTS)).loss.backward()
        with pytest.raises(ValueError, match="holds 1 of the 4 watched weights"):
            opt.step()


class Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Every tensor an operation allocates (an output whose storage no input shares) while ``inside`` is set."""

    def __init__(self):
        super().__init__()
        self.inside = False
        self.shapes: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.inside:
            inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    self.shapes.append((str(func), tuple(t.shape)))
        return out


def test_no_dense_weight_sized_tensor_is_allocated(tokenizer, monkeypatch):
    """Everything the lens runs (hooks, optimizer hooks, tracked prompts, the change sketch) allocates no weight-shaped
    tensor and none above a quarter of a watched weight (the largest are blocks of factor rows and the sketch's test
    matrices), besides the tracked prompts' logits (one row of V per prompt)."""
    d, d_ff = 256, 1024
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=d, n_inner=d_ff, n_head=4,
                                                                 n_positions=64)).train()
    mode = Allocations()
    for name in ("_forward_hook", "_gradient_hook", "_pre_step", "_post_step"):
        original = getattr(TrainingLens, name)

        def inside(self, *args, _original=original, **kwargs):
            before, mode.inside = mode.inside, True
            try:
                return _original(self, *args, **kwargs)
            finally:
                mode.inside = before

        monkeypatch.setattr(TrainingLens, name, inside)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = encode(tokenizer, ["The Eiffel Tower is in Paris, the capital of France"] * 3)
    with training_lens(model, tokenizer, every=1, k=5, rank=4, track=[("Paris is in", " France")]) as tl, mode:
        for _ in range(2):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    assert len(tl.to_pandas("steps")) == 2 * 2 * 2 * 2
    assert len(mode.shapes) > 100
    vocab = model.config.vocab_size
    big = [(f, s) for f, s in mode.shapes if math.prod(s) > d * d_ff // 4 and not (s[-1] == vocab and
                                                                                  math.prod(s[:-1]) == 1)]
    assert not big, big[:5]
    assert not [s for _, s in mode.shapes if sorted(s[-2:]) == [d, d_ff]]


def test_ddp_two_cpu_ranks_read_the_global_step(tokenizer, tmp_path):
    """Two gloo ranks, each with its own batch: the ranks' sketches are summed, so rank 0 reads the global step's
    gradient (the DDP average the optimizer reads); its spectrum, token count and lists are those of the dense
    reference computed here in one process over both batches."""
    import socket

    from .ddp_worker import BATCHES, worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, result = tmp_path / "out", tmp_path / "grads.pt"
    torch.multiprocessing.start_processes(worker, args=(2, port, str(out), str(result)), nprocs=2,
                                          start_method="spawn")
    grads = torch.load(result)
    model = make_tiny_model("gpt2")
    keys = reference_keys(model)
    live = LiveInputs(model, keys)
    for batch in BATCHES:  # DDP averages the ranks' gradients
        (model(**encode(tokenizer, batch)).loss / len(BATCHES)).backward()
    reference = dense_grads(model, keys)
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # the lists read the lens after the step, as the ranks did
    live.remove()
    steps, spectrum = read_training_lens(out, "steps"), read_training_lens(out, "spectrum")
    for key in keys:
        torch.testing.assert_close(grads[key], reference[key], rtol=1e-5, atol=1e-8)
        u, s, v = svd(reference[key])
        r = int((s > 1e-6 * s[0]).sum().clamp(max=4))
        got = spectrum[(spectrum.layer == key[0]) & (spectrum.module.astype(str) == key[1])].sort_values("index")
        torch.testing.assert_close(torch.tensor(got.singular_value.to_numpy()[:r]), s[:r], rtol=1e-4,
                                   atol=1e-6 * float(s[0]))
        row = steps[(steps.layer == key[0]) & (steps.module.astype(str) == key[1])].iloc[0]
        assert row.tokens == live.counts[key]
        assert row.scale == pytest.approx(2.0, rel=1e-5)  # the sum over ranks against DDP's average
    rows = read_training_lens(out, "rows")
    for key in keys:
        u, s, v = svd(reference[key])
        r = int((s > 1e-6 * s[0]).sum().clamp(max=4))
        u, v = oriented(u, v, live.sums[key] / live.counts[key], r)

        class Read:  # the rows as check_lists_against_reference reads them from a lens
            @staticmethod
            def to_pandas(table):
                return rows
        check_lists_against_reference(model, Read, 1, key, u, v, r, 5)


def test_the_inputs_are_not_kept_after_the_backward(tokenizer):
    """The hooks stay on the graph's nodes while the loss lives (a loop often keeps it until the next forward): the
    modules' inputs they read must be released when read, as the backward releases its own saved tensors."""
    def storage_uses(with_lens: bool) -> list[int]:
        model = make_tiny_model("gpt2").train()
        inputs = []
        handles = [module_of(model, *key).register_forward_hook(lambda m, args, out: inputs.append(args[0]))
                   for key in reference_keys(model)]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        lens = training_lens(model, tokenizer, every=1, k=2, rank=1).start() if with_lens else None
        out = model(**encode(tokenizer, TEXTS))
        out.loss.backward()  # `out` and its graph stay alive
        uses = [torch._C._storage_Use_Count(x.untyped_storage()._cdata) for x in inputs]
        opt.step()
        if lens:
            lens.close()
        for h in handles:
            h.remove()
        return uses

    assert storage_uses(True) == storage_uses(False)


@pytest.mark.parametrize("rank_of_g", [3, 200])
@pytest.mark.parametrize("side", ["in", "out"])
def test_the_refined_error_bar_is_the_residual_of_its_subspace(rank_of_g, side):
    """``||G - G T T^T||_F`` against float64 from the returned directions: a gradient of rank 3 (inside the 9-column
    subspace: the residual is rounding, computed directly) and of rank 200 (most of it outside: the difference of
    squares), for a subspace started on either side."""
    from blens_fast.training import _frobenius, _refined

    g = torch.Generator().manual_seed(rank_of_g)
    d_in, d_out = 96, 160
    grad = (torch.randn(d_in, rank_of_g, generator=g) @ torch.randn(rank_of_g, d_out, generator=g)).float()
    start = torch.randn(d_in if side == "in" else d_out, 9, generator=g)
    s, u, v, norm, bar = _refined(grad, start, side, _frobenius(grad))
    dense = grad.double()
    residual = float(torch.linalg.matrix_norm(dense - dense @ v @ v.T))
    assert v.shape == (d_out, 9) and torch.allclose(v.T @ v, torch.eye(9, dtype=v.dtype), atol=1e-5)
    if rank_of_g < 9:
        assert bar <= 1e-5 * norm and residual <= 1e-5 * norm
    else:
        assert bar == pytest.approx(residual, rel=1e-4)
    torch.testing.assert_close(s.double(), torch.linalg.svdvals(dense @ v), rtol=1e-5, atol=1e-6 * norm)


def test_impl_chooses_the_projection(tokenizer, monkeypatch):
    """``impl`` reaches every projection the lens makes (its lists and the tracked prompts'), and the lists of the
    torch reference and of the Triton kernel (its GPU path, through the interpreter here) equal the default's."""
    import blens_fast.training as training

    seen = []
    project_lists = training.project_lists
    monkeypatch.setattr(training, "project_lists", lambda *a, **kw: seen.append(kw["impl"]) or project_lists(*a, **kw))
    rows = {}
    for impl in ("auto", "torch", "triton"):
        model = make_tiny_model("gpt2").train()
        tl, _, _ = one_sgd_step(model, tokenizer, encode(tokenizer, TEXTS), impl=impl,
                                track=[("The Eiffel Tower is in", " Paris")])
        rows[impl] = tl.to_pandas("rows")[["layer", "module", "direction", "list", "rank", "token_id"]]
    assert seen == ["auto", "auto", "torch", "torch", "triton", "triton"]
    pd.testing.assert_frame_equal(rows["auto"], rows["torch"])
    pd.testing.assert_frame_equal(rows["auto"], rows["triton"])


def test_a_lens_resumed_from_an_earlier_step_drops_the_later_rows_it_retakes(tokenizer, tmp_path):
    """Steps 1-5 written in parts of 2 sampled steps (1-2, 3-4, 5); a lens resumed at step 3 (a Trainer resumed from
    an earlier checkpoint) keeps steps 1-3, rewriting the part that straddles its start, drops 4 and 5 with a warning,
    and writes its own 4 and 5: one row set per step, the old ones up to the start."""
    model = make_tiny_model("gpt2").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = encode(tokenizer, TEXTS)

    def train(steps, **options):
        with training_lens(model, tokenizer, every=1, k=3, rank=2, out=tmp_path / "tlens", flush_every=2,
                           **options) as tl:
            for _ in range(steps):
                model(**batch).loss.backward()
                opt.step()
                opt.zero_grad()
        return tl

    train(5)
    old = read_training_lens(tmp_path / "tlens", "steps")
    assert sorted((tmp_path / "tlens" / "steps").glob("part-*")) == [
        tmp_path / "tlens" / "steps" / f"part-{first:06d}.parquet" for first in (1, 3, 5)]
    with pytest.warns(UserWarning, match=r"held 2 sampled steps after this lens's start \(steps 4-5, start 3"):
        train(2, start_step=3)
    new = read_training_lens(tmp_path / "tlens", "steps")
    key = ["step", "layer", "module", "source"]
    assert new.groupby(key).size().max() == 1 and sorted(set(new.step)) == [1, 2, 3, 4, 5]
    kept = new[new.step <= 3].set_index(key).norm
    pd.testing.assert_series_equal(kept, old[old.step <= 3].set_index(key).norm)
    assert not new[new.step == 4].set_index(key).norm.equals(old[old.step == 4].set_index(key).norm)
    rows = read_training_lens(tmp_path / "tlens", "rows")
    assert rows.groupby(key + ["direction", "list", "rank"]).size().max() == 1
