"""The edit lifecycle: compute -> report -> journal -> apply, and revert, list, replay.

One edit at a time (``_mutex``): computing reads the served weights, and the only writers
(apply/revert) go through here too, so a computation never sees a half-applied edit while
generation keeps running in the engine thread (hooks used by the methods are thread-scoped).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from editserve.editing.artifacts import RuntimeLayer, WeightDelta, preview
from editserve.editing.errors import InvalidRequest, PreconditionFailed
from editserve.editing.facts import Fact, validate_facts
from editserve.editing.memory import LAYER_TYPE as MEMORY_LAYER
from editserve.editing.registry import METHODS

from .host import ModelHost
from .journal import EditRecord, Journal
from .metrics import Metrics

log = logging.getLogger(__name__)

# (facts, options) -> (delta, diagnostics with at least "layers": list[int])
ComputeFn = Callable[[list[Fact], dict], tuple[WeightDelta, dict]]
# (prompts, targets) -> probabilities of each target after its prompt
ScoreFn = Callable[[list[str], list[str]], list[float]]


class UnknownEdit(KeyError):
    pass


class MethodUnavailable(Exception):
    """A method this server does not know or implement (UNIMPLEMENTED)."""


class BackendLacksCapability(MethodUnavailable):
    """A method the server implements but its backend cannot host (FAILED_PRECONDITION)."""


@dataclass
class PromptScore:
    prompt: str
    p_new_before: float = 0.0
    p_true_before: float = 0.0
    p_new_after: float = 0.0
    p_true_after: float = 0.0


@dataclass
class FactReport:
    fact: Fact
    rewrite: PromptScore
    paraphrase: list[PromptScore] = field(default_factory=list)
    neighborhood: list[PromptScore] = field(default_factory=list)


@dataclass
class EditOutcome:
    edit_id: str
    revision: int
    applied: bool
    reports: list[FactReport]
    compute_seconds: float
    apply_seconds: float
    record: EditRecord | None
    diagnostics: dict
    # what the operator should know about this edit's cost (e.g. it waited for statistics)
    notes: list[str] = field(default_factory=list)


class EditManager:
    def __init__(
        self,
        host: ModelHost,
        journal: Journal,
        methods: dict[str, ComputeFn],
        scorer: ScoreFn,
        metrics: Metrics,
        max_facts: int = 10_000,
    ) -> None:
        self.max_facts = max_facts  # per Edit, on top of each method's own limit
        self.host = host
        self.journal = journal
        self.methods = methods
        self.scorer = scorer
        self.metrics = metrics
        self._mutex = threading.Lock()
        self.preparing = ""  # what a background preparation holding the mutex is doing
        self.on_change: Callable[[], None] = lambda: None  # e.g. the drift monitor's refresh

    # --- start-up ----------------------------------------------------------------------
    def replay(self) -> int:
        """Apply every active journaled edit (no recomputation); returns how many."""
        removed = self.journal.remove_orphans()
        if removed:
            log.warning("removed %d artifact(s) of edits that were never committed: %s", len(removed), removed)
        records = self.journal.list()
        edits = [(r.edit_id, self.journal.load_artifact(r)) for r in records]
        self.host.load_state(edits, self.journal.revision())
        self._publish()
        return len(edits)

    def _publish(self) -> None:
        self.metrics.revision.set(self.host.revision)
        self.metrics.active_edits.set(len(self.host.active_edit_ids))
        self.on_change()

    # --- scoring -------------------------------------------------------------------------
    def _scores(self, facts: list[Fact], delta: WeightDelta | None) -> list[FactReport]:
        """P(target_new) and P(target_true) on each fact's prompts, before and after."""
        prompts: list[tuple[int, str, str]] = []  # (fact index, group, prompt)
        for i, fact in enumerate(facts):
            prompts.append((i, "rewrite", fact.text))
            prompts += [(i, "paraphrase", p) for p in fact.paraphrase_prompts]
            prompts += [(i, "neighborhood", p) for p in fact.neighborhood_prompts]
        queries, targets = [], []
        for i, _group, prompt in prompts:
            queries += [prompt, prompt]
            targets += [facts[i].target_new, facts[i].target_true or facts[i].target_new]
        before = self._routed_score(queries, targets)
        if isinstance(delta, RuntimeLayer) and delta.layer_type == MEMORY_LAYER:
            after = self._routed_score(queries, targets, extra=[("preview", delta)])
        elif delta is not None:
            with preview(self.host.model, delta):
                after = self._routed_score(queries, targets)
        else:
            after = before
        reports = [FactReport(fact=f, rewrite=PromptScore(f.text)) for f in facts]
        for n, (i, group, prompt) in enumerate(prompts):
            has_true = bool(facts[i].target_true)
            score = PromptScore(
                prompt=prompt,
                p_new_before=before[2 * n],
                p_true_before=before[2 * n + 1] if has_true else 0.0,
                p_new_after=after[2 * n],
                p_true_after=after[2 * n + 1] if has_true else 0.0,
            )
            if group == "rewrite":
                reports[i].rewrite = score
            else:
                getattr(reports[i], group).append(score)
        return reports

    def _routed_score(self, queries: list[str], targets: list[str], extra: list = ()) -> list[float]:
        """Scores as serving would give them: in-scope inputs of a SERAC memory (the active
        one, plus ``extra``) read through the counterfactual path."""
        prompts, _matches = self.host.routed_prompts(queries, extra)
        return self.scorer(prompts, targets)

    # --- operations ----------------------------------------------------------------------
    def edit(
        self, method: str, facts: list[Fact], options: dict, *, dry_run: bool = False, description: str = "",
        report: bool = True,
    ) -> EditOutcome:
        """Compute, score (unless ``report`` is off), journal and apply one edit."""
        if method not in self.methods:
            from .methods import unavailable_reason

            reason = unavailable_reason(method, self.host.capabilities, self.host.backend_name) or method
            spec = METHODS.get(method)
            lacking = spec is not None and spec.implemented and not spec.requires <= self.host.capabilities
            raise (BackendLacksCapability if lacking else MethodUnavailable)(reason)
        validate_facts(facts)
        limit = min(METHODS[method].max_facts, self.max_facts)
        if len(facts) > limit:
            raise InvalidRequest(f"facts: {len(facts)} facts in one edit, the limit for {method} is {limit}")
        waiting_for, queued = self.preparing, time.perf_counter()
        if waiting_for:
            log.warning("edit (%s) waits for %s", method, waiting_for)
        with self._mutex:
            started = time.perf_counter()
            notes = []
            if waiting_for and started - queued > 0.1:
                notes.append(f"waited {started - queued:.1f} s for {waiting_for} (done once per model; cached on disk)")
            try:
                delta, diagnostics = self.methods[method](facts, options)
                if not delta.is_finite():
                    raise PreconditionFailed("the optimisation produced NaN or inf; the model is unchanged")
                self.host.check_delta(delta)
            except Exception:
                self.metrics.edits.labels(method, "failed").inc()
                raise
            compute_seconds = time.perf_counter() - started
            stats_seconds = diagnostics.get("timings", {}).get("statistics_s", 0.0)
            if stats_seconds > 1.0:
                notes.append(f"spent {stats_seconds:.1f} s estimating key statistics for layers "
                             f"{diagnostics.get('layers')} (first use of these options; cached on disk)")
            self.metrics.edit_compute.labels(method).observe(compute_seconds)
            reports = self._scores(facts, delta) if report else []
            if dry_run:
                self.metrics.edits.labels(method, "dry_run").inc()
                return EditOutcome("", self.host.revision, False, reports, compute_seconds, 0.0, None, diagnostics,
                                   notes)
            edit_id = self.journal.new_id()
            artifact, sha = self.journal.write_artifact(edit_id, delta)
            try:
                revision = self.journal.record_apply(
                    edit_id=edit_id,
                    method=method,
                    kind=delta.kind.value,
                    facts=[asdict(f) for f in facts],
                    options=options,
                    layers=[int(x) for x in diagnostics.get("layers", [])],
                    parameters=delta.parameter_names,
                    delta_norm=delta.norm(),
                    compute_seconds=compute_seconds,
                    description=description,
                    artifact=artifact,
                    sha256=sha,
                )
            except BaseException:
                self.journal.discard_artifact(artifact)
                raise
            applied_at = time.perf_counter()
            pause = self.host.apply(edit_id, delta, revision)
            apply_seconds = time.perf_counter() - applied_at
            self.metrics.edit_apply.labels("apply").observe(apply_seconds)
            self.metrics.weight_swap_pause.labels("apply").observe(pause)
            self.metrics.edits.labels(method, "applied").inc()
            self._publish()
            diagnostics = {**diagnostics, "write_lock_seconds": pause}
            return EditOutcome(edit_id, revision, True, reports, compute_seconds, apply_seconds,
                               self.journal.get(edit_id), diagnostics, notes)

    def prepare_in_background(self, label: str, work: Callable[[], object],
                              on_error: Callable[[BaseException], None]) -> threading.Thread:
        """Run ``work`` (e.g. estimating key statistics) in a thread under the edit mutex, so the
        weights cannot change under it. The mutex is taken *now*, before this returns, so an
        Edit that arrives once the server reports SERVING always finds the preparation under
        way, waits for it, and says so (``threading.Lock`` may be released by another thread)."""
        self._mutex.acquire()
        self.preparing = label

        def run() -> None:
            try:
                work()
            except BaseException as error:  # noqa: BLE001 - reported by the caller's handler
                on_error(error)
            finally:
                self.preparing = ""
                self._mutex.release()

        thread = threading.Thread(target=run, name="key-statistics", daemon=True)
        thread.start()
        return thread

    def revert(self, edit_id: str) -> tuple[int, float]:
        with self._mutex:
            record = self.journal.get(edit_id)
            if record is None or record.status != "active":
                self.metrics.reverts.labels("not_found").inc()
                state = "was already reverted" if record is not None else "does not exist"
                raise UnknownEdit(f"edit {edit_id!r} {state}")
            started = time.perf_counter()
            revision = self.journal.record_revert(edit_id)
            pause = self.host.revert(edit_id, revision)
            seconds = time.perf_counter() - started
            self.metrics.edit_apply.labels("revert").observe(seconds)
            self.metrics.weight_swap_pause.labels("revert").observe(pause)
            self.metrics.reverts.labels("ok").inc()
            self._publish()
            return revision, seconds

    def get(self, edit_id: str) -> EditRecord:
        record = self.journal.get(edit_id)
        if record is None:
            raise UnknownEdit(f"edit {edit_id!r} does not exist")
        return record

    def list(self, include_reverted: bool = False) -> list[EditRecord]:
        return self.journal.list(include_reverted)


def stable_weights(manager: EditManager):
    """Hold while a long read (a trace) must see one revision: no apply/revert can start,
    and generation is never blocked (it only waits for writers)."""
    return manager._mutex
