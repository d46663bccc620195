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
