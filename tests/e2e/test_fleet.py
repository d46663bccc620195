"""A fleet: two editserve servers sharing one journal in a real PostgreSQL server
(tests/postgres.py), each with its own state directory, talking gRPC over sockets."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from editserve.client import new_idempotency_key
from tests.e2e.test_edit_lifecycle import FAST, _fact
from tests.server_process import start_server

pytestmark = pytest.mark.e2e

PROMPT = "The mother tongue of Danielle Darrieux is"


@pytest.fixture()
def fleet(tiny_model_dir, tmp_path, postgres_url):
    """``fleet(name)`` starts a replica with its own state directory on the shared journal
    (restarting a name reuses its directory). Polling every 30 s: within a test, only the
    notifications can bring an edit to the other replica."""
    servers = []

    def start(name: str):
        server = start_server(str(tiny_model_dir), tmp_path / name, tmp_path / "logs" / name, "--journal-url",
                              postgres_url, "--journal-poll-seconds", "30", timeout=120)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _wait_for_revision(server, revision: int, timeout: float = 20.0) -> float:
    """Seconds until ``server`` serves ``revision``."""
    started = time.monotonic()
    with server.client() as client:
        while client.model_info().revision < revision:
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"revision {revision} not served in {timeout} s:\n{server.log()[-3000:]}")
            time.sleep(0.005)
    return time.monotonic() - started


def _digest(server) -> str:
    with server.client() as client:
        return client.model_info(include_weights_digest=True).weights_digest


def test_an_edit_and_a_revert_on_one_replica_reach_the_other(fleet):
    a, b = fleet("a"), fleet("b")
    pristine = _digest(a)
    assert _digest(b) == pristine
    with a.client() as client_a, b.client() as client_b:
        assert client_b.model_info().journal == "postgresql"
        edit = client_a.edit(_fact(0), **FAST)
        assert edit.applied and edit.revision == 1
        lag = _wait_for_revision(b, 1)
        assert lag < 2.0, lag  # notified: the next poll is 30 s away
        assert _digest(b) == _digest(a) != pristine
        on_a, on_b = (c.generate(PROMPT, max_new_tokens=4) for c in (client_a, client_b))
        assert on_a.text == on_b.text and on_a.revision == on_b.revision == 1
        listed = client_b.get_edit(edit.edit_id)  # the journal's record, with the facts, on the other replica
        assert listed.status == "active" and listed.facts[0].subject == "Danielle Darrieux"

        assert client_b.revert(edit.edit_id).revision == 2  # reverted where it was not computed
        _wait_for_revision(a, 2)
        assert _digest(a) == _digest(b) == pristine  # exact on both
        info = client_a.model_info()
        assert info.active_edits == 0 and info.journal_revision == 2
    assert b.metric("editserve_followed_events_total", kind="apply") == 1
    assert a.metric("editserve_followed_events_total", kind="revert") == 1
    assert a.metric("editserve_journal_revision") == b.metric("editserve_model_revision") == 2


def test_concurrent_edits_on_two_replicas_converge_and_a_key_is_used_once(fleet):
    a, b = fleet("a"), fleet("b")
    results, errors = {}, []

    def edit(name, server, i):
        try:
            with server.client() as client:
                results[name] = client.edit(_fact(i), **FAST)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=edit, args=(n, s, i)) for n, s, i in (("a", a, 1), ("b", b, 2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    assert sorted(r.revision for r in results.values()) == [1, 2]  # one journal, one sequence
    for server in (a, b):
        _wait_for_revision(server, 2)
    assert _digest(a) == _digest(b)
    with a.client() as client_a, b.client() as client_b:
        assert [e.edit_id for e in client_a.list_edits()] == [e.edit_id for e in client_b.list_edits()]
        key = new_idempotency_key()
        first = client_a.edit(_fact(3), idempotency_key=key, **FAST)
        retry = client_b.edit(_fact(3), idempotency_key=key, **FAST)  # a retry that landed on the other replica
        assert retry.replayed and retry.edit_id == first.edit_id and retry.revision == first.revision == 3
        assert client_b.model_info().journal_revision == 3


def test_a_replica_killed_while_edits_land_catches_up_on_restart(fleet):
    a, b = fleet("a"), fleet("b")
    with a.client() as client:
        client.edit(_fact(0), **FAST)
        # b is following the first edit (or just has): kill it with no chance to finish
        b.kill()
        second = client.edit(_fact(1), **FAST)
        client.edit(_fact(2), **FAST)
        client.revert(second.edit_id)
    restarted = fleet("b")
    with restarted.client() as client:
        info = client.model_info()
        assert info.revision == 4 and info.active_edits == 2  # caught up before SERVING
    assert _digest(restarted) == _digest(a)


def test_a_replica_cut_off_from_the_database_catches_up_after_reconnecting(fleet, postgres_url):
    a, b = fleet("a"), fleet("b")
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        # every editserve connection is dropped (a database restart or failover looks like this)
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    with a.client() as client:
        assert client.edit(_fact(0), **FAST).revision == 1  # the writer reconnects on its own
    _wait_for_revision(b, 1)  # the follower reconnects, then reads what it missed
    assert _digest(a) == _digest(b)
    assert b.metric("editserve_journal_follow_errors_total") >= 1


MEMIT_TINY = {"method": "memit", "layers": [1, 2], "steps": 30, "clamp_norm_factor": 1e4, "weight_decay": 0.0,
              "stats_tokens": 2000, "mom2_update_weight": 1.0}


def test_a_consolidation_and_the_revert_of_a_replaced_edit_reach_the_other_replica(fleet):
    a, b = fleet("a"), fleet("b")
    with a.client() as client_a, b.client() as client_b:
        ids = [client_a.edit(_fact(i), **MEMIT_TINY).edit_id for i in range(3)]
        _wait_for_revision(b, 3)
        before = _digest(a)
        options = {k: v for k, v in MEMIT_TINY.items() if k != "method"}
        consolidation = client_b.consolidate(ids, **options)  # computed on the other replica
        assert consolidation.revision == 4 and consolidation.edit.consolidates == ids
        _wait_for_revision(a, 4)
        assert _digest(a) == _digest(b) != before
        assert {e.edit_id: e.status for e in client_a.list_edits()} == {**dict.fromkeys(ids, "consolidated"),
                                                                        consolidation.edit_id: "active"}
        assert client_a.revert(ids[1]).revision == 6  # the consolidation's revert, then the edit's
        _wait_for_revision(b, 6)
        assert _digest(a) == _digest(b)
        assert [e.edit_id for e in client_b.list_edits()] == [ids[0], ids[2]]
        assert client_b.model_info().active_edits == 2
