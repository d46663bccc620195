"""The edit manager's trust rules with the real pieces: a tiny Llama in a ModelHost, a real
journal on disk and FT-L computed for real. Faults (a failing swap, a failing undo) are
injected by replacing one method on one instance, since nothing real fails on demand."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from editserve.editing.errors import Cancelled, InvalidRequest
from editserve.editing.facts import Fact
from editserve.server.edits import EditManager, stable_weights
from editserve.server.errors import Diverged
from editserve.server.host import ModelHost
from editserve.server.idempotency import KeyConflict
from editserve.server.journal import Journal, JournalError
from editserve.server.methods import build_methods
from editserve.server.metrics import Metrics
from tests.tiny import tiny_model

FT = {"layer": 1, "steps": 10, "learning_rate": 1e-2, "norm_constraint": 0.05}
FACT = Fact("The mother tongue of {} is", "Danielle Darrieux", "English")
OTHER = Fact("The mother tongue of {} is", "Michael Jordan", "French")


class Served:
    """A host, its journal in ``path`` and a manager, as the server wires them; ``calls``
    counts compute calls (a replayed reply must not compute)."""

    def __init__(self, path: Path, tokenizer) -> None:
        model, tok = tiny_model("llama", tokenizer=tokenizer)
        self.host = ModelHost(model, tok, name="tiny", dtype="fp32", device="cpu")
        self.pristine = self.host.weights_digest()
        self.journal = Journal(path, self.host.fingerprint())
        table = build_methods(self.host, path / "cache", {})
        self.calls = 0

        def counted(facts, options, should_stop=None):
            self.calls += 1
            return table.compute["ft_l"](facts, options, should_stop)

        self.metrics = Metrics()
        self.manager = EditManager(self.host, self.journal, {"ft_l": counted}, table.score, self.metrics)
        self.manager.replay()

    def artifacts(self) -> list[str]:
        return sorted(p.name for p in self.journal.artifacts.iterdir() if p.is_file())

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture()
def served(tmp_path, tiny_tokenizer):
    return Served(tmp_path / "state", tiny_tokenizer)


def _nothing_happened(served: Served) -> None:
    assert served.journal.list(include_reverted=True) == [] and served.journal.revision() == 0
    assert served.artifacts() == [] and served.host.weights_digest() == served.pristine


# --- deadlines and cancellation ---------------------------------------------------------------
def test_a_caller_that_gives_up_mid_compute_gets_nothing_journaled(served):
    checks = []

    def gone_after_three() -> bool:
        checks.append(1)
        return len(checks) > 3

    with pytest.raises(Cancelled, match="FT-L"):
        served.manager.edit("ft_l", [FACT], FT, should_stop=gone_after_three)
    assert len(checks) == 4  # stopped at the first check that said so: no step ran after it
    _nothing_happened(served)
    assert served.metric("editserve_edits_total", method="ft_l", status="abandoned") == 1


def test_a_caller_gone_at_the_commit_gets_nothing_journaled(served):
    """The last check runs inside the journal transaction, once the artifact is written."""
    def gone_once_written() -> bool:
        return bool(served.artifacts())

    with pytest.raises(Cancelled, match="before it was journaled"):
        served.manager.edit("ft_l", [FACT], FT, should_stop=gone_once_written, idempotency_key="k")
    _nothing_happened(served)
    assert served.journal.by_key("k") is None
    # the same request, with a caller that stays, goes through (the key was not consumed)
    assert served.manager.edit("ft_l", [FACT], FT, idempotency_key="k").revision == 1


def test_the_wait_for_the_edit_mutex_ends_when_the_caller_gives_up(served):
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with stable_weights(served.manager):  # a long trace, say
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    deadline = time.monotonic() + 0.3
    started = time.monotonic()
    try:
        with pytest.raises(Cancelled, match="wait for the edit mutex"):
            served.manager.edit("ft_l", [FACT], FT, should_stop=lambda: time.monotonic() > deadline)
        assert time.monotonic() - started < 2
        with pytest.raises(Cancelled, match="wait for the edit mutex"):
            served.manager.revert("nope", should_stop=lambda: True)
    finally:
        release.set()
        holder.join()
    assert served.calls == 0
    _nothing_happened(served)


def test_edits_reverts_and_long_reads_run_on_edit_threads_that_end_with_them(served):
    """Per-thread native state grew the server's memory when these ran on whichever gRPC
    worker took the call, and a live thread's idle OpenMP team slows every decode step
    (docs/RELIABILITY.md, Load; server/fresh_thread.py): every caller thread here is new, and
    the work must run on a thread that is none of the callers' and is gone once it returns."""
    seen: list[threading.Thread] = []
    errors: list[BaseException] = []

    def remember_compute(facts, options, should_stop=None):
        seen.append(threading.current_thread())
        return compute(facts, options, should_stop)

    compute = served.manager.methods["ft_l"]
    served.manager.methods["ft_l"] = remember_compute
    callers: list[threading.Thread] = []

    def from_new_thread(work) -> None:
        def run() -> None:
            try:
                work()
            except BaseException as error:  # noqa: BLE001 - re-raised in the test's thread below
                errors.append(error)

        thread = threading.Thread(target=run)
        callers.append(thread)
        thread.start()
        thread.join(60)
        assert not thread.is_alive()

    outcomes: list = []
    for i in range(2):
        from_new_thread(lambda: outcomes.append(served.manager.edit("ft_l", [FACT], FT)))
        from_new_thread(lambda: served.manager.run_stable(None, "trace", lambda: seen.append(threading.current_thread())))
        from_new_thread(lambda i=i: served.manager.revert(outcomes[i].edit_id))
    assert not errors, errors
    assert len(seen) == 4 and threading.current_thread() not in seen and not set(seen) & set(callers)
    assert all(t.name == "editserve-edit-work" and not t.is_alive() for t in seen)
    assert served.host.weights_digest() == served.pristine

def test_queued_work_whose_caller_gave_up_never_starts(served):
    """The work ahead ends and the queued call's caller is gone at the same moment: the edit
    thread must not start the queued work before the waiting thread's next poll notices
    (CI saw a Score computed, unread, after its client's deadline)."""
    release, ran, errors = threading.Event(), [], []

    def ahead() -> None:
        release.wait(30)

    def queued() -> None:
        try:  # gone exactly when the work ahead ends: the worker is free before any poll sees it
            served.manager.run_stable(release.is_set, "score", lambda: ran.append("score"))
        except Cancelled as error:
            errors.append(error)

    first = threading.Thread(target=lambda: served.manager.run_stable(None, "trace", ahead))
    first.start()
    time.sleep(0.2)
    second = threading.Thread(target=queued)
    second.start()
    time.sleep(0.2)
    release.set()
    first.join(30)
    second.join(30)
    assert ran == [] and len(errors) == 1, (ran, errors)
    # an edit queued the same way is counted as abandoned, once
    release.clear()
    first = threading.Thread(target=lambda: served.manager.run_stable(None, "trace", ahead))
    first.start()
    time.sleep(0.2)
    outcome: list = []
    edit = threading.Thread(target=lambda: outcome.append(_raises_cancelled(
        lambda: served.manager.edit("ft_l", [FACT], FT, should_stop=release.is_set))))
    edit.start()
    time.sleep(0.2)
    release.set()
    first.join(30)
    edit.join(30)
    assert outcome == [True] and served.calls == 0
    _nothing_happened(served)
    assert served.metric("editserve_edits_total", method="ft_l", status="abandoned") == 1


def _raises_cancelled(work) -> bool:
    try:
        work()
    except Cancelled:
        return True
    return False


# --- idempotency keys --------------------------------------------------------------------------
def test_a_retry_with_the_same_key_returns_the_original_reply(served, tmp_path, tiny_tokenizer):
    first = served.manager.edit("ft_l", [FACT], FT, description="why", idempotency_key="edit-1")
    digest = served.host.weights_digest()
    again = served.manager.edit("ft_l", [FACT], FT, description="why", idempotency_key="edit-1")
    assert served.calls == 1 and again.replayed and not first.replayed
    assert (again.edit_id, again.revision, again.applied) == (first.edit_id, first.revision, True)
    assert again.reports == first.reports and again.compute_seconds == first.compute_seconds
    assert any("a retry" in n for n in again.notes)
    assert served.journal.revision() == 1 and served.host.weights_digest() == digest
    assert served.metric("editserve_edits_total", method="ft_l", status="replayed") == 1

    for changed in ({"facts": [OTHER]}, {"options": {**FT, "steps": 11}}, {"description": "other"}):
        args = {"facts": [FACT], "options": FT, "description": "why", **changed}
        with pytest.raises(KeyConflict, match=f"already names edit {first.edit_id}"):
            served.manager.edit("ft_l", args["facts"], args["options"], description=args["description"],
                                idempotency_key="edit-1")
    assert served.calls == 1 and served.journal.revision() == 1

    served.manager.revert(first.edit_id)  # a reverted edit keeps its key: a late retry re-applies nothing
    served.journal.close()
    restarted = Served(tmp_path / "state", tiny_tokenizer)  # keys survive a restart
    late = restarted.manager.edit("ft_l", [FACT], FT, description="why", idempotency_key="edit-1")
    assert late.replayed and late.edit_id == first.edit_id and late.record.state == "reverted"
    assert restarted.calls == 0 and restarted.journal.revision() == 2


@pytest.mark.parametrize("key, dry_run, message", [
    ("k" * 129, False, "1 to 128 visible ASCII"),
    ("has space", False, "visible ASCII"),
    ("caf\u00e9", False, "visible ASCII"),
    ("tab\there", False, "visible ASCII"),
    ("fine", True, "dry run"),
])
def test_bad_keys_are_refused_before_anything_runs(served, key, dry_run, message):
    with pytest.raises(InvalidRequest, match=f"idempotency_key.*{message}|{message}"):
        served.manager.edit("ft_l", [FACT], FT, dry_run=dry_run, idempotency_key=key)
    assert served.calls == 0
    _nothing_happened(served)
    served.manager.edit("ft_l", [FACT], FT, idempotency_key="k" * 128)  # the limit itself is fine


# --- journal and weights never disagree ----------------------------------------------------
def _fail_once_after_the_swap(host: ModelHost) -> None:
    """The host's next commit swaps everything in (weights, active set, revision) and then
    raises: the worst case, where memory already says the operation happened."""
    real = host._commit

    def commit(*args):
        host._commit = real
        real(*args)
        raise RuntimeError("out of memory (injected)")

    host._commit = commit


def test_a_failed_apply_is_taken_back(served):
    _fail_once_after_the_swap(served.host)
    with pytest.raises(RuntimeError, match="injected"):
        served.manager.edit("ft_l", [FACT], FT, idempotency_key="k")
    _nothing_happened(served)  # row, event and file gone; the swapped tensors and active set restored
    assert served.host.active_edit_ids == [] and served.host.revision == 0
    assert served.journal.by_key("k") is None and not served.manager.diverged
    assert served.manager.edit("ft_l", [FACT], FT, idempotency_key="k").revision == 1


def test_a_failed_revert_is_taken_back(served):
    edit = served.manager.edit("ft_l", [FACT], FT)
    edited = served.host.weights_digest()
    _fail_once_after_the_swap(served.host)
    with pytest.raises(RuntimeError, match="injected"):
        served.manager.revert(edit.edit_id)
    assert served.journal.get(edit.edit_id).status == "active" and served.journal.revision() == 1
    assert served.host.weights_digest() == edited and served.host.revision == 1
    assert served.host.active_edit_ids == [edit.edit_id]


def test_when_taking_back_fails_too_the_manager_diverges(served):
    reasons = []
    served.manager.on_divergence = reasons.append
    _fail_once_after_the_swap(served.host)

    def broken_undo(edit_id, revision):
        raise JournalError("disk full (injected)")

    served.journal.undo_apply = broken_undo
    with pytest.raises(RuntimeError, match="out of memory"):
        served.manager.edit("ft_l", [FACT], FT)
    assert len(reasons) == 1 and "disk full" in reasons[0] and served.manager.diverged == reasons[0]
    with pytest.raises(Diverged, match="restart"):
        served.manager.edit("ft_l", [OTHER], FT)
    with pytest.raises(Diverged, match="restart"):
        served.manager.revert("anything")


# --- quarantine at start-up ----------------------------------------------------------------
def test_replay_quarantines_a_file_of_the_wrong_kind_and_replays_the_rest(served, tmp_path, tiny_tokenizer):
    """The header check: the file is intact (its sha256 matches) but is not what its row says."""
    first = served.manager.edit("ft_l", [FACT], FT)
    second = served.manager.edit("ft_l", [OTHER], FT)
    served.manager.revert(first.edit_id)
    only_second = served.host.weights_digest()
    served.manager.revert(second.edit_id)
    served.journal._db.execute("UPDATE edits SET status = 'active' WHERE edit_id = ?", (first.edit_id,))
    served.journal._db.execute("UPDATE edits SET status = 'active', kind = 'runtime_layer' WHERE edit_id = ?",
                               (second.edit_id,))
    served.journal.close()
    restarted = Served(tmp_path / "state", tiny_tokenizer)
    states = {r.edit_id: (r.state, r.quarantined) for r in restarted.journal.list()}
    assert states[first.edit_id] == ("active", "")
    assert states[second.edit_id][0] == "quarantined" and "expected a runtime_layer" in states[second.edit_id][1]
    assert restarted.host.active_edit_ids == [first.edit_id]
    assert restarted.metric("editserve_quarantined_edits") == 1
    assert restarted.metric("editserve_edit_quarantines_total") == 1
    # revert acknowledges it: the journal moves on, the served weights do not change
    digest = restarted.host.weights_digest()
    revision, _ = restarted.manager.revert(second.edit_id)
    assert restarted.host.revision == revision == restarted.journal.revision()
    assert restarted.host.weights_digest() == digest and restarted.metric("editserve_quarantined_edits") == 0
    restarted.manager.revert(first.edit_id)
    assert restarted.host.weights_digest() == restarted.pristine != only_second
