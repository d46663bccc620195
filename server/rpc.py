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


class _Undecodable:
    """What a request that failed to parse becomes, so the handler (not gRPC) answers it."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:  # noqa: BLE001 - DecodeError, invalid UTF-8, anything the parser raises
            return _Undecodable(error)

    return parse


class MalformedRequestInterceptor(grpc.ServerInterceptor):
    """Answers a request whose bytes do not parse as its message with INVALID_ARGUMENT.

    Why: grpcio answers a failing request deserializer with a hard-coded INTERNAL ("Exception
    deserializing request!"), so truncated bytes, garbage or invalid UTF-8 in a string field
    (which a client in another language can send) looked like a server fault. The
    deserializer is made lenient and the handler refuses the undecodable request itself; it
    runs inside the auth interceptor's guard, so a caller without a credential is still told
    UNAUTHENTICATED first. ``on_refused(rpc, code)`` counts the refusal beside other RPCs."""

    def __init__(self, services: tuple[str, ...], on_refused: Callable[[str, grpc.StatusCode], None]) -> None:
        self.prefixes = tuple(f"/{name}/" for name in services)
        self.on_refused = on_refused

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self.prefixes) or handler.request_deserializer is None \
                or handler.stream_stream is not None:
            return handler
        rpc = method.rsplit("/", 1)[-1]

        def refuse_if_undecodable(request, context: grpc.ServicerContext):
            if isinstance(request, _Undecodable):
                self.on_refused(rpc, grpc.StatusCode.INVALID_ARGUMENT)
                log.info("%s from %s: undecodable request: %s", rpc, context.peer(), request.error)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"the request is not a valid {rpc} request message (it does not parse)")
            return request

        def wrap(behavior):
            def checked(request, context: grpc.ServicerContext):
                return behavior(refuse_if_undecodable(request, context), context)

            return checked

        def checked_messages(requests, context: grpc.ServicerContext):
            """A client stream's messages as the handler reads them: an undecodable one ends the
            call as INVALID_ARGUMENT through the handler's own status mapping (it is raised
            inside the handler, where an abort would read as an internal error)."""
            for request in requests:
                if isinstance(request, _Undecodable):
                    log.info("%s from %s: undecodable stream message: %s", rpc, context.peer(), request.error)
                    raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"a message of the {rpc} stream is not a valid request message (it does not "
                                       "parse)")
                yield request

        def wrap_stream(behavior):
            def checked(requests, context: grpc.ServicerContext):
                return behavior(checked_messages(requests, context), context)

            return checked

        serializers = {"request_deserializer": _lenient(handler.request_deserializer),
                       "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **serializers)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(wrap_stream(handler.stream_unary), **serializers)
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **serializers)


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
