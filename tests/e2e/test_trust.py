"""Trust over a real socket (issue 15): edits stop for a client that gave up, idempotency
keys, quarantine of bad artifacts at start-up, graceful shutdown. A real `editserve serve`
subprocess on a tiny random Llama; files are damaged on disk for real."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import threading
import time

import grpc
import pytest
from click.testing import CliRunner

from editserve.client import (
    AlreadyExists,
    AsyncEditserveClient,
    DeadlineExceeded,
    Fact,
    InvalidArgument,
    Unavailable,
    convert,
)
from editserve.client._pb import editing_pb2_grpc
from editserve.client.cli import main as cli

pytestmark = pytest.mark.e2e

FAST = {"method": "ft_l", "layer": 1, "steps": 10, "learning_rate": 1e-2, "norm_constraint": 0.05}
# ROME whose key statistics are sampled from the model itself, 10M tokens of it: minutes of
# compute on the tiny model, checked for cancellation between two batches of the estimate
LONG = {"method": "rome", "layer": 1, "stats_source": "model", "stats_tokens": 10_000_000}
NO_PREP = "--no-prepare-statistics"  # the background preparation would hold the edit mutex
TOKENS = 1500  # generated during a shutdown: about 4 s on the tiny model


def _fact(i: int) -> Fact:
    subjects = ["Danielle Darrieux", "Michael Jordan", "Steve Jobs", "Lionel Messi"]
    return Fact("The mother tongue of {} is", subjects[i % len(subjects)], ["English", "French"][i % 2])


def _eventually(check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_edits_stop_when_the_client_gives_up(tiny_servers):
    server = tiny_servers(NO_PREP)
    with server.client() as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            client.edit(_fact(0), timeout=1.5, **LONG)  # computing when its deadline passes
        assert time.monotonic() - started < 5

        channel = grpc.insecure_channel(server.target)
        estimates = server.log().count("key statistics, layers")
        running = editing_pb2_grpc.EditingStub(channel).Edit.future(convert.edit_request(_fact(1), **LONG))
        _eventually(lambda: server.metric("editserve_requests_in_flight", rpc="Edit") == 1)
        # it holds the edit mutex once its statistics estimate has started (its progress bar
        # is in the log): on a loaded machine being in flight is not yet holding the mutex
        _eventually(lambda: server.log().count("key statistics, layers") > estimates)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            client.edit(_fact(2), timeout=1.0, **FAST)  # queued behind it: the wait is bounded too
        with pytest.raises(DeadlineExceeded):
            client.score([("The capital of France is", " Paris")], timeout=1.0)  # so are score and trace
        assert time.monotonic() - started < 5
        running.cancel()
        channel.close()
        # the cancelled computation really stopped: the next edit gets the mutex in seconds,
        # not after the minutes the statistics estimate would take
        done = client.edit(_fact(3), timeout=30, **FAST)
        assert done.revision == 1 and [e.edit_id for e in client.list_edits(include_reverted=True)] == [done.edit_id]
    # the CLI: a deadline leaves the outcome unknown to it, so it prints the key to retry with
    result = CliRunner().invoke(cli, ["edit", "--server", server.target, "--prompt", "The mother tongue of {} is",
                                      "--subject", "Steve Jobs", "--target", "French", "--layer", "1", "--set",
                                      "stats_source=model", "--set", "stats_tokens=10000000", "--timeout", "1"])
    assert result.exit_code == 2 and "DEADLINE_EXCEEDED" in result.output, result.output
    assert "rerun with --idempotency-key " in result.output
    _eventually(lambda: server.metric("editserve_edits_total", method="rome", status="abandoned") == 3)
    assert server.metric("editserve_edits_total", method="ft_l", status="abandoned") == 1
    assert server.metric("editserve_requests_total", rpc="Edit", code="DEADLINE_EXCEEDED") == 3
    assert server.metric("editserve_requests_total", rpc="Edit", code="CANCELLED") == 1
    _eventually(lambda: server.metric("editserve_requests_total", rpc="Score", code="DEADLINE_EXCEEDED") == 1)
    assert "stopped during" in server.log()


def test_idempotency_keys_over_the_wire_and_across_a_restart(tiny_servers):
    server = tiny_servers(NO_PREP)
    with server.client() as client:
        first = client.edit(_fact(0), idempotency_key="deploy-42/fact-0", **FAST)
        again = client.edit(_fact(0), idempotency_key="deploy-42/fact-0", **FAST)
        assert again.replayed and not first.replayed and again.edit_id == first.edit_id
        assert again.revision == first.revision == 1 and again.facts == first.facts
        assert again.edit.idempotency_key == "deploy-42/fact-0"
        with pytest.raises(AlreadyExists, match=first.edit_id):
            client.edit(_fact(1), idempotency_key="deploy-42/fact-0", **FAST)
        for bad in ("x" * 129, "two words"):
            with pytest.raises(InvalidArgument, match="idempotency_key.*128"):
                client.edit(_fact(1), idempotency_key=bad, **FAST)
        assert client.model_info().revision == 1 and len(client.list_edits()) == 1
    server.stop()

    restarted = tiny_servers(NO_PREP)
    args = ["edit", "--server", restarted.target, "--prompt", "The mother tongue of {} is", "--subject",
            "Danielle Darrieux", "--target", "English", "--method", "ft_l", "--layer", "1", "--set", "steps=10",
            "--set", "learning_rate=0.01", "--set", "norm_constraint=0.05", "--idempotency-key", "deploy-42/fact-0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"edit {first.edit_id} was already made under this idempotency key" in result.output
    with restarted.client() as client:
        assert client.model_info().revision == 1

    async def retry_async():
        async with AsyncEditserveClient(restarted.target) as client:
            return await client.edit(_fact(0), idempotency_key="deploy-42/fact-0", **FAST)

    late = asyncio.run(retry_async())
    assert late.replayed and late.edit_id == first.edit_id


def test_bad_artifacts_are_quarantined_and_the_rest_replays(tiny_servers, tmp_path):
    server = tiny_servers(NO_PREP)
    with server.client() as client:
        pristine = client.model_info(include_weights_digest=True).weights_digest
        truncated, deleted, kept = (client.edit(_fact(i), **FAST).edit_id for i in range(3))
    server.stop()
    artifacts = tmp_path / "state" / "artifacts"
    path = artifacts / f"{truncated}.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    (artifacts / f"{deleted}.safetensors").unlink()

    restarted = tiny_servers(NO_PREP)
    with restarted.client() as client:
        info = client.model_info(include_weights_digest=True)
        assert info.revision == 3 and info.active_edits == 1
        edits = {e.edit_id: e for e in client.list_edits()}
        assert [edits[i].status for i in (truncated, deleted, kept)] == ["quarantined", "quarantined", "active"]
        assert client.get_edit(truncated).quarantine_reason.endswith("is corrupted (sha256 mismatch)")
        assert edits[deleted].quarantine_reason.endswith("is missing")
        assert (artifacts / "quarantine" / f"{truncated}.safetensors").stat().st_size == 100
        client.revert(kept)  # the replayed edit was the only change: reverting it gives the base back
        assert client.model_info(include_weights_digest=True).weights_digest == pristine
        client.revert(truncated)  # acknowledging a quarantined edit changes the journal only
        assert client.get_edit(truncated).status == "reverted"
        assert client.model_info(include_weights_digest=True).weights_digest == pristine
    assert restarted.metric("editserve_quarantined_edits") == 1
    assert restarted.metric("editserve_edit_quarantines_total") == 2
    assert restarted.log().count("QUARANTINED") == 2


def test_sigterm_lets_generations_finish_and_refuses_new_calls(tiny_servers, tmp_path):
    # Generations long enough (about 4 s alone) to still run while the refusal is checked, and
    # a generous grace, many times that, for a loaded machine.
    config = tmp_path / "serve.toml"
    config.write_text("version = 1\n[serve]\nmax_new_tokens_limit = 2000\n")
    server = tiny_servers(NO_PREP, "--shutdown-grace", "60", "--config", str(config))
    chunks, errors = [], []
    first = threading.Event()

    def read() -> None:
        with server.client() as client:
            try:
                for chunk in client.stream("The capital of France is", max_new_tokens=TOKENS, ignore_eos=True):
                    chunks.append((time.monotonic(), chunk))
                    first.set()
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(error)

    def generate() -> None:
        with server.client() as client:
            try:
                unary.append(client.generate("The capital of Italy is", max_new_tokens=TOKENS, ignore_eos=True))
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(error)

    unary = []
    reader, generator = threading.Thread(target=read), threading.Thread(target=generate)
    reader.start()
    generator.start()
    assert first.wait(30)
    _eventually(lambda: server.metric("editserve_requests_in_flight", rpc="Generate") == 1)
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert chunks[-1][1].finish_reason is None  # the stream runs when the signal arrives
    with server.client() as client:
        _eventually(lambda: client.health() == "NOT_SERVING", timeout=5)
        with pytest.raises(Unavailable, match="shutting down"):
            client.generate("Hello", max_new_tokens=2)
        refused = time.monotonic()
    reader.join(60)
    generator.join(60)
    assert not errors, errors
    assert unary[0].finish_reason == "length" and unary[0].generated_tokens == TOKENS
    assert refused < chunks[-1][0]  # refused while the stream was still running
    last = chunks[-1][1]
    assert last.finish_reason == "length" and last.generated_tokens == TOKENS
    assert server.proc.wait(60) == 0
    exited = time.monotonic()
    assert exited - signalled < 60 + 10 and exited - chunks[-1][0] < 15  # no waiting once nothing is in flight


def test_sigterm_past_the_grace_period_abandons_an_edit(tiny_servers, tmp_path):
    server = tiny_servers(NO_PREP, "--shutdown-grace", "1")
    outcome = []

    def edit() -> None:
        with server.client() as client:
            try:
                client.edit(_fact(0), **LONG)
            except Exception as error:  # noqa: BLE001 - the expected end
                outcome.append(error)

    editor = threading.Thread(target=edit)
    editor.start()
    _eventually(lambda: server.metric("editserve_requests_in_flight", rpc="Edit") == 1)
    time.sleep(0.5)
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert time.monotonic() - signalled < 1 + 20  # the grace, then stopping the engine (slow on a loaded machine)
    editor.join(30)
    assert outcome and outcome[0].code.name in ("UNAVAILABLE", "CANCELLED"), outcome
    db = sqlite3.connect(tmp_path / "state" / "journal.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM edits").fetchone()[0] == 0
    db.close()
    assert "still in flight after the grace period" in server.log()
