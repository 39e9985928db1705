"""Prompts and targets -> tokenized examples, padded batches, and the loss each example is scored by.

User text is always text: a literal ``<|endoftext|>`` typed in a prompt is tokenized as the characters it is made
of, never as the special token (only the tokenizer's own ``add_special_tokens``, e.g. Llama's BOS, adds those).
A target that does not start with whitespace gets one leading space (CounterFact scores objects as `` Paris``).

Two loss definitions (``loss=``):

* ``"teacher_forced"`` (default): the model reads ``prompt + target[:-1]`` and the loss is
  ``-sum_j log p(target_j | prompt, target_<j)``; ranks refer to the target's **first** token.
* ``"last_position"`` (the paper authors' code): the model reads the prompt only, every target token is scored at
  the prompt's last position, ``-sum_j log p(target_j | prompt)``; ranks refer to the target's **last** token.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._checks import as_str_list, check_choice
from ._ui import plural

LOSSES = ("teacher_forced", "last_position")


@dataclass(frozen=True)
class Example:
    """One tokenized (prompt, target) pair and the loss it is scored by."""

    prompt: str
    target: str
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    loss: str = "teacher_forced"

    @property
    def input_ids(self) -> tuple[int, ...]:
        """What the model reads."""
        if self.loss == "last_position":
            return self.prompt_ids
        return self.prompt_ids + self.target_ids[:-1]

    @property
    def num_tokens(self) -> int:
        """Positions the model reads, all of which carry gradient."""
        return len(self.input_ids)

    @property
    def scored(self) -> tuple[tuple[int, int], ...]:
        """``(position, token)`` for every term of the loss: the token whose log-probability at that position is
        summed."""
        last = len(self.prompt_ids) - 1
        if self.loss == "last_position":
            return tuple((last, t) for t in self.target_ids)
        return tuple((last + j, t) for j, t in enumerate(self.target_ids))

    @property
    def loss_positions(self) -> tuple[int, ...]:
        """The distinct positions whose prediction the loss scores, ascending."""
        return tuple(sorted({p for p, _ in self.scored}))

    @property
    def rank_token(self) -> int:
        """The target token whose rank the lens reports (first target token, or the last for ``last_position``)."""
        return self.target_ids[-1] if self.loss == "last_position" else self.target_ids[0]


def encode(tokenizer, text: str, *, special: bool) -> tuple[int, ...]:
    """Token ids of ``text`` with special-token strings in it treated as plain text; ``special`` adds the
    tokenizer's own special tokens (e.g. a BOS)."""
    try:
        ids = tokenizer(text, add_special_tokens=special, split_special_tokens=True)["input_ids"]
    except TypeError:  # a tokenizer without split_special_tokens: its plain behaviour
        ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    return tuple(int(i) for i in ids)


def tokenize_examples(tokenizer, prompts, targets, *, max_positions: int | None = None,
                      loss: str = "teacher_forced") -> list[Example]:
    """Validate and tokenize prompts and targets (one target per prompt); errors name the bad item."""
    prompts = as_str_list(prompts, "prompts")
    targets = as_str_list(targets, "targets")
    check_choice(loss, "loss", LOSSES)
    if len(prompts) != len(targets):
        raise ValueError(f"got {plural(len(prompts), 'prompt')} but {plural(len(targets), 'target')}: expected one "
                         "target per prompt")
    examples = []
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        target_text = target if target[:1].isspace() else " " + target
        prompt_ids = encode(tokenizer, prompt, special=True)
        target_ids = encode(tokenizer, target_text, special=False)
        if not prompt_ids:
            raise ValueError(f"prompts[{i}] ({prompt!r}) tokenizes to no tokens")
        if not target_ids:
            raise ValueError(f"targets[{i}] ({target!r}) tokenizes to no tokens")
        example = Example(prompt, target, prompt_ids, target_ids, loss)
        if max_positions is not None and example.num_tokens > max_positions:
            raise ValueError(f"example {i} is {example.num_tokens} tokens long: the model reads at most "
                             f"{max_positions}")
        examples.append(example)
    return examples


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (right padding keeps every real position's index, and a
    causal model's real positions never attend to the padding on their right)."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return ids.to(device), mask.to(device)


def token_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None, *,
                  by_length: bool = False) -> list[list[int]]:
    """Indices of ``lengths`` cut into batches of at most ``batch_size`` items and ``max_tokens`` padded tokens
    (items x the batch's longest; an item longer than ``max_tokens`` goes alone). ``by_length`` sorts the items
    by length first (stable), so that batches pad less; otherwise batches are consecutive in the input order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i]) if by_length else range(len(lengths))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        wider = max(longest, lengths[i])
        if current and (len(current) == batch_size or (max_tokens is not None
                                                       and wider * (len(current) + 1) > max_tokens)):
            batches.append(current)
            current, wider = [], lengths[i]
        current.append(i)
        longest = wider
    if current:
        batches.append(current)
    return batches


def loss_positions(examples: Sequence[Example]) -> list[int]:
    """The sorted positions where some example of the batch has a loss term."""
    return sorted({p for e in examples for p in e.loss_positions})


def target_log_probs(logits: torch.Tensor, examples: Sequence[Example], positions: Sequence[int] | None = None
                     ) -> torch.Tensor:
    """Per example, the sum of its loss terms' log-probabilities (see :class:`Example`), computed in
    ``promote_types(logits.dtype, float32)`` (float64 models keep float64).

    ``logits``: ``batch x positions x V``; ``positions`` names the sequence position of each logits column when the
    model computed only some (see :func:`loss_positions`), None when it computed all.
    """
    column = None if positions is None else {p: i for i, p in enumerate(positions)}
    rows, cols, tokens = [], [], []
    for row, e in enumerate(examples):
        for position, token in e.scored:
            rows.append(row)
            cols.append(position if column is None else column[position])
            tokens.append(token)
    device = logits.device
    dtype = torch.promote_types(logits.dtype, torch.float32)
    rows_t = torch.tensor(rows, device=device)
    picked = logits[rows_t, torch.tensor(cols, device=device)].to(dtype).log_softmax(-1)
    token_lp = picked[torch.arange(len(tokens), device=device), torch.tensor(tokens, device=device)]
    return torch.zeros(len(examples), device=device, dtype=dtype).index_add(0, rows_t, token_lp)
