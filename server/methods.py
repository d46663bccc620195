"""The editing methods this server offers, bound to the served model, and the scorer used
for before/after probabilities in Edit replies.

The science modules are imported on first use so the server starts (and serves Generate)
without paying their import cost, and the per-model caches (context templates, covariance
statistics) live in one EditingContext for the server's lifetime.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from editserve.editing.artifacts import WeightDelta
from editserve.editing.facts import Fact

from .edits import ComputeFn, ScoreFn
from .host import ModelHost


class _Bound:
    def __init__(self, host: ModelHost, cache_dir: Path) -> None:
        self.host = host
        self.cache_dir = cache_dir

    @cached_property
    def context(self):
        from editserve.editing.context import EditingContext

        return EditingContext(self.host.model, self.host.tokenizer, self.host.adapter, self.cache_dir / "stats")

    def rome(self, facts: list[Fact], options: dict) -> tuple[WeightDelta, dict]:
        from editserve.editing.hparams import load_rome_hparams
        from editserve.editing.rome import compute_rome

        base = load_rome_hparams(self.host.adapter.model_type, self.host.adapter.num_layers)
        hparams = base.with_overrides(**options)
        delta, diagnostics = compute_rome(self.context, facts, hparams)
        return delta, diagnostics  # diagnostics["layers"]: the layer actually edited

    def ft_l(self, facts: list[Fact], options: dict) -> tuple[WeightDelta, dict]:
        from editserve.editing.ft import compute_ft, default_ft_hparams

        hparams = default_ft_hparams(self.host.adapter).with_overrides(**options)
        return compute_ft(self.host.model, self.host.tokenizer, self.host.adapter, facts, hparams)

    def score(self, prompts: list[str], targets: list[str]) -> list[float]:
        from editserve.editing.evaluation.teacher_forcing import score_continuations

        scores = score_continuations(self.host.model, self.host.tokenizer, prompts, targets)
        return [s.probability for s in scores]


def build_methods(host: ModelHost, cache_dir: Path) -> tuple[dict[str, ComputeFn], ScoreFn]:
    bound = _Bound(host, cache_dir)
    return {"rome": bound.rome, "ft_l": bound.ft_l}, bound.score
