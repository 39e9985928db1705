"""The training lens in the transformers Trainer: its scalars reach the Trainer's logs (ahead of the loggers), its
steps are the Trainer's, and it reads the step the optimizer takes (gradient accumulation, AdamW, the Trainer's
gradient clipping measured as the scale)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
import transformers

import blens_fast as bl

from ..helpers import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

FACTS = ["The Eiffel Tower is in Paris", "Danielle Darrieux speaks French", "Rome is the capital of Italy",
         "The Louvre is in Paris", "Toyota was founded in Japan", "Ice is cold"]


class Recorder(transformers.TrainerCallback):
    """A logger: keeps every logs dict it is handed."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def trainer_for(model, tokenizer, tmp_path, callbacks, **arguments):
    data = [dict(tokenizer(text)) for text in FACTS]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=2, max_steps=4, logging_steps=2,
        learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0, **arguments)
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=collator,
                                processing_class=tokenizer, callbacks=callbacks)


def test_callback_logs_rows_and_steps(tokenizer, tmp_path):
    model = make_tiny_model("gpt2").train()
    recorder = Recorder()
    callback = bl.integrations.BackwardLensCallback(every=2, k=3, rank=2, out=tmp_path / "tlens",
                                                    track=[("The Eiffel Tower is in", " Paris")])
    trainer = trainer_for(model, tokenizer, tmp_path, [recorder, callback], gradient_accumulation_steps=2)
    trainer.train()
    logged = [logs for logs in recorder.logs if "blens/step" in logs]
    assert [logs["blens/step"] for logs in logged] == [2.0, 4.0]  # the Trainer's global_step, at its log steps
    assert "blens/L1/mlp.out/grad_norm" in logged[0] and "blens/track0/L0/target_rank" in logged[0]
    assert any("blens/step" in entry for entry in trainer.state.log_history)
    steps = bl.read_training_lens(tmp_path / "tlens", "steps")
    assert sorted(set(steps.step)) == [2, 4]
    gradient = steps[steps.source.astype(str) == "gradient"]
    assert gradient.consistency.max() < 1e-4  # both micro-batches of each step were read
    assert set(steps.source.astype(str)) == {"gradient", "change"}  # the Trainer's AdamW: its change is read too
    rows = pd.read_parquet(tmp_path / "tlens" / "rows")
    assert set(rows.list.astype(str)) == {"ff1_top", "ff2_bottom", "ff2_top"}
    assert (tmp_path / "tlens" / "timeline_mlp.out.png").is_file()
    assert not any(m._forward_hooks for m in model.modules())


def test_callback_reads_the_clipped_gradient_with_checkpointing_and_bf16(tokenizer, tmp_path):
    """max_grad_norm clips: the scale says by how much; gradient checkpointing recomputes: counted once (the factor
    sum is the gradient, consistency small); bf16 autocast."""
    model = make_tiny_model("gpt2").train()
    callback = bl.integrations.BackwardLensCallback(every=1, k=3, rank=2, out=tmp_path / "tlens")
    trainer = trainer_for(model, tokenizer, tmp_path, [callback], max_grad_norm=1e-3, gradient_checkpointing=True,
                          bf16=True)
    trainer.train()
    steps = bl.read_training_lens(tmp_path / "tlens", "steps")
    gradient = steps[steps.source.astype(str) == "gradient"]
    assert sorted(set(gradient.step)) == [1, 2, 3, 4]
    assert gradient.consistency.max() < 1e-2
    assert (gradient.scale > 10).all()  # clipped to a norm of 1e-3: the optimizer read the gradient scaled down
    norms = gradient.groupby("step").norm.apply(lambda n: float((n ** 2).sum()) ** 0.5)
    assert (norms <= 1e-3 * 1.01).all()


def test_callback_refuses_a_model_of_its_own_and_needs_a_tokenizer(tokenizer, tmp_path):
    with pytest.raises(TypeError, match="model="):
        bl.integrations.BackwardLensCallback(model=torch.nn.Linear(2, 2))
    model = make_tiny_model("gpt2").train()
    trainer = trainer_for(model, tokenizer, tmp_path, [bl.integrations.BackwardLensCallback(every=1)])
    trainer.processing_class = None
    trainer.callback_handler.processing_class = None
    with pytest.raises(ValueError, match="processing_class=tokenizer"):
        trainer.train()


class Interrupt(transformers.TrainerCallback):
    """Interrupts the first training at its first step, as a KeyboardInterrupt in a notebook does."""

    def __init__(self):
        self.fired = False

    def on_step_end(self, args, state, control, **kwargs):
        if not self.fired:
            self.fired = True
            raise KeyboardInterrupt


def test_an_interrupted_training_started_again_leaves_one_lens(tokenizer, tmp_path):
    """train() interrupted (no on_train_end) and called again: the callback closes its first lens (its rows written)
    before the second starts, so each step is hooked once and no hook is left; the second run counts from 0 again, so
    the first run's step 1 is dropped with a warning and taken again (the folder never mixes the two runs)."""
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    hooks = len(_global_optimizer_pre_hooks), len(_global_optimizer_post_hooks)
    model = make_tiny_model("gpt2").train()
    callback = bl.integrations.BackwardLensCallback(every=1, k=3, rank=2, out=tmp_path / "tlens")
    trainer = trainer_for(model, tokenizer, tmp_path, [callback, Interrupt()])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    # the interrupted lens's step 1 is written when the callback closes it, then dropped by the new run
    with pytest.warns(UserWarning, match=r"held 1 sampled steps after this lens's start \(steps 1-1, start 0"):
        trainer.train()
    assert (len(_global_optimizer_pre_hooks), len(_global_optimizer_post_hooks)) == hooks
    steps = bl.read_training_lens(tmp_path / "tlens", "steps")
    assert steps.groupby(["step", "layer", "module", "source"]).size().max() == 1  # each step read once
    assert sorted(set(steps.step)) == [1, 2, 3, 4]


def test_a_second_lens_on_the_same_weights_is_refused_until_the_first_closes(tokenizer):
    model = make_tiny_model("gpt2").train()
    first = bl.TrainingLens(model, tokenizer, every=1).start()
    with pytest.raises(RuntimeError, match="another TrainingLens .* still started on these weights: close it first"):
        bl.TrainingLens(model, tokenizer, every=1).start()
    bl.TrainingLens(make_tiny_model("gpt2"), tokenizer, every=1).start().close()  # another model's weights: fine
    first.close()
    bl.TrainingLens(model, tokenizer, every=1).start().close()
