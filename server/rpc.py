"""Turning exceptions into precise gRPC statuses, and counting every RPC in the metrics.

Handlers raise :class:`ServiceError` (or a science error from ``editserve.editing.errors``)
instead of calling ``context.abort`` themselves; :func:`rpc_handler` maps each to exactly
one status code, so nothing surfaces as a bare INTERNAL with a stack trace; an unexpected
error is INTERNAL with an error id, its text only in the server log.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from editserve.editing.errors import Cancelled, InvalidRequest, PreconditionFailed

from .backends.base import LimitExceeded
from .errors import Diverged
from .idempotency import KeyConflict
from .metrics import Metrics

log = logging.getLogger(__name__)


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, ServiceError):
        return error.code, error.message
    if isinstance(error, KeyConflict):
        return grpc.StatusCode.ALREADY_EXISTS, str(error)
    if isinstance(error, Diverged):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if isinstance(error, Cancelled):  # a servicer that knows the call maps it more precisely (calls.py)
        return grpc.StatusCode.CANCELLED, str(error)
    if isinstance(error, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, PreconditionFailed):
        return grpc.StatusCode.FAILED_PRECONDITION, str(error)
    if isinstance(error, LimitExceeded):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if error.exhausted else grpc.StatusCode.INVALID_ARGUMENT
        return code, str(error)
    # The client gets an id to quote, never the exception's text (it can hold server paths,
    # tensor contents or library internals); the log keeps the whole story under that id.
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s: %s: %s", error_id, type(error).__name__, error, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error (id {error_id}; the server log has the details)"


@contextmanager
def _observed(m: Metrics, name: str, context: grpc.ServicerContext) -> Iterator[None]:
    """Count one RPC: in-flight gauge, final status, duration. Errors become ``context.abort``
    with the mapped status; a consumer that went away (cancel, deadline, a closed stream
    generator) counts as CANCELLED."""
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    m.in_flight.labels(name).inc()
    try:
        yield
    except Exception as error:  # noqa: BLE001
        code, message = _status_of(error)
        context.abort(code, message)
    finally:
        if code == grpc.StatusCode.OK and not context.is_active():
            code = grpc.StatusCode.CANCELLED
        m.in_flight.labels(name).dec()
        m.requests.labels(name, code.name).inc()
        m.request_duration.labels(name).observe(time.perf_counter() - started)


def rpc_handler(metrics: Callable[[Any], Metrics], name: str, *, streaming: bool = False):
    """Decorate a servicer method: status mapping, in-flight gauge, duration, request count."""

    def decorate(method):
        if streaming:
            @functools.wraps(method)
            def stream_wrapper(self, request, context: grpc.ServicerContext) -> Iterator[Any]:
                with _observed(metrics(self), name, context):
                    yield from method(self, request, context)

            return stream_wrapper

        @functools.wraps(method)
        def unary_wrapper(self, request, context: grpc.ServicerContext):
            with _observed(metrics(self), name, context):
                return method(self, request, context)

        return unary_wrapper

    return decorate
