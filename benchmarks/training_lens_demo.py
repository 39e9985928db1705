"""The README's training-lens demonstration: fine-tune the shipped model with transformers' Trainer on CounterFact
counterfactuals (each record's prompt followed by its new object, ``target_new``; only the object is scored) under
``bl.integrations.BackwardLensCallback``, and show how the new objects enter FF2's update lists, layer by layer and
step by step.

Writes benchmarks/results/training_lens_demo.png (the picture), training_lens_demo.json and .md (the numbers, the
first steps' lists) and the lens's own folder (--lens-out, default out/training_lens_demo: Parquet tables and
timelines).

    python benchmarks/training_lens_demo.py [--records 32] [--epochs 8] [--threads 1]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import RESULTS, machine_info, markdown_table, write_result

import blens_fast as bl
from blens_fast._io import atomic_write_bytes
from blens_fast._report import figure_png, pyplot

TRACKED = 4


def dataset(tokenizer, records) -> list[dict]:
    """Token ids of ``prompt + " " + target_new`` with labels only on the new object's tokens."""
    rows = []
    for r in records:
        prompt = tokenizer(r["prompt"])["input_ids"]
        target = tokenizer(" " + r["target_new"])["input_ids"]
        rows.append({"input_ids": prompt + target, "labels": [-100] * len(prompt) + target})
    return rows


def collate(pad_id: int):
    def collate_fn(rows):
        width = max(len(r["input_ids"]) for r in rows)
        pad = lambda values, fill: values + [fill] * (width - len(values))  # noqa: E731
        return {"input_ids": torch.tensor([pad(r["input_ids"], pad_id) for r in rows]),
                "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows]),
                "labels": torch.tensor([pad(r["labels"], -100) for r in rows])}
    return collate_fn


def top1(ctx, records) -> float:
    """Share of records whose new object's first token is the model's top prediction after the prompt."""
    model, tokenizer = ctx
    hits = 0
    with torch.no_grad():
        for r in records:
            ids = torch.tensor([tokenizer(r["prompt"])["input_ids"]])
            target = tokenizer(" " + r["target_new"])["input_ids"][0]
            hits += int(model.eval()(input_ids=ids).logits[0, -1].argmax()) == target
    return hits / len(records)


def fine_tune(ctx, records, epochs: int, lens_out: Path, seed: int = 0) -> tuple[bl.TrainingLens, list[dict]]:
    import transformers

    model, tokenizer = ctx
    args = transformers.TrainingArguments(
        output_dir=str(lens_out / "trainer"), per_device_train_batch_size=8, num_train_epochs=epochs,
        learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=seed, dataloader_num_workers=0)
    track = [(r["prompt"], " " + r["target_new"]) for r in records[:TRACKED]]
    callback = bl.integrations.BackwardLensCallback(every=1, k=10, rank=4, track=track, out=lens_out)
    trainer = transformers.Trainer(model=model.train(), args=args, train_dataset=dataset(tokenizer, records),
                                   data_collator=collate(ctx.pad_id), processing_class=tokenizer,
                                   callbacks=[callback])
    trainer.train()
    return callback.lens, trainer.state.log_history


def new_object_hits(rows, ctx, records):
    """Per (step, layer): how many distinct new objects (first tokens) are among the step's promoted tokens at FF2
    (``ff2_bottom`` of its top directions), and how many of those lists' tokens are new objects."""
    targets = {ctx.tokenizer(" " + r["target_new"])["input_ids"][0] for r in records}
    promoted = rows[(rows.source.astype(str) == "gradient") & (rows.list.astype(str) == "ff2_bottom")]
    hits = promoted[promoted.token_id.isin(targets)]
    return hits.groupby(["layer", "step"]).token_id.nunique().unstack(fill_value=0).reindex(
        columns=sorted(promoted.step.unique()), fill_value=0)


def picture(hits, tracked, history, records) -> bytes:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(19, 4.6))
    image = axes[0].imshow(hits.to_numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    axes[0].set(title=f"new objects (of {len(records)}; 8 per batch) among FF2's promoted tokens\n(ff2_bottom, "
                      "top-4 directions x 10 tokens, of each step's gradient)", xlabel="step", ylabel="layer",
                yticks=range(len(hits.index)), yticklabels=[str(i) for i in hits.index])
    ticks = list(range(0, hits.shape[1], max(1, hits.shape[1] // 10)))
    axes[0].set_xticks(ticks, [str(hits.columns[i]) for i in ticks])
    fig.colorbar(image, ax=axes[0], fraction=0.04)
    first = tracked[tracked["rank"] == 1]
    grid = first.pivot_table(index=["track", "layer"], columns="step", values="target_rank")
    image = axes[1].imshow(grid.transform("log10").to_numpy(), aspect="auto", cmap="viridis_r", vmin=0,
                           interpolation="nearest")
    labels = [f"{first[first.track == t].target.iloc[0].strip()!r} L{layer}" for t, layer in grid.index]
    axes[1].set(title="tracked prompts: log10 rank of the new object among the tokens\nthe step promotes at FF2 "
                      "(yellow: rank 1; steps whose batch holds the fact)", xlabel="step",
                yticks=range(len(labels)), yticklabels=labels)
    axes[1].tick_params(axis="y", labelsize=7)
    axes[1].set_xticks(ticks, [str(grid.columns[i]) for i in ticks])
    fig.colorbar(image, ax=axes[1], fraction=0.04)
    for track, part in first[first.layer == first.layer.min()].groupby("track"):
        axes[2].plot(part.step, part.target_prob, "o-", ms=2.5, lw=1, label=f"P({part.target.iloc[0].strip()!r})")
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    twin = axes[2].twinx()
    twin.plot([s for s, _ in losses], [v for _, v in losses], color="grey", lw=1, ls="--", label="training loss")
    twin.set_ylabel("training loss (dashed)")
    axes[2].set(title="tracked prompts: P(new object) before each step", xlabel="step", ylabel="probability",
                ylim=(0, 1.02))
    axes[2].legend(fontsize=7, loc="center right")
    fig.suptitle("The training lens while the shipped model learns CounterFact counterfactuals (transformers "
                 "Trainer, AdamW, lr 1e-3, batches of 8)", fontsize=10)
    fig.tight_layout()
    return figure_png(fig, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--lens-out", type=Path, default=Path("out/training_lens_demo"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ctx = bl.load_default_model()
    records = bl.counterfact.load(n=args.records)
    before = top1(ctx, records)
    lens, history = fine_tune(ctx, records, args.epochs, args.lens_out)
    after = top1(ctx, records)
    rows, tracked = lens.to_pandas("rows"), lens.to_pandas("tracked")
    hits = new_object_hits(rows, ctx, records)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "training_lens_demo.png", picture(hits, tracked, history, records))
    last = hits.index.max()
    leading = rows[(rows.source.astype(str) == "gradient") & (rows.list.astype(str) == "ff2_bottom")
                   & (rows.direction == 1) & (rows.layer == last) & (rows["rank"] <= 5)]
    first_steps = (leading[leading.step <= 8].groupby("step").token.apply(lambda t: ", ".join(map(repr, t)))
                   .reset_index(name=f"layer {last}: most promoted tokens, leading direction"))
    first = tracked[(tracked["rank"] == 1)]
    entry = first[first.target_rank <= 10].groupby(["track", "layer"]).step.min().unstack()
    result = {"demo": "training lens on CounterFact counterfactuals", "records": args.records, "epochs": args.epochs,
              "steps": int(rows.step.max()), "top1_new_object_before": before, "top1_new_object_after": after,
              "new_objects_in_ff2_lists_per_layer_mean": hits.mean(axis=1).round(2).to_dict(),
              "new_objects_in_ff2_lists_per_layer_first_step": hits.iloc[:, 0].to_dict(),
              "tracked_first_step_in_top10": {f"track {t}": {f"layer {l}": (None if v != v else int(v))
                                                              for l, v in row.items()}
                                              for t, row in entry.iterrows()},
              "first_steps": first_steps.to_dict("records"), **machine_info()}
    lines = ["New objects among FF2's promoted tokens per layer (columns: steps):", "",
             markdown_table(hits.reset_index()), "", markdown_table(first_steps)]
    write_result(args.out, "training_lens_demo", result, table_key="first_steps", table=lines)


if __name__ == "__main__":
    main()
