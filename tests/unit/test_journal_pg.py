"""The shared PostgreSQL journal against a real PostgreSQL server (tests/postgres.py): what
two replicas, each with its own local directory, see of each other's writes."""

import hashlib

import psycopg
import pytest
import torch

from editserve.editing.artifacts import WeightDelta
from editserve.server.journal import DuplicateKey, JournalError, JournalUnavailable
from editserve.server.journal_pg import CHANNEL, PostgresJournal
from tests.unit.test_journal import _delta, _record


def _pair(url, tmp_path, fingerprint="fp"):
    return PostgresJournal(url, tmp_path / "a", fingerprint), PostgresJournal(url, tmp_path / "b", fingerprint)


def test_two_replicas_share_revisions_events_and_artifacts(postgres_url, tmp_path):
    a, b = _pair(postgres_url, tmp_path)
    assert _record(a, "e1", _delta(0)) == 1
    assert _record(b, "e2", _delta(1)) == 2  # revisions are fleet-wide, never reused
    assert a.record_revert("e2") == 3
    assert b.events_after(0) == [(1, "apply", "e1"), (2, "apply", "e2"), (3, "revert", "e2")]
    assert a.events_after(2) == [(3, "revert", "e2")]
    records, revision = b.snapshot()
    assert [r.edit_id for r in records] == ["e1"] and revision == 3
    # b never wrote e1: its bytes come from the database, checked and kept as b's local copy
    assert not (tmp_path / "b" / "artifacts" / "e1.safetensors").exists()
    loaded = b.load_artifact(b.get("e1"))
    assert torch.equal(loaded.delta("m.weight"), _delta(0).delta("m.weight"))
    assert (tmp_path / "b" / "artifacts" / "e1.safetensors").read_bytes() == \
        (tmp_path / "a" / "artifacts" / "e1.safetensors").read_bytes()
    with pytest.raises(KeyError):
        b.record_revert("e2")  # already reverted, by the other replica
    a.close()
    b.close()
    reopened = PostgresJournal(postgres_url, tmp_path / "c", "fp")
    assert reopened.revision() == 3 and reopened.schema_version() == 1 and reopened.model_fingerprint() == "fp"


def test_an_idempotency_key_is_unique_across_replicas(postgres_url, tmp_path):
    a, b = _pair(postgres_url, tmp_path)
    _record(a, "x", _delta(0), key="k", outcome={"notes": ["first"], "reports": []})
    with pytest.raises(DuplicateKey):
        _record(b, "y", _delta(1), key="k")
    assert b.get("y") is None and b.revision() == 1
    assert b.by_key("k").edit_id == "x" and b.by_key("k").outcome["notes"] == ["first"]


def test_a_failing_check_inside_the_commit_journals_nothing(postgres_url, tmp_path):
    journal = PostgresJournal(postgres_url, tmp_path, "fp")

    def gone():
        raise RuntimeError("the client gave up")

    with pytest.raises(RuntimeError, match="gave up"):
        _record(journal, "a", _delta(0), key="k", check=gone)
    assert journal.get("a") is None and journal.revision() == 0
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT COUNT(*) FROM editserve_artifacts").fetchone()[0] == 0
    assert _record(journal, "a", _delta(0), key="k") == 1


def test_undo_appends_an_event_instead_of_deleting_one(postgres_url, tmp_path):
    """Another replica may already have applied the event: the log only grows."""
    journal = PostgresJournal(postgres_url, tmp_path, "fp")
    _record(journal, "a", _delta(0))
    journal.undo_apply("a", 1)
    assert journal.events_after(0) == [(1, "apply", "a"), (2, "revert", "a")]
    assert journal.get("a").status == "reverted" and journal.revision() == 2
    _record(journal, "b", _delta(1))
    revision = journal.record_revert("b")
    journal.undo_revert("b", revision)
    assert journal.events_after(3) == [(4, "revert", "b"), (5, "apply", "b")]
    assert journal.get("b").status == "active" and journal.get("b").reverted_revision == 0
    assert [r.edit_id for r in journal.snapshot()[0]] == ["b"]


def test_another_model_is_refused(postgres_url, tmp_path):
    PostgresJournal(postgres_url, tmp_path / "a", "fp1").close()
    with pytest.raises(JournalError, match="another model"):
        PostgresJournal(postgres_url, tmp_path / "b", "fp2")


def test_a_bad_local_copy_is_fetched_again_and_a_bad_stored_copy_is_refused(postgres_url, tmp_path):
    journal = PostgresJournal(postgres_url, tmp_path, "fp")
    _record(journal, "a", _delta(0))
    local = tmp_path / "artifacts" / "a.safetensors"
    good = local.read_bytes()
    local.write_bytes(good[:-3] + b"xyz")
    journal.load_artifact(journal.get("a"))  # repaired from the database, not quarantined
    assert local.read_bytes() == good and hashlib.sha256(good).hexdigest() == journal.get("a").sha256
    with psycopg.connect(postgres_url) as conn:
        conn.execute("UPDATE editserve_artifacts SET data = %s WHERE edit_id = 'a'", (good[:-3] + b"xyz",))
    local.unlink()
    with pytest.raises(JournalError, match="in the journal database is corrupted"):
        journal.load_artifact(journal.get("a"))


def test_every_commit_is_announced_with_its_revision(postgres_url, tmp_path):
    journal = PostgresJournal(postgres_url, tmp_path, "fp")
    with psycopg.connect(postgres_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        _record(journal, "a", _delta(0))
        journal.record_revert("a")
        payloads = [n.payload for n in listener.notifies(timeout=5, stop_after=2)]
    assert payloads == ["1", "2"]


def _backends(admin) -> list[int]:
    return [row[0] for row in admin.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                            "AND pid <> pg_backend_pid()").fetchall()]


def test_a_dropped_connection_is_replaced_and_an_unreachable_database_is_unavailable(postgres_url, tmp_path):
    journal = PostgresJournal(postgres_url, tmp_path, "fp")
    _record(journal, "a", _delta(0))
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        before = _backends(admin)
        assert len(before) == 1
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        assert _record(journal, "b", _delta(1)) == 2  # no request fails for a connection dropped while idle
        after = _backends(admin)
    assert len(after) == 1 and after != before  # on a new connection
    with pytest.raises(JournalUnavailable, match="cannot reach"):
        PostgresJournal("postgresql://nobody@127.0.0.1:1/none", tmp_path / "x", "fp")


def test_large_artifacts_are_stored_in_chunks_and_read_back_whole(postgres_url, tmp_path, monkeypatch):
    import editserve.server.journal_pg as journal_pg

    monkeypatch.setattr(journal_pg, "ARTIFACT_CHUNK_BYTES", 100)  # a bytea holds 1 GB; here, 100 bytes
    a, b = _pair(postgres_url, tmp_path)
    big = WeightDelta(dense={"m.weight": torch.arange(300.0).reshape(10, 30)})
    _record(a, "big", big)
    with psycopg.connect(postgres_url) as conn:
        chunks = conn.execute("SELECT COUNT(*), MAX(length(data)) FROM editserve_artifacts").fetchone()
    size = (tmp_path / "a" / "artifacts" / "big.safetensors").stat().st_size
    assert chunks == (-(-size // 100), 100)
    assert torch.equal(b.load_artifact(b.get("big")).delta("m.weight"), big.delta("m.weight"))


def test_a_consolidation_and_the_revert_of_a_replaced_edit_are_seen_by_every_replica(postgres_url, tmp_path):
    a, b = _pair(postgres_url, tmp_path)
    _record(a, "x", _delta(0))
    _record(a, "y", _delta(1))
    name, sha = b.write_artifact("c", _delta(2))
    assert b.record_apply(edit_id="c", method="memit", kind="weight_delta", facts=[], options={}, layers=[1],
                          parameters=["m.weight"], delta_norm=1.0, compute_seconds=1.0, description="",
                          artifact=name, sha256=sha, consolidates=["x", "y"]) == 3
    assert {r.edit_id: r.state for r in a.list()} == {"x": "consolidated", "y": "consolidated", "c": "active"}
    assert a.get("c").consolidates == ["x", "y"]
    assert a.record_revert("y") == 5  # the consolidation's revert (4), then y's (5)
    assert b.events_after(3) == [(4, "revert", "c"), (5, "revert", "y")]
    assert {r.edit_id: r.state for r in b.list(include_reverted=True)} == {"x": "active", "y": "reverted",
                                                                            "c": "reverted"}
    name, sha = b.write_artifact("d", _delta(3))
    with pytest.raises(JournalError, match="edit y is no longer active on its own"):
        b.record_apply(edit_id="d", method="memit", kind="weight_delta", facts=[], options={}, layers=[1],
                       parameters=["m.weight"], delta_norm=1.0, compute_seconds=1.0, description="",
                       artifact=name, sha256=sha, consolidates=["x", "y"])
    assert b.get("d") is None and b.revision() == 5
