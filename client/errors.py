"""Exceptions that carry the server's gRPC status code and message."""

from __future__ import annotations

import grpc


class EditserveError(Exception):
    """A failed call. ``code`` is the gRPC status, ``details`` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidArgument(EditserveError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(EditserveError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(EditserveError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(EditserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(EditserveError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(EditserveError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(EditserveError):
    """No credential, or one the server does not accept (docs/SECURITY.md)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(EditserveError):
    """A valid credential whose role does not allow this call (e.g. a reader calling Edit)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class AlreadyExists(EditserveError):
    """E.g. an Edit whose idempotency key already names an edit made from another request."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Cancelled(EditserveError):
    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(EditserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted, Unavailable, Unimplemented,
                Unauthenticated, PermissionDenied, AlreadyExists, Cancelled, DeadlineExceeded)
}


def from_rpc_error(error: grpc.RpcError) -> EditserveError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    cls = _BY_CODE.get(code, EditserveError)
    return cls(details or "", code)
