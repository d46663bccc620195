"""How exceptions become gRPC statuses: precise codes, and INTERNAL without the exception text."""

import logging

import grpc

from editserve.editing.errors import InvalidRequest
from editserve.server.rpc import _status_of


def test_internal_errors_carry_an_id_not_the_text(caplog):
    with caplog.at_level(logging.ERROR, logger="editserve.server.rpc"):
        code, message = _status_of(RuntimeError("cannot open /srv/secret/token"))
    assert code == grpc.StatusCode.INTERNAL
    assert "secret" not in message and "RuntimeError" not in message
    error_id = message.split("id ")[1].split(";")[0]
    assert len(error_id) == 12
    assert error_id in caplog.text and "/srv/secret/token" in caplog.text  # the log has it all


def test_known_errors_keep_their_codes():
    assert _status_of(InvalidRequest("steps must be in [1, 500]")) == (
        grpc.StatusCode.INVALID_ARGUMENT, "steps must be in [1, 500]")


def test_heavy_calls_take_bounded_places():
    import pytest

    from editserve.server.config import ServeConfig
    from editserve.server.rpc import ServiceError
    from editserve.server.runtime import Runtime

    runtime = Runtime(ServeConfig(max_queued_edits=2, max_concurrent_scores=1))
    with runtime.heavy_slot("edit"), runtime.heavy_slot("edit"):
        with pytest.raises(ServiceError) as caught:
            with runtime.heavy_slot("edit"):
                pass
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queued_edits=2" in caught.value.message
        with runtime.heavy_slot("score"):  # pools are separate
            pass
    with runtime.heavy_slot("edit"):  # places come back
        pass
    with pytest.raises(ValueError, match="max_queued_edits"):
        ServeConfig(max_queued_edits=0)


def test_trust_errors_keep_their_codes():
    from editserve.editing.errors import Cancelled
    from editserve.server.errors import Diverged
    from editserve.server.idempotency import KeyConflict

    assert _status_of(KeyConflict("key k names edit e"))[0] == grpc.StatusCode.ALREADY_EXISTS
    assert _status_of(Diverged("restart"))[0] == grpc.StatusCode.UNAVAILABLE
    assert _status_of(Cancelled("stopped during FT-L"))[0] == grpc.StatusCode.CANCELLED


def test_shutdown_grace_is_bounded_and_the_drain_waits_for_calls():
    import threading
    import time

    import pytest

    from editserve.server.config import ServeConfig
    from editserve.server.runtime import Runtime

    for bad in (-1, 601, float("nan"), "20", True):
        with pytest.raises(ValueError, match=r"shutdown_grace_seconds must be in \[0, 600"):
            ServeConfig(shutdown_grace_seconds=bad)
    assert ServeConfig(shutdown_grace_seconds=0).shutdown_grace_seconds == 0
    runtime = Runtime(ServeConfig())
    assert runtime.wait_idle(0)
    runtime.acquire_slot()
    assert not runtime.wait_idle(0.05) and runtime.in_flight() == 1
    threading.Timer(0.2, runtime.release_slot).start()
    started = time.monotonic()
    assert runtime.wait_idle(5) and time.monotonic() - started < 2  # woken by the release, not the timeout
