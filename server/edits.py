"""The edit lifecycle: compute -> report -> journal -> apply, and revert, list, replay.

One edit at a time (``_mutex``): computing reads the served weights, and the only writers
(apply/revert) go through here too, so a computation never sees a half-applied edit while
generation keeps running in the engine thread (hooks used by the methods are thread-scoped).

Trust rules kept here (docs/RELIABILITY.md, "Guarantees"):

- A caller that gave up (``should_stop``) stops the wait for the mutex and the computation
  between two steps, and is checked once more inside the journal transaction, right before
  its commit: nothing is journaled or applied for a caller that is gone.
- An idempotency key already journaled answers with that edit's original reply.
- Journal and weights never disagree: an apply or revert that fails after its commit is
  taken back in the journal; if that fails too, ``on_divergence`` is called (the server turns
  NOT_SERVING) and every later edit is refused.
- At start-up an edit whose artifact is missing or corrupt is quarantined, not replayed; the
  others replay and the server starts.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import torch

from editserve.editing.artifacts import RuntimeLayer, WeightDelta, preview
from editserve.editing.artifacts import load_artifact as load_artifact_file
from editserve.editing.errors import Cancelled, InvalidRequest, PreconditionFailed, StopCheck, check_stop
from editserve.editing.facts import Fact, validate_facts
from editserve.editing.memory import LAYER_TYPE as MEMORY_LAYER
from editserve.editing.registry import METHODS, ArtifactKind

from .bundle import MAX_BUNDLE_EDITS, BundledEdit, read_bundle, write_bundle
from .drift_budget import DriftBudget, DriftCheck
from .errors import Diverged
from .fresh_thread import in_fresh_thread
from .host import ModelHost
from .idempotency import KeyConflict, request_digest, validate_key
from .journal import DuplicateKey, EditRecord, Journal, JournalError, JournalUnavailable
from .memory import release_free_memory
from .metrics import Metrics

# Heavy operations whose temporaries (optimiser state, activations of many rows) leave freed
# heap behind: it is handed back to the OS when they end (server/memory.py). Not after Score,
# which is frequent and light.
TRIM_AFTER = frozenset({"edit", "revert", "trace"})

T = TypeVar("T")
log = logging.getLogger(__name__)

# (facts, options, should_stop) -> (delta, diagnostics with at least "layers": list[int])
ComputeFn = Callable[[list[Fact], dict, StopCheck | None], tuple[WeightDelta, dict]]
MUTEX_POLL_SECONDS = 0.05  # how often a caller waiting for the edit mutex checks it is still there
# (prompts, targets) -> probabilities of each target after its prompt
ScoreFn = Callable[[list[str], list[str]], list[float]]

# Bounds on what one Edit may carry besides its fact count. Why: every string of a fact is
# tokenized and run through the model (the value optimisation, the before/after scores), so
# a 1 MB prompt made one edit hold the edit mutex for minutes and allocate without limit
# (found by the fuzzer, docs/RELIABILITY.md). Facts are short statements: real CounterFact
# and zsRE prompts are under 64 tokens.
MAX_FACT_TOKENS = 256  # each prompt (subject filled in), paraphrase, neighbourhood prompt and target
MAX_FACT_PROMPTS = 64  # paraphrase_prompts and neighborhood_prompts, each, per fact
MAX_DESCRIPTION_CHARS = 4096  # kept in the journal and returned by every ListEdits
# no token is longer than this many characters, so a longer string is refused untokenized
_MAX_CHARS_PER_TOKEN = 64


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
    # the reply of an earlier Edit with the same idempotency key: nothing computed or applied now
    replayed: bool = False
    drift: DriftCheck | None = None  # what the drift guard measured (None: no budget applied)


@dataclass(frozen=True)
class ImportedEdit:
    source_edit_id: str
    edit_id: str  # empty: skipped, or a dry run
    revision: int
    skipped: bool  # its artifact was already active here
    sha256: str


@dataclass(frozen=True)
class ImportOutcome:
    edits: list[ImportedEdit]
    revision: int
    drift: DriftCheck | None


CONSOLIDATION_METHOD = "memit"  # one joint solve over many facts and layers
CONSOLIDATABLE = frozenset({"rome", "memit"})  # edits a consolidation may replace


def _fact_from_json(fact: dict) -> Fact:
    return Fact(**{**fact, "paraphrase_prompts": tuple(fact.get("paraphrase_prompts", ())),
                   "neighborhood_prompts": tuple(fact.get("neighborhood_prompts", ()))})


def negated_sum(deltas: list[WeightDelta]) -> WeightDelta:
    """-(sum of the deltas), still low-rank where they are: previewing it shows the model
    without them (what a consolidation is solved on)."""
    factors: dict[str, tuple] = {}
    dense: dict = {}
    for delta in deltas:
        for name, (u, v) in delta.factors.items():
            if name in factors:
                pu, pv = factors[name]
                factors[name] = (torch.cat([pu, -u], 1), torch.cat([pv, v], 1))
            else:
                factors[name] = (-u, v)
        for name, change in delta.dense.items():
            dense[name] = dense[name] - change if name in dense else -change
    return WeightDelta(factors=factors, dense=dense)


def _report_from_json(data: dict) -> FactReport:
    fact = data["fact"]
    fact = Fact(**{**fact, "paraphrase_prompts": tuple(fact.get("paraphrase_prompts", ())),
                   "neighborhood_prompts": tuple(fact.get("neighborhood_prompts", ()))})
    return FactReport(fact, PromptScore(**data["rewrite"]), [PromptScore(**s) for s in data.get("paraphrase", [])],
                      [PromptScore(**s) for s in data.get("neighborhood", [])])


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
        # Edits, reverts, traces and scores run on this one thread, whichever gRPC worker took
        # the call (they serialise on the mutex anyway): native libraries keep per-thread state
        # for every thread that ran a kernel, and spread over the ~96 workers that grew the
        # server by ~1 MiB per thread reached (docs/RELIABILITY.md).
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="editserve-edit")
        self.preparing = ""  # what a background preparation holding the mutex is doing
        self.on_change: Callable[[], None] = lambda: None  # e.g. the drift monitor's refresh
        # journal and weights may disagree (compensation failed): the server turns NOT_SERVING
        self.on_divergence: Callable[[str], None] = lambda reason: None
        self.diverged = ""  # why, once it happened: every later edit or revert is refused
        # the drift guard: (artifact) -> (mean KL, top-1 agreement) on the drift probes with the
        # artifact previewed (the server's DriftMonitor.measure), and the server's default budget
        self.measure_drift: Callable[[list[WeightDelta]], tuple[float, float]] | None = None
        self.drift_probes = 0
        self.default_budget = DriftBudget()
        # newest journal revision last read (a shared journal's follower sets it; see replica.py)
        self.journal_revision = 0
        # the consolidation policy (config ``consolidate_after``): once this many ROME/MEMIT
        # edits are served on their own, the edit thread replaces them by one joint solve in
        # the background; 0: only when an operator asks (docs/LIFELONG.md, "Consolidation")
        self.consolidate_after = 0
        self.stopping = threading.Event()  # set when the server stops: the policy's solve gives up

    # --- start-up ----------------------------------------------------------------------
    def replay(self) -> int:
        """Apply every active journaled edit (no recomputation); returns how many."""
        removed = self.journal.remove_orphans()
        if removed:
            log.warning("removed %d artifact(s) of edits that were never committed: %s", len(removed), removed)
        edits = []
        records, revision = self.journal.snapshot()
        for record in records:
            if record.consolidated_into:  # served through the consolidation that replaced it
                continue
            if record.quarantined:
                log.warning("edit %s stays quarantined (%s); revert it to acknowledge", record.edit_id,
                            record.quarantined)
                continue
            try:
                artifact = self.journal.load_artifact(record)
                self.host.check_delta(artifact)
            except Exception as error:  # noqa: BLE001 - one bad file must not stop the others or the server
                self._quarantine(record, f"{type(error).__name__}: {error}")
                continue
            edits.append((record.edit_id, artifact))
        self.host.load_state(edits, revision)
        self._publish()
        return len(edits)

    # --- a fleet: following the edits other replicas journal ------------------------------
    def follow(self) -> int:
        """Apply the edits and reverts other servers committed to a shared journal since the
        served revision, in order (on the edit thread, under the mutex); returns how many.
        Nothing to do on an embedded journal."""
        def held() -> int:
            with self._holding_mutex(None, "follow"):
                return 0 if self.diverged else self._follow_locked()

        return self._on_worker(None, "follow", "", held)

    def _follow_locked(self, upto: int | None = None) -> int:
        """The events past ``host.revision`` (up to ``upto``), applied one by one with the
        revision each carries; the caller holds the mutex. An edit whose stored artifact is bad
        or does not fit is quarantined (every replica reads the same bytes, so it would fail
        everywhere) and its revision passed; anything else (database unreachable, memory) stops
        here, to be retried, with nothing half-applied."""
        if not self.journal.shared:
            return 0
        done = 0
        for revision, kind, edit_id in self.journal.events_after(self.host.revision):
            if upto is not None and revision > upto:
                break
            if self.journal.get(edit_id).consolidates:
                # a consolidation made or undone elsewhere changes several edits at once: serve
                # the journal's newest state as a whole (the events after it included)
                self._resync(sorted(self.host.active_parameter_names()))
                self.metrics.followed_events.labels("resync").inc()
                return done + 1
            if kind == "apply":
                pause = self._follow_apply(edit_id, revision)
            elif edit_id in self.host.active_edit_ids:
                pause = self.host.revert(edit_id, revision)
            else:  # the revert of an edit this server never applied (quarantined)
                pause = self.host.advance(revision)
            self.metrics.weight_swap_pause.labels(kind).observe(pause)
            self.metrics.followed_events.labels(kind).inc()
            done += 1
        if done:
            log.info("followed %d journal event(s) from other replicas; serving revision %d", done,
                     self.host.revision)
            self._publish()
        return done

    def _follow_apply(self, edit_id: str, revision: int) -> float:
        record = self.journal.get(edit_id)
        if record is None or record.quarantined:
            return self.host.advance(revision)
        try:
            artifact = self.journal.load_artifact(record)
            self.host.check_delta(artifact)
        except JournalUnavailable:
            raise
        except (JournalError, ValueError) as error:
            self._quarantine(record, f"{type(error).__name__}: {error}")
            return self.host.advance(revision)
        return self.host.apply(edit_id, artifact, revision)

    def _apply_others_first(self, revision: int) -> bool:
        """Our event got ``revision``; events other replicas committed between the served
        revision and it are applied first, so every server applies the same events in the
        same order (our change was computed before theirs were applied here: its delta is
        added on top of them, as when an earlier edit is reverted; docs/ARCHITECTURE.md).
        Returns whether our own event is already served (a consolidation among theirs made
        this server load the journal's newest state, ours included)."""
        if revision > self.host.revision + 1:
            self._follow_locked(upto=revision - 1)
        return self.host.revision >= revision

    def _quarantine(self, record: EditRecord, reason: str) -> None:
        moved = self.journal.quarantine(record.edit_id, reason)
        self.metrics.quarantines.inc()
        log.error("edit %s (%s, applied at revision %d) QUARANTINED, not replayed: %s; %s. The other edits replay "
                  "without it; revert it to acknowledge, re-Edit its facts to have them again",
                  record.edit_id, record.method, record.applied_revision, reason,
                  f"its file is kept at {moved}" if moved else "its file is missing")

    def _publish(self) -> None:
        shared = self.journal.shared  # else nobody else writes it: the served revision is its newest
        self.journal_revision = max(self.journal_revision, self.host.revision) if shared else self.host.revision
        self.metrics.journal_revision.set(self.journal_revision)
        self.metrics.revision.set(self.host.revision)
        self.metrics.active_edits.set(len(self.host.active_edit_ids))
        self.metrics.quarantined_edits.set(self.journal.count_quarantined())
        self.on_change()

    # --- scoring -------------------------------------------------------------------------
    def _scores(self, facts: list[Fact], delta: WeightDelta | None, removed: WeightDelta | None = None
                ) -> list[FactReport]:
        """P(target_new) and P(target_true) on each fact's prompts, before and after (after:
        ``delta`` added and, for a consolidation, ``removed`` taken away)."""
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
            with ExitStack() as stack:
                for change in (removed, delta):
                    if change is not None:
                        stack.enter_context(preview(self.host.model, change))
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
    def _on_worker(self, should_stop: StopCheck | None, what: str, method: str, work: Callable[[], T]) -> T:
        """Run ``work`` on the edit thread and wait for it; while it is still queued, a caller
        who gave up takes it out of the queue (Cancelled, as in the wait for the mutex).

        Once the work has started it checks ``should_stop`` itself between its steps, so the
        wait stops polling: one caller's checks then come from one thread, in step order."""
        where = f"the wait for the edit mutex ({what} queued behind {self.preparing or 'another edit, revert or trace'})"

        def unless_given_up() -> T:
            # the caller may have gone since the waiting thread last looked (it polls, and on a
            # loaded machine it may not run for a while): work whose caller is gone never starts
            # (a Score ran, unread, after its client's deadline because the edit ahead of it
            # ended between two polls)
            with self._counting_abandoned(method):
                check_stop(should_stop, where)
            return work()

        # in a thread of its own that ends with the work: no idle OpenMP team slows decoding (fresh_thread.py)
        future = self._worker.submit(in_fresh_thread, unless_given_up, "editserve-edit-work")
        while True:
            try:
                return future.result(timeout=MUTEX_POLL_SECONDS)
            except FutureTimeout:
                if future.running():
                    return future.result()
                try:
                    check_stop(should_stop, where)
                except Cancelled:
                    if future.cancel():  # not started: nothing ran; once started, it stops itself
                        if method:
                            self.metrics.edits.labels(method, "abandoned").inc()
                        raise

    def edit(
        self, method: str, facts: list[Fact], options: dict, *, dry_run: bool = False, description: str = "",
        report: bool = True, should_stop: StopCheck | None = None, idempotency_key: str = "",
        max_drift: DriftBudget | None = None,
    ) -> EditOutcome:
        """:meth:`_edit` on the edit thread."""
        return self._on_worker(should_stop, "edit", method, lambda: self._edit(
            method, facts, options, dry_run=dry_run, description=description, report=report,
            should_stop=should_stop, idempotency_key=idempotency_key, max_drift=max_drift))

    def _edit(
        self, method: str, facts: list[Fact], options: dict, *, dry_run: bool = False, description: str = "",
        report: bool = True, should_stop: StopCheck | None = None, idempotency_key: str = "",
        max_drift: DriftBudget | None = None,
    ) -> EditOutcome:
        """Compute, score (unless ``report`` is off), journal and apply one edit.

        ``should_stop`` (the caller gave up) is checked while waiting for the mutex, between
        compute steps, before scoring and inside the journal transaction right before its
        commit: Cancelled, with nothing journaled or applied. ``idempotency_key``: see
        :mod:`.idempotency`. ``max_drift`` overrides fields of the server's default drift
        budget; an edit over the budget is PreconditionFailed before anything is journaled (a
        dry run is checked the same way: it answers whether the edit would be accepted).
        """
        budget = self.default_budget.over(max_drift)
        if budget.active and self.measure_drift is None:
            raise PreconditionFailed("max_drift: this server has no drift probes to check an edit against")
        if method not in self.methods:
            from .methods import unavailable_reason

            reason = unavailable_reason(method, self.host.capabilities, self.host.backend_name) or method
            spec = METHODS.get(method)
            lacking = spec is not None and spec.implemented and not spec.requires <= self.host.capabilities
            raise (BackendLacksCapability if lacking else MethodUnavailable)(reason)
        validate_facts(facts)
        validate_key(idempotency_key, dry_run=dry_run)
        limit = min(METHODS[method].max_facts, self.max_facts)
        if len(facts) > limit:
            raise InvalidRequest(f"facts: {len(facts)} facts in one edit, the limit for {method} is {limit}")
        if len(description) > MAX_DESCRIPTION_CHARS:
            raise InvalidRequest(f"description is {len(description)} characters, over the limit of "
                                 f"{MAX_DESCRIPTION_CHARS}")
        self._check_sizes(facts)
        digest = request_digest(method, facts, options, description) if idempotency_key else ""
        if idempotency_key:  # a retry of a finished edit need not wait behind the next one
            earlier = self._earlier(idempotency_key, digest)
            if earlier is not None:
                return earlier
        waiting_for, queued = self.preparing, time.perf_counter()
        if waiting_for:
            log.warning("edit (%s) waits for %s", method, waiting_for)
        with self._holding_mutex(should_stop, "edit", method):
            self._refuse_if_diverged()
            self._follow_locked()  # compute on the fleet's newest edit set
            if idempotency_key:  # authoritative: an attempt that held the mutex before may have committed
                earlier = self._earlier(idempotency_key, digest)
                if earlier is not None:
                    return earlier
            started = time.perf_counter()
            notes = []
            if waiting_for and started - queued > 0.1:
                notes.append(f"waited {started - queued:.1f} s for {waiting_for} (done once per model; cached on disk)")
            delta, diagnostics = self._compute(method, facts, options, should_stop)
            compute_seconds = time.perf_counter() - started
            stats_seconds = diagnostics.get("timings", {}).get("statistics_s", 0.0)
            if stats_seconds > 1.0:
                notes.append(f"spent {stats_seconds:.1f} s estimating key statistics for layers "
                             f"{diagnostics.get('layers')} (first use of these options; cached on disk)")
            self.metrics.edit_compute.labels(method).observe(compute_seconds)
            with self._counting_abandoned(method):
                check_stop(should_stop, "the edit, before scoring it")
                reports = self._scores(facts, delta) if report else []
                drift = self._check_drift(method, [delta], budget) if budget.active else None
            if dry_run:
                self.metrics.edits.labels(method, "dry_run").inc()
                return EditOutcome("", self.host.revision, False, reports, compute_seconds, 0.0, None, diagnostics,
                                   notes, drift=drift)
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
                    idempotency_key=idempotency_key,
                    request_sha256=digest,
                    outcome={"reports": [asdict(r) for r in reports], "notes": notes},
                    # the last look: inside the transaction, right before the commit
                    check=lambda: check_stop(should_stop, "the edit, before it was journaled"),
                )
            except DuplicateKey:  # another replica committed this key since we looked
                self.journal.discard_artifact(artifact)
                return self._earlier(idempotency_key, digest)
            except BaseException as error:
                self.journal.discard_artifact(artifact)
                if isinstance(error, Cancelled):
                    self.metrics.edits.labels(method, "abandoned").inc()
                raise
            applied_at = time.perf_counter()
            try:
                pause = 0.0 if self._apply_others_first(revision) else self.host.apply(edit_id, delta, revision)
            except Exception as error:
                self._compensate_apply(edit_id, artifact, revision, delta, error)
                self.metrics.edits.labels(method, "failed").inc()
                raise
            apply_seconds = time.perf_counter() - applied_at
            self.metrics.edit_apply.labels("apply").observe(apply_seconds)
            self.metrics.weight_swap_pause.labels("apply").observe(pause)
            self.metrics.edits.labels(method, "applied").inc()
            self._publish()
            if method in CONSOLIDATABLE:
                self._consolidate_if_due()
            diagnostics = {**diagnostics, "write_lock_seconds": pause}
            return EditOutcome(edit_id, revision, True, reports, compute_seconds, apply_seconds,
                               self.journal.get(edit_id), diagnostics, notes, drift=drift)

    def _check_drift(self, method: str, changes: list, budget: DriftBudget, what: str = "") -> DriftCheck:
        """The drift guard (edits, consolidations, imports): measure the probes with
        ``changes`` previewed together; over ``budget``, PreconditionFailed naming the figure
        (the caller has journaled nothing yet)."""
        kl, agreement = self.measure_drift(changes)
        why = budget.violation(kl, agreement, self.drift_probes)
        if why:
            self.metrics.edits.labels(method, "rejected_drift").inc()
            raise PreconditionFailed(f"{why}{what}; nothing was applied or journaled")
        return DriftCheck(kl, agreement, budget)

    def _compute(self, method: str, facts: list[Fact], options: dict, should_stop: StopCheck | None
                 ) -> tuple[WeightDelta, dict]:
        """Run the method and check what it returns (finite, fits the model), counting an
        abandoned or failed computation; the caller holds the mutex."""
        try:
            delta, diagnostics = self.methods[method](facts, options, should_stop)
            if not delta.is_finite():
                raise PreconditionFailed("the optimisation produced NaN or inf; the model is unchanged")
            self.host.check_delta(delta)
        except Cancelled:
            self.metrics.edits.labels(method, "abandoned").inc()
            raise
        except Exception:
            self.metrics.edits.labels(method, "failed").inc()
            raise
        return delta, diagnostics

    def _earlier(self, idempotency_key: str, digest: str) -> EditOutcome | None:
        """The original reply of the edit journaled under this key (None: no such edit yet)."""
        record = self.journal.by_key(idempotency_key)
        if record is None:
            return None
        if record.request_sha256 != digest:
            raise KeyConflict(f"idempotency_key {idempotency_key!r} already names edit {record.edit_id}, made from a "
                              "different request (method, facts, options or description); use a new key for a new edit")
        self.metrics.edits.labels(record.method, "replayed").inc()
        outcome = record.outcome
        notes = [*outcome.get("notes", []), f"a retry: edit {record.edit_id} was journaled under this idempotency key "
                 f"at revision {record.applied_revision} and is now {record.state}; nothing was recomputed or applied"]
        return EditOutcome(record.edit_id, record.applied_revision, True,
                           [_report_from_json(r) for r in outcome.get("reports", [])], record.compute_seconds, 0.0,
                           record, {}, notes, replayed=True)

    @contextmanager
    def _holding_mutex(self, should_stop: StopCheck | None, what: str, method: str = "") -> Iterator[None]:
        """Hold the edit mutex, waiting only while the caller is still there: a caller whose
        deadline passed (or who cancelled) while queued leaves with Cancelled instead of
        computing an edit nobody will read. Polls, since the lock itself cannot be woken."""
        while not self._mutex.acquire(timeout=MUTEX_POLL_SECONDS):
            with self._counting_abandoned(method):
                check_stop(should_stop, f"the wait for the edit mutex ({what} queued behind "
                                        f"{self.preparing or 'another edit, revert or trace'})")
        try:
            yield
        finally:
            self._mutex.release()
            if what in TRIM_AFTER:
                release_free_memory()

    @contextmanager
    def _counting_abandoned(self, method: str) -> Iterator[None]:
        """Count an edit of ``method`` as abandoned when Cancelled leaves the block, then let
        it go on: the looks at the caller (queued, waiting for the mutex, before scoring) share
        it. Only edits count (a method is named); reverts, traces and scores pass none."""
        try:
            yield
        except Cancelled:
            if method:
                self.metrics.edits.labels(method, "abandoned").inc()
            raise

    def run_stable(self, should_stop: StopCheck | None, what: str, work: Callable[[], T]) -> T:
        """Run a long read (a trace, a score) that must see one revision: on the edit thread,
        holding the edit mutex, waiting only while its caller is still there (Cancelled
        otherwise). On the edit thread because such reads serialise on the mutex anyway, and
        every thread that runs a model pass keeps native per-thread state: run on whichever
        gRPC worker took the call, they grew the server's memory (docs/RELIABILITY.md, Load)."""
        def held() -> T:
            with self._holding_mutex(should_stop, what):
                return work()

        return self._on_worker(should_stop, what, "", held)

    def _refuse_if_diverged(self) -> None:
        if self.diverged:
            raise Diverged(f"the journal and the served weights may disagree ({self.diverged}); restart the server "
                           "to replay the journal")

    def _diverge(self, reason: str) -> None:
        self.diverged = reason
        log.critical("journal and weights may disagree: %s; refusing edits until a restart replays the journal",
                     reason)
        self.on_divergence(reason)

    def _resync(self, names: list[str]) -> float:
        """Serve exactly what the journal says (its active edits, read back from their checked
        files), whatever a failed apply or revert left in memory: ``names`` are the tensors it
        may have touched. Costs a replay (about 0.4 s per 1000 edits), on a failure path only."""
        records, revision = self.journal.snapshot()
        edits = [(r.edit_id, self.journal.load_artifact(r)) for r in records if r.applied]
        pause = self.host.load_state(edits, revision, also=names)
        self._publish()
        return pause

    def _compensate_apply(self, edit_id: str, artifact: str, revision: int, delta, error: Exception) -> None:
        """The apply failed after its commit: take the commit back (and the weights the swap
        may have half changed), so the journal says exactly what is served."""
        log.error("applying edit %s failed after its journal commit (%s: %s); taking the commit back", edit_id,
                  type(error).__name__, error)
        try:
            self.journal.undo_apply(edit_id, revision)
            self.journal.discard_artifact(artifact)
            self._resync(delta.parameter_names)
        except Exception as undo_error:  # noqa: BLE001 - the caller raises the original error
            self._diverge(f"applying edit {edit_id} failed ({error}) and taking its commit back failed too "
                          f"({type(undo_error).__name__}: {undo_error})")

    def _compensate_revert(self, record: EditRecord, revision: int, error: Exception) -> None:
        log.error("reverting edit %s failed after its journal commit (%s: %s); taking the commit back",
                  record.edit_id, type(error).__name__, error)
        try:
            self.journal.undo_revert(record.edit_id, revision)
            self._resync(record.parameters)
        except Exception as undo_error:  # noqa: BLE001
            self._diverge(f"reverting edit {record.edit_id} failed ({error}) and taking its commit back failed too "
                          f"({type(undo_error).__name__}: {undo_error})")
    def _check_sizes(self, facts: list[Fact]) -> None:
        """Every string of every fact within :data:`MAX_FACT_TOKENS` tokens, every prompt list
        within :data:`MAX_FACT_PROMPTS` (InvalidRequest naming the field otherwise)."""
        tokenizer = self.host.tokenizer
        for i, fact in enumerate(facts):
            for name in ("paraphrase_prompts", "neighborhood_prompts"):
                count = len(getattr(fact, name))
                if count > MAX_FACT_PROMPTS:
                    raise InvalidRequest(f"facts[{i}].{name} has {count} prompts, over the limit of {MAX_FACT_PROMPTS}")
            fields = [("prompt", fact.text), ("target_new", fact.target_new), ("target_true", fact.target_true)]
            fields += [(f"paraphrase_prompts[{j}]", p) for j, p in enumerate(fact.paraphrase_prompts)]
            fields += [(f"neighborhood_prompts[{j}]", p) for j, p in enumerate(fact.neighborhood_prompts)]
            for name, text in fields:
                if len(text) > MAX_FACT_TOKENS * _MAX_CHARS_PER_TOKEN:
                    raise InvalidRequest(f"facts[{i}].{name} is {len(text)} characters, over the limit of "
                                         f"{MAX_FACT_TOKENS} tokens")
                tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
                if tokens > MAX_FACT_TOKENS:
                    raise InvalidRequest(f"facts[{i}].{name} is {tokens} tokens, over the limit of {MAX_FACT_TOKENS}")

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

    def revert(self, edit_id: str, should_stop: StopCheck | None = None) -> tuple[int, float]:
        """Remove an edit (a quarantined one too: its revert only changes the journal), on the
        edit thread."""
        return self._on_worker(should_stop, "revert", "", lambda: self._revert(edit_id, should_stop))

    def _revert(self, edit_id: str, should_stop: StopCheck | None = None) -> tuple[int, float]:
        with self._holding_mutex(should_stop, "revert"):
            self._refuse_if_diverged()
            self._follow_locked()  # the edit may come from another replica
            record = self.journal.get(edit_id)
            if record is None or record.status != "active":
                self.metrics.reverts.labels("not_found").inc()
                state = "was already reverted" if record is not None else "does not exist"
                raise UnknownEdit(f"edit {edit_id!r} {state}")
            started = time.perf_counter()
            revision = self.journal.record_revert(edit_id)
            try:
                if record.consolidates or record.consolidated_into:
                    # several edits change at once (the consolidation's members are served on
                    # their own again): serve the journal's state as a whole, exactly replayed
                    pause = self._resync(sorted(self.host.active_parameter_names() | set(record.parameters)))
                elif self._apply_others_first(revision):
                    pause = 0.0
                elif record.quarantined:  # never applied since its artifact went bad: nothing to remove
                    pause = self.host.advance(revision)
                else:
                    pause = self.host.revert(edit_id, revision)
            except Exception as error:
                self._compensate_revert(record, revision, error)
                self.metrics.reverts.labels("failed").inc()
                raise
            seconds = time.perf_counter() - started
            self.metrics.edit_apply.labels("revert").observe(seconds)
            self.metrics.weight_swap_pause.labels("revert").observe(pause)
            self.metrics.reverts.labels("ok").inc()
            self._publish()
            return revision, seconds

    # --- consolidation: many accumulated edits replaced by one joint solve --------------------
    def consolidate(self, edit_ids: list[str], options: dict, *, dry_run: bool = False, description: str = "",
                    should_stop: StopCheck | None = None, idempotency_key: str = "",
                    max_drift: DriftBudget | None = None) -> EditOutcome:
        """Replace active ROME/MEMIT edits (the named ones, or all) by one MEMIT edit solved
        for all their facts together on the weights without them, as one new revision
        (docs/LIFELONG.md, "Consolidation"). The replaced edits stay in the journal, listed
        as consolidated: reverting the consolidation serves them again exactly, and reverting
        one of them serves the others on their own, as if never consolidated."""
        validate_key(idempotency_key, dry_run=dry_run)
        if len(set(edit_ids)) != len(edit_ids) or len(edit_ids) > MAX_BUNDLE_EDITS:
            raise InvalidRequest(f"edit_ids: at most {MAX_BUNDLE_EDITS} distinct ids")
        if len(description) > MAX_DESCRIPTION_CHARS:
            raise InvalidRequest(f"description is {len(description)} characters, over the limit of "
                                 f"{MAX_DESCRIPTION_CHARS}")
        budget = self.default_budget.over(max_drift)
        if budget.active and self.measure_drift is None:
            raise PreconditionFailed("max_drift: this server has no drift probes to check an edit against")
        if CONSOLIDATION_METHOD not in self.methods:
            raise MethodUnavailable(f"consolidation solves with {CONSOLIDATION_METHOD}, which this server does not "
                                    "offer")
        return self._on_worker(should_stop, "edit", CONSOLIDATION_METHOD, lambda: self._consolidate(
            edit_ids, options, dry_run, description, should_stop, idempotency_key, budget))

    def _consolidate(self, edit_ids: list[str], options: dict, dry_run: bool, description: str,
                     should_stop: StopCheck | None, idempotency_key: str, budget: DriftBudget) -> EditOutcome:
        method = CONSOLIDATION_METHOD
        digest = request_digest("consolidate", [], {"edit_ids": sorted(edit_ids), **options}, description) \
            if idempotency_key else ""
        with self._holding_mutex(should_stop, "edit", method):
            self._refuse_if_diverged()
            self._follow_locked()
            if idempotency_key and (earlier := self._earlier(idempotency_key, digest)) is not None:
                return earlier
            records = [self.get(i) for i in edit_ids] if edit_ids else \
                [r for r in self.journal.list() if r.applied and r.method in CONSOLIDATABLE]
            for record in records:
                if not record.applied or record.method not in CONSOLIDATABLE:
                    raise PreconditionFailed(f"edit {record.edit_id} ({record.method}, {record.state}) cannot be "
                                             f"consolidated: only active {sorted(CONSOLIDATABLE)} edits can")
            if len(records) < 2:
                raise PreconditionFailed(f"a consolidation replaces at least 2 active ROME or MEMIT edits; "
                                         f"{len(records)} found")
            facts = [_fact_from_json(f) for r in records for f in r.facts]
            limit = min(METHODS[method].max_facts, self.max_facts)
            if len(facts) > limit:
                raise PreconditionFailed(f"the {len(records)} edits hold {len(facts)} facts, over the limit of "
                                         f"{limit} for one {method} edit")
            ids = [r.edit_id for r in records]
            removed = negated_sum([self.host.active_artifact(i) for i in ids])
            started = time.perf_counter()
            # solved on the weights without them (in this thread); with ``preserve`` the edits
            # that stay keep their keys, the replaced ones' are solved for again, not kept
            with preview(self.host.model, removed), self.host.keys_left_out(ids):
                delta, diagnostics = self._compute(method, facts, options, should_stop)
            compute_seconds = time.perf_counter() - started
            self.metrics.edit_compute.labels(method).observe(compute_seconds)
            check_stop(should_stop, "the consolidation, before scoring it")
            reports = self._scores(facts, delta, removed)
            drift = self._check_drift(method, [removed, delta], budget) if budget.active else None
            notes = [f"consolidates {len(ids)} edits ({len(facts)} facts): {', '.join(ids)}"]
            if dry_run:
                self.metrics.edits.labels(method, "dry_run").inc()
                return EditOutcome("", self.host.revision, False, reports, compute_seconds, 0.0, None, diagnostics,
                                   notes, drift=drift)
            edit_id = self.journal.new_id()
            artifact, sha = self.journal.write_artifact(edit_id, delta)
            try:
                revision = self.journal.record_apply(
                    edit_id=edit_id, method=method, kind=delta.kind.value, facts=[asdict(f) for f in facts],
                    options=options, layers=[int(x) for x in diagnostics.get("layers", [])],
                    parameters=delta.parameter_names, delta_norm=delta.norm(), compute_seconds=compute_seconds,
                    description=description or f"consolidation of {len(ids)} edits", artifact=artifact,
                    sha256=sha, idempotency_key=idempotency_key, request_sha256=digest,
                    outcome={"reports": [asdict(r) for r in reports], "notes": notes}, consolidates=ids,
                    check=lambda: check_stop(should_stop, "the consolidation, before it was journaled"))
            except BaseException:
                self.journal.discard_artifact(artifact)
                raise
            applied_at = time.perf_counter()
            try:
                pause = 0.0 if self._apply_others_first(revision) else self.host.replace(set(ids), edit_id, delta,
                                                                                          revision)
            except Exception as error:
                self._compensate_apply(edit_id, artifact, revision, delta, error)
                self.metrics.edits.labels(method, "failed").inc()
                raise
            apply_seconds = time.perf_counter() - applied_at
            self.metrics.weight_swap_pause.labels("apply").observe(pause)
            self.metrics.edits.labels(method, "consolidated").inc()
            self._publish()
            return EditOutcome(edit_id, revision, True, reports, compute_seconds, apply_seconds,
                               self.journal.get(edit_id), {**diagnostics, "write_lock_seconds": pause}, notes,
                               drift=drift)

    def _served_alone(self) -> list[EditRecord]:
        """The active ROME/MEMIT edits served on their own, not consolidations themselves: what
        the policy replaces (a consolidation is never consolidated again, so reverting one
        original edit stays the two events of docs/LIFELONG.md)."""
        return [r for r in self.journal.list() if r.applied and r.method in CONSOLIDATABLE and not r.consolidates]

    def _consolidate_if_due(self) -> None:
        """Queue the policy's consolidation behind the edit that made it due (called on the
        edit thread with the mutex held, after that edit's commit): the Edit's caller gets its
        reply now, and the solve runs next on the edit thread, ahead of edits queued later."""
        if not self.consolidate_after or CONSOLIDATION_METHOD not in self.methods or self.stopping.is_set() \
                or len(self._served_alone()) < self.consolidate_after:
            return
        try:
            self._worker.submit(in_fresh_thread, self._consolidate_by_policy, "editserve-edit-work")
        except RuntimeError:  # the edit thread is shutting down with the server
            log.info("the consolidation policy's solve was not queued: the server is stopping")

    def _consolidate_by_policy(self) -> None:
        """The policy's consolidation of every edit served alone (if still due when its turn
        comes: an operator may have consolidated or reverted meanwhile). A failure (the drift
        guard refusing the joint solve, another replica consolidating the same edits first) is
        logged and counted; the edits stay served as they were."""
        ids = [r.edit_id for r in self._served_alone()]
        if len(ids) < max(2, self.consolidate_after):
            return
        try:
            outcome = self._consolidate(ids, {}, False, f"consolidation of {len(ids)} edits (consolidate_after = "
                                        f"{self.consolidate_after})", self.stopping.is_set, "", self.default_budget)
        except Cancelled:
            log.info("the consolidation policy's solve of %d edits stopped with the server; nothing journaled", len(ids))
            return
        except Exception as error:  # the edit thread must go on serving edits
            self.metrics.edits.labels(CONSOLIDATION_METHOD, "policy_failed").inc()
            log.warning("the consolidation policy could not consolidate %d edits: %s", len(ids), error)
            return
        log.info("consolidated %d edits into %s (revision %d, %.1f s)", len(ids), outcome.edit_id,
                 outcome.revision, outcome.compute_seconds)

    # --- bundles: moving edits between servers without recomputing them ----------------------
    def export_bundle(self, edit_ids: list[str], should_stop: StopCheck | None = None) -> bytes:
        """The bundle (:mod:`.bundle`) of the named edits, in journal order, or of every active
        one; read on the edit thread so the set cannot change while it is written."""
        if len(edit_ids) > MAX_BUNDLE_EDITS or len(set(edit_ids)) != len(edit_ids):
            raise InvalidRequest(f"edit_ids: at most {MAX_BUNDLE_EDITS} distinct ids")

        def work() -> bytes:
            if edit_ids:
                records = sorted((self.get(i) for i in edit_ids), key=lambda r: r.seq)
            else:
                records = self.journal.list()
            bad = [r.edit_id for r in records if r.quarantined]
            if bad:
                raise PreconditionFailed(f"edits {bad} are quarantined (their artifact is bad): they cannot be exported")
            if not records:
                raise PreconditionFailed("there is no active edit to export")
            edits = [BundledEdit(r.edit_id, r.method, r.kind, r.facts, r.options, r.layers, r.parameters,
                                 r.delta_norm, r.compute_seconds, r.description, r.sha256,
                                 self.journal.artifact_bytes(r)) for r in records]
            return write_bundle(self.host.name, self.host.fingerprint(), self.host.revision, edits)

        return self.run_stable(should_stop, "export", work)

    def import_bundle(self, data: bytes, *, max_drift: DriftBudget | None = None, dry_run: bool = False,
                      should_stop: StopCheck | None = None) -> ImportOutcome:
        """Apply a bundle's edits (each a new journaled edit, in the bundle's order), skipping
        those whose artifact is already active here. Everything is checked first: the format,
        the base model, each artifact's sha256, kind and fit, the facts, and the drift budget
        with every edit to apply previewed together; a failing check applies nothing."""
        manifest, bundled = read_bundle(data, self.host.fingerprint())
        budget = self.default_budget.over(max_drift)
        if budget.active and self.measure_drift is None:
            raise PreconditionFailed("max_drift: this server has no drift probes to check an import against")
        artifacts = [self._bundled_artifact(i, edit) for i, edit in enumerate(bundled)]
        origin = (f"imported from a bundle of {manifest.get('model')!r} exported at its revision "
                  f"{manifest.get('exported_revision')}")
        return self._on_worker(should_stop, "import", "", lambda: self._import(
            bundled, artifacts, budget, dry_run, should_stop, origin))

    def _bundled_artifact(self, i: int, edit: BundledEdit) -> WeightDelta:
        try:
            facts = [_fact_from_json(f) for f in edit.facts]
            validate_facts(facts)
        except (TypeError, AttributeError, InvalidRequest) as error:
            raise InvalidRequest(f"bundle: edits[{i}].facts are not valid facts ({error})") from None
        if len(edit.description) > MAX_DESCRIPTION_CHARS:
            raise InvalidRequest(f"bundle: edits[{i}].description is over {MAX_DESCRIPTION_CHARS} characters")
        with tempfile.NamedTemporaryFile(dir=self.journal.artifacts, prefix=".import-", suffix=".safetensors") as f:
            f.write(edit.data)
            f.flush()
            try:
                artifact = load_artifact_file(Path(f.name), expected=ArtifactKind(edit.kind))
                self.host.check_delta(artifact)
            except ValueError as error:  # ArtifactError too: another kind, unknown format, misfit
                raise PreconditionFailed(f"bundle: edits[{i}] ({edit.method}) cannot be applied to this server: "
                                         f"{error}") from None
        return artifact

    def _import(self, bundled: list[BundledEdit], artifacts: list, budget: DriftBudget, dry_run: bool,
                should_stop: StopCheck | None, origin: str) -> ImportOutcome:
        with self._holding_mutex(should_stop, "edit", "import"):
            self._refuse_if_diverged()
            self._follow_locked()
            active = {r.sha256 for r in self.journal.list()}
            results, todo = [], []
            for edit, artifact in zip(bundled, artifacts, strict=True):
                skipped = edit.sha256 in active
                active.add(edit.sha256)
                results.append(ImportedEdit(edit.source_edit_id, "", 0, skipped, edit.sha256))
                if not skipped:
                    todo.append((len(results) - 1, edit, artifact))
            drift = self._check_drift("import", [a for _, _, a in todo], budget,
                                      f" (the bundle's {len(todo)} edits together)") if budget.active and todo else None
            check_stop(should_stop, "the import, before it was journaled")
            if dry_run:
                return ImportOutcome(results, self.host.revision, drift)
            for index, edit, artifact in todo:
                edit_id = self.journal.new_id()
                name = f"{edit_id}.safetensors"
                self.journal.write_bytes(name, edit.data)
                try:
                    revision = self.journal.record_apply(
                        edit_id=edit_id, method=edit.method, kind=edit.kind, facts=edit.facts, options=edit.options,
                        layers=edit.layers, parameters=edit.parameters, delta_norm=edit.delta_norm,
                        compute_seconds=edit.compute_seconds, description=edit.description, artifact=name,
                        sha256=edit.sha256, outcome={"reports": [], "notes": [f"{origin} (edit {edit.source_edit_id})"]})
                except BaseException:
                    self.journal.discard_artifact(name)
                    raise
                try:
                    if not self._apply_others_first(revision):
                        self.host.apply(edit_id, artifact, revision)
                except Exception as error:
                    self._compensate_apply(edit_id, name, revision, artifact, error)
                    raise
                self.metrics.edits.labels(edit.method, "imported").inc()
                results[index] = replace(results[index], edit_id=edit_id, revision=revision)
            self._publish()
            return ImportOutcome(results, self.host.revision, drift)

    def stop(self) -> None:
        """Stop the edit thread (the server is stopping): work still running stops at its next
        step (``stopping``), work still queued is dropped; waits until the thread is done, so
        no torch work runs while the interpreter shuts down."""
        self.stopping.set()
        self._worker.shutdown(wait=True, cancel_futures=True)

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
