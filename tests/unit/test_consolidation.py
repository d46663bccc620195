"""Consolidation with the real pieces (a tiny Llama in a ModelHost, a real journal, MEMIT
computed for real): many edits replaced by one joint solve, one revision, exactly revertible
as a whole and per replaced edit."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from editserve.editing.errors import InvalidRequest, PreconditionFailed
from editserve.editing.facts import Fact
from editserve.server.drift import DriftMonitor
from editserve.server.drift_budget import DriftBudget
from editserve.server.edits import EditManager, stable_weights
from editserve.server.host import ModelHost
from editserve.server.journal import Journal
from editserve.server.methods import build_methods
from editserve.server.metrics import Metrics
from tests.tiny import tiny_model

MEMIT = {"layers": [1, 2], "steps": 30, "clamp_norm_factor": 1e4, "weight_decay": 0.0, "stats_tokens": 2000,
         "mom2_update_weight": 1.0}
FT = {"layer": 1, "steps": 10, "learning_rate": 1e-2, "norm_constraint": 0.05}
# single-token targets of the tiny tokenizer (tests/e2e/test_memit_rpc.py)
FACTS = [Fact("The language of {}", "Danielle Darrieux", "founded"), Fact("The capital of {}", "Italy", "founded"),
         Fact("The sport of {}", "Michael Jordan", "capital")]


class Served:
    def __init__(self, path: Path, tokenizer, cache: Path) -> None:
        model, tok = tiny_model("llama", tokenizer=tokenizer)
        self.host = ModelHost(model, tok, name="tiny", dtype="fp32", device="cpu")
        self.journal = Journal(path, self.host.fingerprint())
        table = build_methods(self.host, cache, {})
        metrics = Metrics()
        self.manager = EditManager(self.host, self.journal, dict(table.compute), table.score, metrics)
        drift = DriftMonitor(self.host, metrics, stable_weights(self.manager))  # as the server wires it
        self.manager.measure_drift, self.manager.drift_probes = drift.measure, len(drift.probes)
        self.manager.replay()

    def digest(self) -> str:
        return self.host.weights_digest()

    def p_new(self, fact: Fact) -> float:
        return self.manager.scorer([fact.text], [fact.target_new])[0]

    def states(self) -> dict[str, str]:
        return {r.edit_id: r.state for r in self.journal.list(include_reverted=True)}


@pytest.fixture()
def make(tmp_path, tiny_tokenizer):
    cache = tmp_path / "cache"  # statistics shared by both servers of a test

    def build(name: str) -> Served:
        return Served(tmp_path / name, tiny_tokenizer, cache)

    return build


def _edit_each(served: Served) -> list[str]:
    return [served.manager.edit("memit", [fact], MEMIT, report=False).edit_id for fact in FACTS]


def test_a_consolidation_is_one_revision_holds_the_facts_and_reverts_exactly(make):
    served = make("a")
    pristine = {f.subject: served.p_new(f) for f in FACTS}
    ids = _edit_each(served)
    with_edits = served.digest()
    outcome = served.manager.consolidate([], MEMIT)
    assert outcome.applied and outcome.revision == 4  # one revision for three edits
    assert served.host.active_edit_ids == [outcome.edit_id]
    assert served.journal.get(outcome.edit_id).consolidates == ids
    assert [served.states()[i] for i in ids] == ["consolidated"] * 3
    for report in outcome.reports:  # the joint solve writes every fact
        assert report.rewrite.p_new_after > pristine[report.fact.subject], report
        assert served.p_new(report.fact) == pytest.approx(report.rewrite.p_new_after, rel=1e-4)
    consolidated = served.digest()
    assert consolidated != with_edits

    restarted = make("a")  # replay serves the consolidation, not the replaced edits
    assert restarted.digest() == consolidated and restarted.host.active_edit_ids == [outcome.edit_id]

    assert served.manager.revert(outcome.edit_id)[0] == 5
    assert served.digest() == with_edits  # the replaced edits serve again, bit for bit
    assert served.host.active_edit_ids == ids and [served.states()[i] for i in ids] == ["active"] * 3


def test_reverting_one_replaced_edit_serves_the_others_as_if_never_consolidated(make):
    served, witness = make("a"), make("b")
    ids = _edit_each(served)
    # the witness holds the same three artifacts (a bundle: the same bytes) and is never consolidated
    imported = witness.manager.import_bundle(served.manager.export_bundle([]))
    witness.manager.revert(imported.edits[1].edit_id)
    expected = witness.digest()

    consolidation = served.manager.consolidate([], MEMIT).edit_id
    revision, _ = served.manager.revert(ids[1])
    assert revision == 6  # the consolidation's revert (5), then the edit's (6)
    assert served.digest() == expected
    assert served.states() == {ids[0]: "active", ids[1]: "reverted", ids[2]: "active", consolidation: "reverted"}
    assert served.host.active_edit_ids == [ids[0], ids[2]]
    assert make("a").digest() == expected  # and so does a restart


def test_what_cannot_be_consolidated_changes_nothing(make):
    served = make("a")
    first = served.manager.edit("memit", [FACTS[0]], MEMIT, report=False).edit_id
    with pytest.raises(PreconditionFailed, match="at least 2 active ROME or MEMIT edits; 1 found"):
        served.manager.consolidate([], MEMIT)
    ft = served.manager.edit("ft_l", [FACTS[1]], FT, report=False).edit_id
    with pytest.raises(PreconditionFailed, match=rf"edit {ft} \(ft_l, active\) cannot be consolidated"):
        served.manager.consolidate([first, ft], MEMIT)
    second = served.manager.edit("memit", [FACTS[2]], MEMIT, report=False).edit_id
    with pytest.raises(InvalidRequest, match="mom2_update_weight must be in"):
        served.manager.consolidate([], {**MEMIT, "preserve": True, "mom2_update_weight": float("nan")})
    before = (served.digest(), served.host.revision, served.states())
    dry = served.manager.consolidate([first, second], MEMIT, dry_run=True)
    assert not dry.applied and dry.edit_id == "" and len(dry.reports) == 2
    with pytest.raises(PreconditionFailed, match="max_drift.max_kl"):
        served.manager.consolidate([first, second], MEMIT, max_drift=DriftBudget(1e-12))
    assert (served.digest(), served.host.revision, served.states()) == before


def test_a_schema_3_journal_gains_the_consolidation_columns(tmp_path):
    Journal(tmp_path, "fp").close()
    db = sqlite3.connect(tmp_path / "journal.sqlite3")
    with db:  # what schema 3 looked like: no consolidation columns
        db.execute("ALTER TABLE edits DROP COLUMN consolidates")
        db.execute("ALTER TABLE edits DROP COLUMN consolidated_into")
        db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    db.close()
    journal = Journal(tmp_path, "fp")
    assert journal.schema_version() == 4 and journal.list() == []
    columns = {row[1] for row in sqlite3.connect(tmp_path / "journal.sqlite3").execute("PRAGMA table_info(edits)")}
    assert {"consolidates", "consolidated_into"} <= columns


def test_the_policy_consolidates_in_the_background_once_enough_edits_are_served_alone(make):
    """``consolidate_after``: the edit that makes N edits served on their own gets its reply,
    then the edit thread replaces those N by one joint solve; a consolidation is never
    consolidated again, so the next round takes only the edits made after it."""
    served = make("a")
    served.manager.consolidate_after = 3
    first = [served.manager.edit("memit", [fact], MEMIT, report=False).edit_id for fact in FACTS[:2]]
    assert served.host.active_edit_ids == first  # two served alone: not due
    third = served.manager.edit("memit", [FACTS[2]], MEMIT, report=False).edit_id
    served.manager.run_stable(None, "test", lambda: None)  # queued behind the policy's solve
    (merged,) = served.host.active_edit_ids
    record = served.journal.get(merged)
    assert record.consolidates == [*first, third] and "consolidate_after = 3" in record.description
    assert [served.states()[i] for i in (*first, third)] == ["consolidated"] * 3
    later = _edit_each(served)
    served.manager.run_stable(None, "test", lambda: None)
    assert len(served.host.active_edit_ids) == 2  # the first consolidation and a second one
    assert served.host.active_edit_ids[0] == merged
    assert served.journal.get(served.host.active_edit_ids[1]).consolidates == later
    served.manager.revert(later[0])  # one original edit: the others of its round are served alone again
    assert served.host.active_edit_ids == [merged, *later[1:]]


def test_the_policy_gives_up_when_the_server_stops(make):
    served = make("a")
    served.manager.consolidate_after = 2
    served.manager.stopping.set()
    _edit_each(served)
    served.manager.stop()  # waits for the edit thread: nothing was queued
    assert len(served.host.active_edit_ids) == 3 and all(s == "active" for s in served.states().values())


def test_a_preserving_consolidation_keeps_the_other_edits_keys_and_solves_its_own_again(make):
    """``preserve`` (keys only) in the joint solve: the edits that stay (here the first)
    keep their keys where they map; the replaced edits' keys are not "preserved" (their facts
    are what is solved for), so the consolidation still writes them."""
    from editserve.editing.scoring import score

    plain, kept = make("plain"), make("kept")
    for served, options in ((plain, {**MEMIT, "preserve": False}),
                            (kept, {**MEMIT, "preserve": True, "preserve_projection": False})):
        ids = _edit_each(served)
        outcome = served.manager.consolidate(ids[1:], options)
        for report in outcome.reports:
            assert score(served.host.model, served.host.tokenizer, [report.fact.text],
                         [report.fact.target_new])[0].probability > report.rewrite.p_new_before, report
        # the solve kept the first edit's one key per layer, not the replaced edits' two
        assert [layer["preserved_keys"] for layer in outcome.diagnostics["per_layer"]] == \
            ([1, 1] if served is kept else [0, 0])
        served.change = served.host.active_artifact(outcome.edit_id)
        served.first_keys = served.host.active_artifact(ids[0]).keys
    assert kept.first_keys.keys() == plain.first_keys.keys()
    for name, keys in kept.first_keys.items():
        moved = {s: float((s.change.delta(name) @ keys).norm()) for s in (plain, kept)}
        assert moved[kept] < 0.5 * moved[plain], (name, moved)
