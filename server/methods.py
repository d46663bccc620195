"""The editing methods this server offers, derived from :mod:`editserve.editing.registry` and
bound to the served model, and the scorer used for before/after probabilities in Edit replies.

A method is offered when the registry has a compute function for it and the serving host has
every capability it requires (e.g. a backend that can compose weight deltas). A method the
server does not know or implement answers UNIMPLEMENTED; one it implements but the configured
backend cannot host (T-Patcher on vLLM) answers FAILED_PRECONDITION, naming the backend: the
same server with another backend would accept it. The reason comes from
:func:`unavailable_reason`: one place.

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
from editserve.editing.errors import StopCheck
from editserve.editing.facts import Fact
from editserve.editing.registry import METHODS, MethodSpec

from .edits import ComputeFn, ScoreFn
from .host import ModelHost


def unavailable_reason(name: str, capabilities: frozenset[str], backend: str = "this") -> str | None:
    """Why ``name`` cannot be served by a host with ``capabilities`` (None: it can);
    ``backend`` names the serving backend in the reason."""
    spec = METHODS.get(name)
    if spec is None:
        return f"unknown edit method {name!r}; known: {sorted(METHODS)}"
    if not spec.implemented:
        return f"edit method {name!r} is not implemented by this server yet"
    missing = sorted(spec.requires - capabilities)
    if missing:
        return f"edit method {name!r} needs backend capabilities {missing}, which the {backend} backend lacks"
    return None


BUILTIN_SOURCES = ("default", "model")


def resolve_statistics_source(options: dict, sources: dict[str, str] | None) -> dict:
    """A request names its key-statistics text by name, never by path: "default" (shipped),
    "model" (sampled from the model) or a name the operator maps to a server path in
    ``[serve] statistics_sources``. A path from a request would let a client make the server
    read any file it can (and tell missing from unreadable ones): InvalidRequest instead."""
    name = options.get("stats_source")
    if sources is None or name is None or name in BUILTIN_SOURCES:
        return options  # sources None: a local caller (in-process evaluation) may give paths
    if name in sources:
        return {**options, "stats_source": sources[name]}
    from editserve.editing.errors import InvalidRequest

    known = [*BUILTIN_SOURCES, *sorted(sources)]
    raise InvalidRequest(f"option stats_source must name a statistics source, one of {known} (the operator "
                         f"maps names to server paths in [serve] statistics_sources); paths are not accepted")


class _Bound:
    def __init__(self, host: ModelHost, cache_dir: Path, sources: dict[str, str] | None) -> None:
        self.host = host
        self.cache_dir = cache_dir
        self.sources = sources

    @cached_property
    def context(self):
        from editserve.editing.context import EditingContext

        context = EditingContext(self.host.model, self.host.tokenizer, self.host.adapter, self.cache_dir / "stats")
        context.encoder_factory = lambda: self.host.encoder  # SERAC computes and routes with one encoder
        context.preserved_keys = self.host.active_keys  # what `preserve` keeps: the active edits' keys
        context.neuron_prompts = self.host.active_neuron_prompts  # what a new T-Patcher neuron avoids
        return context

    def compute_fn(self, spec: MethodSpec) -> ComputeFn:
        def compute(facts: list[Fact], options: dict, should_stop: StopCheck | None = None
                    ) -> tuple[Artifact, dict]:
            return spec.run(self.context, facts, resolve_statistics_source(options, self.sources), should_stop)

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


def build_methods(host: ModelHost, cache_dir: Path, statistics_sources: dict[str, str] | None = None) -> MethodTable:
    """Every registry method this host can serve, bound to its model. ``statistics_sources``:
    the operator's names for server-side statistics texts (requests pick one by name; the
    server always passes a dict). None: a local, trusted caller that may give paths."""
    bound = _Bound(host, cache_dir, None if statistics_sources is None else dict(statistics_sources))
    methods = {name: bound.compute_fn(spec) for name, spec in METHODS.items()
               if unavailable_reason(name, host.capabilities, host.backend_name) is None}
    return MethodTable(methods, bound.score, lambda: bound.prepare_statistics(sorted(methods)), bound.stop)
