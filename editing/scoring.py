"""Teacher-forced probabilities of target strings after prompts: the "before / after" numbers.

A thin, typed front to :mod:`editserve.editing.evaluation.teacher_forcing`, which runs the
model body once per batch and the LM head only at the positions predicting target tokens
(a 262k-vocabulary head is most of Gemma-3's compute). Target tokenization adds the space
between prompt and target ("is" + "Paris" -> "is Paris") and keeps the BOS a model adds
(Gemma) in front of the prompt.

To score an edit before it is applied, call :func:`score` inside
``editserve.editing.artifacts.preview(model, delta)``: the preview hooks are thread-scoped, so
the served weights and other threads' forward passes are untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InvalidRequest
from .evaluation.teacher_forcing import score_continuations


@dataclass(frozen=True)
class TargetScore:
    """One (prompt, target) pair under teacher forcing."""

    token_ids: tuple[int, ...]
    token_logprobs: tuple[float, ...]
    token_matches: tuple[bool, ...]  # argmax == target token at each target position

    @property
    def probability(self) -> float:
        """P(target | prompt): the product of the token probabilities."""
        return math.exp(sum(self.token_logprobs))

    @property
    def mean_logprob(self) -> float:
        return sum(self.token_logprobs) / len(self.token_logprobs)

    @property
    def token_accuracy(self) -> float:
        """EasyEdit-style: share of target tokens that are the model's argmax."""
        return sum(self.token_matches) / len(self.token_matches)


@torch.no_grad()
def score(model, tokenizer, prompts: list[str], targets: list[str], batch_size: int = 16) -> list[TargetScore]:
    """One :class:`TargetScore` per (prompt, target). A target that tokenizes to nothing
    raises :class:`InvalidRequest`."""
    if len(prompts) != len(targets):
        raise InvalidRequest(f"{len(prompts)} prompts but {len(targets)} targets")
    try:
        raw = score_continuations(model, tokenizer, list(prompts), list(targets), batch_size=batch_size)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return [
        TargetScore(tuple(s.token_ids), tuple(s.token_logprobs),
                    tuple(a == t for a, t in zip(s.argmax_ids, s.token_ids, strict=True)))
        for s in raw
    ]
