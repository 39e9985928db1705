"""The training lens in the ``transformers`` ``Trainer``: a ``TrainerCallback`` over :class:`~blens_fast.TrainingLens`.

::

    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      callbacks=[bl.integrations.BackwardLensCallback(every=10, out="out/tlens")])
    trainer.train()

The lens starts when training does (on the Trainer's own model, with its tokenizer) and stops when it ends; its
steps are the Trainer's ``global_step`` (a resumed run goes on counting). At each log the last sampled step's
summaries (``blens/L<layer>/<module>/grad_norm``, ``top_singular_value``, ``stable_rank``, ``error_bar``,
``change_norm``, and ``blens/track<i>/...`` for tracked prompts) go into the Trainer's ``logs``, so the loggers it
reports to (TensorBoard, W&B, MLflow, the console) show them with no code of their own: the callback puts itself
ahead of them in the Trainer's callback list. They are kept in ``state.log_history`` (``trainer_state.json``) too.
Under ``torchrun`` every rank runs the lens and rank 0 writes.
"""
from __future__ import annotations

import sys
import warnings

from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from ..training import TrainingLens


class BackwardLensCallback(TrainerCallback):
    """A ``TrainerCallback`` that runs a :class:`~blens_fast.TrainingLens` over training; keyword arguments as
    :class:`~blens_fast.TrainingLens` (``modules``, ``layers``, ``every``, ``k``, ``rank``, ``track``, ``change``,
    ``out``, ...); ``tokenizer`` when the Trainer has no ``processing_class``. ``lens`` is the running (or last)
    lens."""

    def __init__(self, *, tokenizer=None, **options):
        for name in ("model", "start_step"):
            if name in options:
                raise TypeError(f"BackwardLensCallback takes no {name}=: the Trainer's own is used")
        self.tokenizer = tokenizer
        self.options = options
        self.lens: TrainingLens | None = None

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._go_first()
        if self.lens is not None:  # a training that ended without on_train_end (interrupted): its rows kept
            self.lens.close(report=False)
        tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
        if tokenizer is None:
            raise ValueError("BackwardLensCallback needs the model's tokenizer: give the Trainer "
                             "processing_class=tokenizer, or the callback tokenizer=tokenizer")
        self.lens = TrainingLens(model, tokenizer, start_step=state.global_step, **self.options)
        self.lens.start()

    def on_step_end(self, args, state, control, **kwargs):
        self.lens.set_step(state.global_step)  # counts a step a GradScaler skipped, as the Trainer does

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self.lens is None:
            return
        scalars = self.lens.pop_scalars()
        logs.update(scalars)
        history = state.log_history
        if scalars and history and history[-1].get("step") == state.global_step:
            history[-1].update(scalars)  # the Trainer recorded this log before the callbacks ran: trainer_state.json

    def on_train_end(self, args, state, control, **kwargs):
        if self.lens is not None:
            self.lens.close()

    def _go_first(self) -> None:
        """Move this callback ahead of the reporting callbacks (which the Trainer lists before the user's), so that
        the scalars it adds to ``logs`` reach them. The handler is the caller of this event."""
        frame = sys._getframe(1)
        while frame is not None and not isinstance(frame.f_locals.get("self"), CallbackHandler):
            frame = frame.f_back
        handler = frame.f_locals["self"] if frame is not None else None
        if handler is None or self not in handler.callbacks:
            warnings.warn("BackwardLensCallback was not called by a Trainer's callback handler: loggers listed before "
                          "it will not see the training lens's scalars", stacklevel=3)
            return
        handler.callbacks.remove(self)
        handler.callbacks.insert(0, self)
