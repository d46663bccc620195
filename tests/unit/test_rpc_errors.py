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
