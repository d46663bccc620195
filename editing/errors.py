"""Errors the science raises, each mapped by the server to one precise gRPC status.

- InvalidRequest      -> INVALID_ARGUMENT (the caller can fix the request)
- PreconditionFailed  -> FAILED_PRECONDITION (the request is well-formed but cannot be done
  in the current state: an unreadable statistics source, an optimisation that diverged)
"""

from __future__ import annotations


class EditingError(Exception):
    """Base class: everything here leaves the model unchanged."""


class InvalidRequest(EditingError, ValueError):
    """The request itself is malformed (missing "{}", empty subject, layer out of range...)."""


class PreconditionFailed(EditingError):
    """Well-formed, but cannot be carried out now (NaN in the optimisation, no statistics)."""
