"""Measure the shipped default model's quality on CounterFact.

    python scripts/default_model_quality.py [--out benchmarks/results]

Top-1 accuracy of the first object token (objects scored with their leading space) on
(a) the 2,000 training prompts, (b) their paraphrases, (c) the neighbourhood prompts,
(d) the prompts of records 2,000-2,999 (never seen in training), and (e) token perplexity
(full 50,257-token softmax) on the fact sentences of the training records and of the unseen
records. Writes ``default_model_quality.json`` and ``default_model_quality.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _default_model import TRAIN_RECORDS, UNSEEN_RECORDS, first_token_top1

from blens_fast._io import atomic_write_json, atomic_write_text, make_folder
from blens_fast.context import load_model
from blens_fast.counterfact import fact_queries
from blens_fast.default_model import MODEL_DIR
from blens_fast.records import fact_texts, load_counterfact


@torch.no_grad()
def perplexity(model, tokenizer, texts, batch_size=128):
    """Token perplexity of ``texts`` (every token after the first, full-vocabulary softmax)."""
    nll_sum, n_tok = 0.0, 0
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start : start + batch_size]), padding=True, return_tensors="pt")
        ids, mask = enc.input_ids, enc.attention_mask.bool()
        hidden = model.transformer(input_ids=ids, attention_mask=enc.attention_mask).last_hidden_state[:, :-1]
        keep = mask[:, 1:]
        logits = model.lm_head(hidden[keep]).float()
        nll_sum += F.cross_entropy(logits, ids[:, 1:][keep], reduction="sum").item()
        n_tok += int(keep.sum())
    return math.exp(nll_sum / n_tok), n_tok


def measure(model, tok, records):
    train = records[:TRAIN_RECORDS]
    unseen = records[UNSEEN_RECORDS[0] : UNSEEN_RECORDS[1]]
    results = {}

    def top1(recs, kind):
        prompts, objects = fact_queries(recs, kind)
        hits = first_token_top1(model, tok, prompts, objects, batch_size=250)
        return {"accuracy": sum(hits) / len(hits), "correct": sum(hits), "n": len(hits)}

    results["a_train_prompt_top1"] = top1(train, "prompt")
    results["b_train_paraphrase_top1"] = top1(train, "rephrase_prompt")
    results["c_train_neighbourhood_top1"] = top1(train, "locality_prompt")
    results["d_unseen_prompt_top1"] = top1(unseen, "prompt")
    ppl, n = perplexity(model, tok, fact_texts(train))
    results["e_train_sentences_perplexity"] = {"perplexity": ppl, "tokens": n, "sentences": 3 * len(train)}
    ppl, n = perplexity(model, tok, fact_texts(unseen))
    results["e_unseen_sentences_perplexity"] = {"perplexity": ppl, "tokens": n, "sentences": 3 * len(unseen)}
    return results


ROWS = [
    ("a_train_prompt_top1", "(a) training prompts (`prompt`, records 0-1,999)"),
    ("b_train_paraphrase_top1", "(b) their paraphrases (`rephrase_prompt`)"),
    ("c_train_neighbourhood_top1", "(c) neighbourhood prompts (`locality_prompt` -> `locality_ground_truth`)"),
    ("d_unseen_prompt_top1", "(d) unseen records 2,000-2,999 (`prompt`)"),
]


def to_markdown(report):
    r = report["results"]
    lines = [
        "# Default model quality (CounterFact, true facts)",
        "",
        f"Model: `blens_fast/default_model/model.safetensors` ({report['model']['weights_mb']:.1f} MB, bf16; "
        f"GPT-2 n_layer={report['model']['n_layer']}, n_embd={report['model']['n_embd']}, "
        f"{report['model']['params_m']:.1f}M parameters, tied embeddings), evaluated in fp32. "
        f"Machine: {report['machine']}. Measured {report['date_utc']} UTC in {report['eval_seconds']:.0f} s "
        f"with `{report['command']}`.",
        "",
        "| Measure | Value | n |",
        "|---|---:|---:|",
    ]
    for key, label in ROWS:
        x = r[key]
        lines.append(f"| {label}: top-1 first object token | {x['accuracy']:.1%} ({x['correct']}) | {x['n']} |")
    for key, label in [
        ("e_train_sentences_perplexity", "(e) perplexity, training fact sentences"),
        ("e_unseen_sentences_perplexity", "(e) perplexity, unseen records' fact sentences"),
    ]:
        x = r[key]
        lines.append(f"| {label} | {x['perplexity']:.2f} | {x['tokens']} tokens |")
    lines += [
        "",
        "Top-1: the argmax next token after the prompt equals the first token of `\" \" + object`. "
        "Perplexity: per token over every token after the first of `prompt + \" \" + object` sentences "
        "(prompt, paraphrase and neighbourhood sentence of each record), full 50,257-token softmax. "
        "No BOS token is prepended (the model was trained without one).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--model-dir", default=str(MODEL_DIR))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.time()
    model, tok = load_model(args.model_dir)
    records = load_counterfact()
    results = measure(model, tok, records)
    elapsed = time.time() - t0

    weights = Path(args.model_dir) / "model.safetensors"
    cfg = model.config
    report = {
        "command": " ".join(["python scripts/default_model_quality.py"] + list(sys.argv[1:] if argv is None else argv)),
        "machine": f"CPU, 2 cores, torch {torch.__version__.split('+')[0]}",
        "cpu": platform.processor() or platform.machine(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "eval_seconds": round(elapsed, 1),
        "model": {
            "weights_mb": weights.stat().st_size / 1e6,
            "n_layer": cfg.n_layer,
            "n_embd": cfg.n_embd,
            "n_head": cfg.n_head,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        },
        "data": "blens_fast/data/counterfact/counterfact-edit.json; training records 0-1999, unseen 2000-2999",
        "results": results,
    }
    out = make_folder(args.out, "--out")
    atomic_write_json(out / "default_model_quality.json", report)
    atomic_write_text(out / "default_model_quality.md", to_markdown(report))
    print(to_markdown(report))


if __name__ == "__main__":
    main()
