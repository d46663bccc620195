"""The edit lifecycle over a real socket: edit, dry run, revert, list, restart, crash.

A tiny random Llama is served from a local directory; ROME runs on it for real (its
statistics and context templates are computed by the server), so these tests exercise the
journal, exact revert and replay without the cost of the real model."""

from __future__ import annotations

import time

import pytest

from editserve.client import Fact, InvalidArgument, NotFound
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
    # the drift gauges say which revision they measured: the revert's, once its refresh ran
    deadline = time.monotonic() + 30
    while server.metric("editserve_drift_revision") != 3:
        assert time.monotonic() < deadline, server.metric("editserve_drift_revision")
        time.sleep(0.05)
    assert server.metric("editserve_model_revision") == 3
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


# SIGKILL amid edits and reverts: tests/e2e/test_crash.py (restarted weights compared with the
# live digest the killed server served and with an event-by-event replay, not replay vs replay).
