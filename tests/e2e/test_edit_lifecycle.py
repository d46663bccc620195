"""The edit lifecycle over a real socket: edit, dry run, revert, list, restart, crash.

A tiny random Llama is served from a local directory; ROME runs on it for real (its
statistics and context templates are computed by the server), so these tests exercise the
journal, exact revert and replay without the cost of the real model."""

from __future__ import annotations

import random
import signal
import threading
import time

import pytest

from editserve.client import EditserveError, Fact, InvalidArgument, NotFound
from tests.server_process import start_server

pytestmark = pytest.mark.e2e

# ROME on a random tiny model needs room to move: no norm clamp, no weight decay, few stats.
ROME_TINY = {"layer": 1, "steps": 40, "clamp_norm_factor": 1e4, "weight_decay": 0.0, "stats_tokens": 2000}
# The lifecycle is method-agnostic; FT-L on layer 1 is the fastest real edit on a tiny model.
FAST = {"method": "ft_l", "layer": 1, "steps": 10, "learning_rate": 1e-2, "norm_constraint": 0.05}


def _fact(i: int) -> Fact:
    subjects = ["Danielle Darrieux", "Michael Jordan", "Steve Jobs", "Lionel Messi", "Bill Gates", "Seattle"]
    targets = ["English", "football", "Microsoft", "basketball", "Apple", "Paris"]
    return Fact("The mother tongue of {} is", subjects[i % len(subjects)], targets[(i + 1) % len(targets)])


@pytest.fixture()
def served(tiny_model_dir, tmp_path):
    servers = []

    def start(*extra: str):
        server = start_server(str(tiny_model_dir), tmp_path / "state", tmp_path / "logs", *extra, timeout=120)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_edit_revert_is_exact_and_survives_restart(served):
    server = served()
    with server.client() as client:
        pristine = client.model_info(include_weights_digest=True).weights_digest
        dry = client.edit(_fact(0), dry_run=True, **FAST)
        assert not dry.applied and dry.edit_id == "" and dry.revision == 0
        assert client.model_info(include_weights_digest=True).weights_digest == pristine
        first = client.edit(_fact(0), description="e2e", **FAST)
        assert first.applied and first.revision == 1
        report = first.facts[0].rewrite
        assert report.p_new_after > report.p_new_before  # the edit moved the target
        assert report.p_new_before == pytest.approx(dry.facts[0].rewrite.p_new_before)
        second = client.edit(_fact(1), **FAST)
        with_both = client.model_info(include_weights_digest=True).weights_digest
        assert len({pristine, with_both}) == 2
        generated = client.generate("The mother tongue of Danielle Darrieux is", max_new_tokens=3)
        assert generated.revision == 2
        assert [e.edit_id for e in client.list_edits()] == [first.edit_id, second.edit_id]
        info = client.get_edit(first.edit_id)
        assert info.status == "active" and info.layers == [1] and info.delta_norm > 0 and info.description == "e2e"
        assert client.revert(first.edit_id).revision == 3
        with pytest.raises(NotFound, match="already reverted"):
            client.revert(first.edit_id)
        only_second = client.model_info(include_weights_digest=True).weights_digest
    assert server.metric("editserve_edits_total", method="ft_l", status="applied") == 2
    assert server.metric("editserve_active_edits") == 1
    # generation was held off only for the weight swaps: two applies and one revert, well under 50 ms
    assert server.metric("editserve_weight_swap_pause_seconds_count", operation="apply") == 2
    assert server.metric("editserve_weight_swap_pause_seconds_count", operation="revert") == 1
    assert 0 < server.metric("editserve_weight_swap_pause_seconds_sum", operation="apply") < 0.05
    server.stop()

    restarted = served()
    with restarted.client() as client:
        info = client.model_info(include_weights_digest=True)
        assert info.revision == 3 and info.active_edits == 1
        assert info.weights_digest == only_second  # replayed bit-exactly, no recomputation
        assert [e.status for e in client.list_edits(include_reverted=True)] == ["reverted", "active"]
        client.revert(second.edit_id)
        assert client.model_info(include_weights_digest=True).weights_digest == pristine


def test_rome_edit_and_revert_over_grpc(served):
    server = served()
    with server.client() as client:
        pristine = client.model_info(include_weights_digest=True).weights_digest
        result = client.edit(_fact(2), **ROME_TINY)
        assert result.applied and result.edit.method == "rome" and result.edit.layers == [1]
        # (quality is the real-model tests' job: a random 4-layer model has no facts to move)
        assert result.edit.delta_norm > 0 and len(result.edit.parameters) == 1
        assert client.model_info(include_weights_digest=True).weights_digest != pristine
        client.revert(result.edit_id)
        assert client.model_info(include_weights_digest=True).weights_digest == pristine
        for path in ("/nonexistent/corpus", "/etc/passwd"):  # a request never names a server path
            with pytest.raises(InvalidArgument, match="paths are not accepted"):
                client.edit(_fact(0), layer=1, steps=5, stats_source=path)
        with pytest.raises(InvalidArgument, match="layer"):
            client.edit(_fact(0), layer=40)
        assert client.model_info(include_weights_digest=True).weights_digest == pristine


def test_bad_edits_change_nothing(served):
    server = served()
    with server.client() as client:
        pristine = client.model_info(include_weights_digest=True).weights_digest
        cases = [
            (Fact("The mother tongue of {} is {}", "x", "y"), {}, InvalidArgument, "exactly one"),
            (Fact("The mother tongue of {} is", "", "y"), {}, InvalidArgument, "subject is empty"),
            (Fact("The mother tongue of {} is", "x", " "), {}, InvalidArgument, "target_new is empty"),
            (Fact("The mother tongue of {} is", "x", "y"), {"layer": 99}, InvalidArgument, "layer"),
        ]
        for fact, options, error, message in cases:
            with pytest.raises(error, match=message):
                client.edit(fact, **{**FAST, **options})
        with pytest.raises(InvalidArgument):
            client.edit([], **FAST)
        info = client.model_info(include_weights_digest=True)
        assert info.weights_digest == pristine and info.revision == 0 and client.list_edits() == []


def test_sigkill_mid_edits_loses_nothing_committed(served, tiny_model_dir, tmp_path):
    """Edits and reverts race a SIGKILL; after restart the weights equal a clean replay of
    the committed journal, and every acknowledged operation is there."""
    from editserve.server.host import ModelHost
    from editserve.server.journal import Journal
    from editserve.server.models import load_model

    server = served()
    acknowledged_edits: list[str] = []
    acknowledged_reverts: list[str] = []
    stop = threading.Event()

    def churn():
        rng = random.Random(0)
        with server.client(timeout=30) as client:
            i = 0
            while not stop.is_set():
                try:
                    if acknowledged_edits and rng.random() < 0.35:
                        victim = rng.choice([e for e in acknowledged_edits if e not in acknowledged_reverts] or [None])
                        if victim:
                            client.revert(victim)
                            acknowledged_reverts.append(victim)
                    else:
                        acknowledged_edits.append(client.edit(_fact(i), **FAST).edit_id)
                    i += 1
                except EditserveError:
                    return  # the server died under us
                except Exception:  # noqa: BLE001 - connection reset
                    return

    worker = threading.Thread(target=churn)
    worker.start()
    deadline = time.monotonic() + 60
    while len(acknowledged_edits) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(1).uniform(0.05, 0.4))  # land the kill somewhere inside an operation
    server.stop(signal.SIGKILL)
    stop.set()
    worker.join(30)
    assert len(acknowledged_edits) >= 4

    restarted = served()
    with restarted.client() as client:
        info = client.model_info(include_weights_digest=True)
        listed = {e.edit_id: e.status for e in client.list_edits(include_reverted=True)}
    for edit_id in acknowledged_edits:
        assert edit_id in listed, "an acknowledged edit was lost"
    for edit_id in acknowledged_reverts:
        assert listed[edit_id] == "reverted", "an acknowledged revert was lost"

    # clean replay of the committed journal, in this process, from the pristine model
    model, tokenizer, _ = load_model(str(tiny_model_dir))
    host = ModelHost(model, tokenizer, name="tiny", dtype="fp32", device="cpu")
    journal = Journal(tmp_path / "state", host.fingerprint())
    records = journal.list()
    host.load_state([(r.edit_id, journal.load_artifact(r)) for r in records], journal.revision())
    assert info.weights_digest == host.weights_digest()
    assert info.revision == journal.revision() and info.active_edits == len(records)
    journal.close()
