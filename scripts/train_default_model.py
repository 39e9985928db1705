"""Train the embedded default model (small GPT-2) on the true facts of CounterFact records 0-1,999.

    python scripts/train_default_model.py [--epochs E] [--out DIR] [--resume]

Plain next-token language modelling on the 6,000 sentences of ``fact_texts`` (prompt, paraphrase
and neighbourhood prompt, each followed by its true object), loss on every real token, padding
masked out, no BOS token. AdamW + warmup/cosine schedule, fp32 (``--bf16`` for bf16 autocast only
on CPUs with native bf16: on AVX2-only CPUs it is ~50x slower). Deterministic (seeded; the shuffle
of each epoch comes from a generator seeded by (seed, epoch); no dropout).

Speed (CPU): the LM head runs only at real (non-padding) positions, batches are length-bucketed,
and by default (``--softmax train-vocab``) the softmax of each step runs over the 7,383 tokens
that occur in the training sentences plus ``--neg-samples`` uniformly drawn other tokens as
negatives, ~3x cheaper than the full 50,257-token softmax (``--softmax full``). The shipped model
is an ordinary full-vocabulary GPT-2; scripts/default_model_quality.py measures it with the full softmax.

A resumable checkpoint (model, optimizer, scheduler, epoch, RNG states) is written atomically to
``<out>/checkpoint.pt`` after every epoch; at the end ``config.json`` + ``model.safetensors``
(bf16) and the tokenizer are written to ``--model-dir`` (default: ``out/default_model``, a new folder: the shipped
model is never overwritten unless named explicitly) with ``training_info.json``
(command, wall time, loss and accuracy history).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from _default_model import TRAIN_RECORDS, first_token_top1

from blens_fast._io import atomic_write, atomic_write_text, make_folder
from blens_fast.counterfact import fact_queries
from blens_fast.default_model import load_default_tokenizer
from blens_fast.records import fact_texts, load_counterfact

IGNORE = -100


def build_model(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=50257,
        n_positions=args.n_positions,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=50256,
        eos_token_id=50256,
        pad_token_id=50256,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


def epoch_batches(token_lists, batch_size, generator, bucket=16):
    """Shuffled, length-bucketed batches of indices: shuffle, sort each chunk of
    ``batch_size * bucket`` sentences by length, cut it into batches, shuffle the batches."""
    order = torch.randperm(len(token_lists), generator=generator).tolist()
    batches = []
    chunk = batch_size * bucket
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: len(token_lists[i]))
        batches.extend(part[j : j + batch_size] for j in range(0, len(part), batch_size))
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def pad_batch(token_lists, idx, pad_id):
    """(input_ids, labels) padded on the right to the batch's longest sequence; labels of
    padding are IGNORE."""
    seqs = [token_lists[i] for i in idx]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
        labels[row, : len(s)] = torch.tensor(s)
    return ids, labels


def lm_loss(model, ids, labels, candidates=None, cand_index=None):
    """Mean next-token cross-entropy over the real tokens. The LM head runs only where a real
    token is predicted (padding costs no vocabulary projection).

    With ``candidates`` (a 1-D tensor of token ids containing every target token) the softmax
    runs over those tokens only, ``cand_index`` mapping a vocabulary id to its position in
    ``candidates``; without, over the full vocabulary."""
    hidden = model.transformer(input_ids=ids, attention_mask=(labels != IGNORE).long()).last_hidden_state[:, :-1]
    tgt = labels[:, 1:]
    keep = tgt != IGNORE
    h = hidden[keep]
    tgt = tgt[keep]
    if candidates is None:
        logits = model.lm_head(h)
    else:
        weight = model.lm_head.weight.index_select(0, candidates)
        logits = h @ weight.t()
        tgt = cand_index[tgt]
    return F.cross_entropy(logits.float(), tgt), int(keep.sum())


def step_candidates(train_vocab, vocab_size, n_neg, generator):
    """Training vocabulary plus ``n_neg`` uniform random other tokens (as negatives), and the
    id -> position lookup."""
    if n_neg > 0:
        outside = torch.ones(vocab_size, dtype=torch.bool)
        outside[train_vocab] = False
        others = outside.nonzero().squeeze(1)
        pick = others[torch.randperm(len(others), generator=generator)[:n_neg]]
        cand = torch.cat([train_vocab, pick])
    else:
        cand = train_vocab
    index = torch.full((vocab_size,), -1, dtype=torch.long)
    index[cand] = torch.arange(len(cand))
    return cand, index


def lr_lambda_factory(warmup_steps, total_steps, min_ratio):
    def lr_lambda(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return lr_lambda


def evaluate(model, tok, records, autocast):
    prompts, objects = fact_queries(records, "prompt")
    hits = first_token_top1(
        model, tok, prompts, objects, batch_size=250, autocast_dtype=torch.bfloat16 if autocast else None
    )
    return sum(hits) / len(hits)


def default_threads() -> int:
    """Thread count for CPU work here: ``BLENS_THREADS`` or all visible cores."""
    env = os.environ.get("BLENS_THREADS")
    if env:
        return max(1, int(env))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def format_secs(s):
    s = int(s)
    return f"{s // 3600:d}h{(s % 3600) // 60:02d}m{s % 60:02d}s"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--out", default=".cache/default_model_training", help="checkpoint folder (not shipped)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--model-dir", default="out/default_model",
                   help="where the final bf16 weights and the tokenizer go (default: out/default_model; the shipped "
                        "model's folder only when named explicitly)")
    p.add_argument("--max-records", type=int, default=TRAIN_RECORDS, help="train on records [0, N)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--min-lr-ratio", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-positions", type=int, default=128)
    p.add_argument(
        "--softmax",
        choices=["train-vocab", "full"],
        default="train-vocab",
        help="train-vocab: softmax over the tokens of the training sentences plus --neg-samples random "
        "other tokens per step (~3x faster on CPU); full: over the whole 50,257-token vocabulary",
    )
    p.add_argument("--neg-samples", type=int, default=512)
    p.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 autocast (only on CPUs with native bf16, AVX512-BF16/AMX; ~50x SLOWER on AVX2-only CPUs)",
    )
    p.add_argument("--eval-every", type=int, default=5, help="epochs between top-1 evaluations")
    p.add_argument("--log-every", type=int, default=20, help="steps between progress lines")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all visible cores)")
    p.add_argument(
        "--stop-after", type=int, default=None, help="exit after this many epochs (tests resuming)"
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    command = "python scripts/train_default_model.py" + (
        " " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        if (argv if argv is not None else sys.argv[1:])
        else ""
    )
    torch.set_num_threads(args.threads or default_threads())
    autocast = args.bf16
    out = make_folder(args.out, "--out")
    ckpt_path = out / "checkpoint.pt"

    random.seed(args.seed)
    torch.manual_seed(args.seed)

    tok = load_default_tokenizer()
    records = load_counterfact()[: args.max_records]
    texts = fact_texts(records)
    token_lists = [tok(t).input_ids for t in texts]
    too_long = max(len(t) for t in token_lists)
    if too_long > args.n_positions:
        raise ValueError(f"a fact sentence has {too_long} tokens > n_positions={args.n_positions}")
    n_tokens_epoch = sum(len(t) for t in token_lists)
    vocab_size = len(tok)
    if args.softmax == "train-vocab":
        train_vocab = torch.tensor(sorted({x for t in token_lists for x in t}), dtype=torch.long)
    else:
        train_vocab = None
    steps_per_epoch = len(epoch_batches(token_lists, args.batch_size, torch.Generator().manual_seed(0)))
    total_steps = steps_per_epoch * args.epochs

    model = build_model(args)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda_factory(args.warmup_steps, total_steps, args.min_lr_ratio)
    )

    start_epoch = 0
    elapsed_before = 0.0
    history = []
    if args.resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume given but {ckpt_path} does not exist")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        for key in ("epochs", "max_records", "batch_size", "seed", "n_layer", "n_embd", "softmax"):
            if ckpt["args"][key] != getattr(args, key):
                raise ValueError(
                    f"--resume: checkpoint was made with {key}={ckpt['args'][key]}, now {getattr(args, key)}"
                )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["torch_rng"])
        random.setstate(ckpt["python_rng"])
        start_epoch = ckpt["epoch"]
        elapsed_before = ckpt["elapsed_s"]
        history = ckpt["history"]
        print(f"resumed from {ckpt_path} after epoch {start_epoch} ({format_secs(elapsed_before)} so far)")

    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"default model: GPT-2 n_layer={args.n_layer} n_embd={args.n_embd} n_head={args.n_head} "
        f"({n_params / 1e6:.1f}M params, tied); {len(records)} records -> {len(texts)} sentences, "
        f"{n_tokens_epoch} tokens/epoch, {steps_per_epoch} steps/epoch, {args.epochs} epochs, "
        f"threads={torch.get_num_threads()}, autocast={'bf16' if autocast else 'off'}, softmax={args.softmax}"
        + (f" ({len(train_vocab)} training tokens + {args.neg_samples} sampled)" if train_vocab is not None else ""),
        flush=True,
    )

    pad_id = tok.pad_token_id
    session_start = time.time()
    session_steps = 0
    model.train()
    for epoch in range(start_epoch, args.epochs):
        gen = torch.Generator().manual_seed(args.seed * 100003 + epoch)
        batches = epoch_batches(token_lists, args.batch_size, gen)
        ep_loss_sum, ep_tok = 0.0, 0
        win_tok, win_t0 = 0, time.time()
        for step, idx in enumerate(batches):
            ids, labels = pad_batch(token_lists, idx, pad_id)
            if train_vocab is not None:
                cand, cand_index = step_candidates(train_vocab, vocab_size, args.neg_samples, gen)
            else:
                cand = cand_index = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss, n_tgt = lm_loss(model, ids, labels, cand, cand_index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            session_steps += 1

            ep_loss_sum += loss.item() * n_tgt
            ep_tok += n_tgt
            win_tok += int((labels != IGNORE).sum())
            if (step + 1) % args.log_every == 0 or step + 1 == steps_per_epoch:
                now = time.time()
                done = epoch * steps_per_epoch + step + 1
                rate = (now - session_start) / session_steps
                eta = rate * (total_steps - done)
                print(
                    f"epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps_per_epoch} "
                    f"loss {ep_loss_sum / ep_tok:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                    f"{win_tok / max(1e-9, now - win_t0):.0f} tok/s ETA {format_secs(eta)}",
                    flush=True,
                )
                win_tok, win_t0 = 0, time.time()

        epoch_loss = ep_loss_sum / ep_tok
        entry = {"epoch": epoch + 1, "loss": epoch_loss}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            t0 = time.time()
            acc = evaluate(model, tok, records, autocast)
            entry["top1_prompt"] = acc
            print(
                f"== epoch {epoch + 1}: loss {epoch_loss:.4f}, top-1 first object token on "
                f"{len(records)} training prompts: {acc:.2%} (eval {time.time() - t0:.1f}s)",
                flush=True,
            )
        history.append(entry)
        elapsed = elapsed_before + (time.time() - session_start)
        atomic_write(ckpt_path, lambda tmp: torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
                "elapsed_s": elapsed,
                "history": history,
                "args": vars(args),
            },
            tmp,
        ))
        print(f"checkpoint saved: {ckpt_path} (epoch {epoch + 1}, {format_secs(elapsed)} elapsed)", flush=True)
        if args.stop_after is not None and epoch + 1 >= args.stop_after and epoch + 1 < args.epochs:
            print(f"--stop-after {args.stop_after}: stopping; continue with --resume", flush=True)
            return

    wall = elapsed_before + (time.time() - session_start)
    if start_epoch >= args.epochs:
        print("checkpoint already holds the final epoch; writing the model")
    save_final(model, args, history, wall, command)


def save_final(model, args, history, wall, command):
    model_dir = make_folder(args.model_dir, "--model-dir")
    model = model.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(str(model_dir), safe_serialization=True)
    load_default_tokenizer().save_pretrained(str(model_dir))  # the folder loads as `--model DIR` on its own
    weights = model_dir / "model.safetensors"
    size_mb = weights.stat().st_size / 1e6
    last = history[-1] if history else {}
    info = {
        "command": command,
        "wall_time_s": round(wall, 1),
        "finished_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "final_epoch_loss": last.get("loss"),
        "final_top1_prompt": last.get("top1_prompt"),
        "weights_mb": round(size_mb, 2),
        "machine": f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__.split('+')[0]}",
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "model_dir", "resume", "stop_after")},
        "history": history,
    }
    atomic_write_text(model_dir / "training_info.json", json.dumps(info, indent=2) + "\n")
    print(
        f"saved {weights} ({size_mb:.1f} MB, bf16) + config.json; wall time {format_secs(wall)}; "
        f"final loss {info['final_epoch_loss']:.4f}; top-1 {info['final_top1_prompt']}",
        flush=True,
    )


if __name__ == "__main__":
    main()
