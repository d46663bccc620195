"""The editing methods this server offers, derived from :mod:`editserve.editing.registry` and
bound to the served model, and the scorer used for before/after probabilities in Edit replies.

A method is offered when the registry has a compute function for it and the serving host has
every capability it requires (e.g. a backend that can compose weight deltas). Everything
else answers UNIMPLEMENTED, with the reason, from :func:`unavailable_reason`: one place.

The science modules are imported on first use so the server starts (and serves Generate)
without paying their import cost, and the per-model caches (context templates, covariance
statistics) live in one EditingContext for the server's lifetime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from editserve.editing.artifacts import Artifact
from editserve.editing.facts import Fact
from editserve.editing.registry import METHODS, MethodSpec

from .edits import ComputeFn, ScoreFn
from .host import ModelHost


def unavailable_reason(name: str, capabilities: frozenset[str]) -> str | None:
    """Why ``name`` cannot be served by a host with ``capabilities`` (None: it can)."""
    spec = METHODS.get(name)
    if spec is None:
        return f"unknown edit method {name!r}; known: {sorted(METHODS)}"
    if not spec.implemented:
        return f"edit method {name!r} is not implemented by this server yet"
    missing = sorted(spec.requires - capabilities)
    if missing:
        return f"edit method {name!r} needs backend capabilities {missing}, which this backend lacks"
    return None


class _Bound:
    def __init__(self, host: ModelHost, cache_dir: Path) -> None:
        self.host = host
        self.cache_dir = cache_dir

    @cached_property
    def context(self):
        from editserve.editing.context import EditingContext

        context = EditingContext(self.host.model, self.host.tokenizer, self.host.adapter, self.cache_dir / "stats")
        context.encoder_factory = lambda: self.host.encoder  # SERAC computes and routes with one encoder
        return context

    def compute_fn(self, spec: MethodSpec) -> ComputeFn:
        def compute(facts: list[Fact], options: dict) -> tuple[Artifact, dict]:
            return spec.run(self.context, facts, options)

        return compute

    def score(self, prompts: list[str], targets: list[str]) -> list[float]:
        from editserve.editing.evaluation.teacher_forcing import score_continuations

        scores = score_continuations(self.host.model, self.host.tokenizer, prompts, targets)
        return [s.probability for s in scores]


    def prepare_statistics(self, methods: list[str]) -> float:
        """Key statistics the shipped hyperparameters of ``methods`` need (seconds taken)."""
        from .statistics import default_plan, prepare

        adapter = self.host.adapter
        return prepare(self.context, default_plan(adapter.model_type, adapter.num_layers, methods))


    def stop(self) -> None:
        """Abandon a statistics estimate in progress, and refuse later ones: the server is stopping."""
        if "context" in self.__dict__:
            self.context.stop.set()


@dataclass
class MethodTable:
    """What the server needs from the methods: compute functions, the scorer, and the hooks to
    prepare (and abandon, at shutdown) the key statistics of their default layers."""

    compute: dict[str, ComputeFn]
    score: ScoreFn
    prepare_statistics: Callable[[], float]
    stop: Callable[[], None]


def build_methods(host: ModelHost, cache_dir: Path) -> MethodTable:
    """Every registry method this host can serve, bound to its model."""
    bound = _Bound(host, cache_dir)
    methods = {name: bound.compute_fn(spec) for name, spec in METHODS.items()
               if unavailable_reason(name, host.capabilities) is None}
    return MethodTable(methods, bound.score, lambda: bound.prepare_statistics(sorted(methods)), bound.stop)
