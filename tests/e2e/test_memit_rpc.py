"""MEMIT over a real socket on a tiny random Llama: one Edit writes several facts over several
layers, reverts bit-exactly, replays after a restart; every bad request is INVALID_ARGUMENT
naming the problem with the weights unchanged."""

from __future__ import annotations

import time

import pytest

from editserve.client import Fact, InvalidArgument
from tests.server_process import start_server

pytestmark = pytest.mark.e2e

MEMIT_TINY = {"method": "memit", "layers": [1, 2], "steps": 30, "clamp_norm_factor": 1e4, "weight_decay": 0.0,
              "stats_tokens": 2000, "mom2_update_weight": 1.0}
# single-token targets of the tiny tokenizer, so 30 steps visibly move them on a random model
FACTS = [Fact("The language of {}", "Danielle Darrieux", "founded"), Fact("The capital of {}", "Italy", "founded"),
         Fact("The sport of {}", "Michael Jordan", "capital")]


@pytest.fixture()
def server(tiny_model_dir, tmp_path):
    started = [start_server(str(tiny_model_dir), tmp_path / "state", tmp_path / "logs", "--max-edit-facts", "5",
                            timeout=120)]
    yield started
    for s in started:
        s.stop()


def test_memit_batch_edit_revert_and_replay(server, tiny_model_dir, tmp_path):
    with server[0].client() as client:
        pristine = client.model_info(include_weights_digest=True).weights_digest
        result = client.edit(FACTS, **MEMIT_TINY)
        assert result.applied and len(result.facts) == 3
        for report in result.facts:
            assert report.rewrite.p_new_after > report.rewrite.p_new_before, report
        info = client.get_edit(result.edit_id)
        assert info.method == "memit" and info.layers == [1, 2] and len(info.facts) == 3
        assert sorted(info.parameters) == [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2)]
        edited = client.model_info(include_weights_digest=True).weights_digest
        assert edited != pristine
    server[0].stop()
    server.append(start_server(str(tiny_model_dir), tmp_path / "state", tmp_path / "logs", timeout=120))
    with server[1].client() as client:
        assert client.model_info(include_weights_digest=True).weights_digest == edited  # replayed
        client.revert(result.edit_id)
        assert client.model_info(include_weights_digest=True).weights_digest == pristine


@pytest.mark.parametrize("facts, options, message", [
    ([], {}, "at least one fact"),
    (FACTS * 2, {}, "limit for memit is 5"),
    ([FACTS[0], Fact(FACTS[0].prompt, FACTS[0].subject, "capital")], {}, "two different targets"),
    (FACTS, {"layers": [1, 9]}, "out of range"),
    (FACTS, {"mom2_update_weight": float("nan")}, "mom2_update_weight must be in"),
    (FACTS, {"steps": 5000}, "steps must be in"),
    (FACTS, {"learning_rate": float("inf")}, "lr must be in"),
    (FACTS, {"layers": [1, 1]}, "repeat"),
    (FACTS, {"preserve": True, "null_space_threshold": float("nan")}, "null_space_threshold must be in"),
    (FACTS, {"preserve": True, "preserve_ridge": -1.0}, "preserve_ridge must be in"),
])
def test_bad_batches_are_refused_and_change_nothing(server, facts, options, message):
    with server[0].client() as client:
        pristine = client.model_info(include_weights_digest=True).weights_digest
        with pytest.raises(InvalidArgument, match=message):
            client.edit(facts, **{**MEMIT_TINY, **options})
        assert client.model_info(include_weights_digest=True).weights_digest == pristine
        assert client.list_edits() == []


def test_cli_writes_a_facts_file_as_one_edit(server, tmp_path):
    import json
    import subprocess
    import sys

    path = tmp_path / "facts.json"
    path.write_text(json.dumps([{"prompt": f.prompt, "subject": f.subject, "target_new": f.target_new}
                                for f in FACTS[:2]]))
    sets = [arg for key, value in MEMIT_TINY.items() if key != "method"
            for arg in ("--set", f"{key}={','.join(map(str, value)) if isinstance(value, list) else value}")]
    done = subprocess.run([sys.executable, "-m", "editserve.client.cli", "edit", "--server", server[0].target,
                           "--method", "memit", "--facts", str(path), "--dry-run", *sets],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("dry run") and done.stdout.count("rewrite") == 2, done.stdout


def test_edits_past_the_queue_bound_are_refused(tiny_servers):
    """With one place for Edit/Trace calls, a second edit while one computes gets
    RESOURCE_EXHAUSTED at once instead of holding a gRPC worker thread."""
    import threading

    from editserve.client import ResourceExhausted

    server = tiny_servers("--max-queued-edits", "1")
    with server.client() as client:
        errors = []

        def edit_slowly():
            try:
                client.edit(FACTS, **{**MEMIT_TINY, "steps": 300, "dry_run": True})  # near-uniform logits: no early stop
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(error)

        slow = threading.Thread(target=edit_slowly)
        slow.start()
        try:
            deadline = time.monotonic() + 30
            while server.metric("editserve_requests_in_flight", rpc="Edit") < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.metric("editserve_requests_in_flight", rpc="Edit") == 1, errors
            with pytest.raises(ResourceExhausted, match="max_queued_edits=1"):
                client.edit(FACTS[:1], **MEMIT_TINY)
        finally:
            slow.join()
        assert errors == [] and client.list_edits() == []


def test_the_consolidation_policy_replaces_accumulated_edits_and_survives_a_restart(tiny_model_dir, tmp_path):
    """``--consolidate-after 2`` over a socket: the second Edit's reply comes first, then the
    server consolidates both in the background; the consolidation is journaled like any edit
    and replays after a restart; reverting one original edit serves the other alone again."""
    server = start_server(str(tiny_model_dir), tmp_path / "state", tmp_path / "logs", "--consolidate-after", "2",
                          timeout=120)
    try:
        with server.client() as client:
            first = client.edit([FACTS[0]], **MEMIT_TINY)
            second = client.edit([FACTS[1]], **MEMIT_TINY)
            assert first.applied and second.applied
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                merged = [e for e in client.list_edits() if e.consolidates]
                if merged:
                    break
                time.sleep(0.2)
            (merged,) = merged
            assert merged.consolidates == [first.edit_id, second.edit_id] and merged.method == "memit"
            assert {e.edit_id: e.status for e in client.list_edits()}[first.edit_id] == "consolidated"
            consolidated = client.model_info(include_weights_digest=True).weights_digest
            assert client.model_info().revision == 3
    finally:
        server.stop()
    server = start_server(str(tiny_model_dir), tmp_path / "state", tmp_path / "logs", timeout=120)
    try:
        with server.client() as client:
            assert client.model_info(include_weights_digest=True).weights_digest == consolidated
            client.revert(first.edit_id)
            states = {e.edit_id: e.status for e in client.list_edits(include_reverted=True)}
            assert states[second.edit_id] == "active" and states[merged.edit_id] == "reverted"
    finally:
        server.stop()


def test_stop_at_top_reaches_the_server_and_writes_a_smaller_change(server):
    """``stop_at_top`` over gRPC: the dry run's target probability is lower than optimising on to
    the NLL threshold gives (the optimisation stopped once the target was on top), still above
    the unedited one; nothing is applied."""
    with server[0].client() as client:
        full = client.edit([FACTS[0]], **MEMIT_TINY, dry_run=True).facts[0].rewrite
        early = client.edit([FACTS[0]], **MEMIT_TINY, stop_at_top=True, dry_run=True).facts[0].rewrite
        assert full.p_new_before == early.p_new_before < early.p_new_after < full.p_new_after
        assert client.list_edits() == []


def test_a_preserving_consolidation_over_grpc_keeps_the_edit_it_does_not_replace(server):
    """Consolidate two of three edits with keys-only ``preserve`` over a socket: it is
    accepted (it used to be refused), one revision, and the edit left out stays served."""
    with server[0].client() as client:
        ids = [client.edit([fact], **MEMIT_TINY).edit_id for fact in FACTS]
        options = {k: v for k, v in MEMIT_TINY.items() if k != "method"}
        merged = client.consolidate(ids[1:], preserve=True, preserve_projection=False, **options)
        assert merged.applied and merged.revision == 4
        states = {e.edit_id: e.status for e in client.list_edits()}
        assert states[ids[0]] == "active" and states[ids[1]] == states[ids[2]] == "consolidated"
        with pytest.raises(InvalidArgument, match="mom2_update_weight must be in"):
            client.consolidate([ids[0], merged.edit_id], preserve=True, mom2_update_weight=float("nan"), **{
                k: v for k, v in options.items() if k != "mom2_update_weight"})
        assert client.model_info().revision == 4
