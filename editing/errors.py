"""Errors the science raises, each mapped by the server to one precise gRPC status.

- InvalidRequest      -> INVALID_ARGUMENT (the caller can fix the request)
- PreconditionFailed  -> FAILED_PRECONDITION (the request is well-formed but cannot be done
  in the current state: an unreadable statistics source, an optimisation that diverged)
- Cancelled           -> DEADLINE_EXCEEDED or CANCELLED (the caller gave up; the server
  decides which from the call itself)

Long computations take a ``should_stop`` callable (:data:`StopCheck`) as an argument and call
:func:`check_stop` between two steps, so a caller that gave up stops paying for the work
within one step. It is an argument, never module state: concurrent computations (a notebook
and a server in one process) each have their own.
"""

from __future__ import annotations

from collections.abc import Callable

# Returns True once the computation should stop (deadline passed, call cancelled, shutdown).
# Called once per optimisation step: it must be cheap (no I/O, no lock held for long).
StopCheck = Callable[[], bool]


class EditingError(Exception):
    """Base class: everything here leaves the model unchanged."""


class InvalidRequest(EditingError, ValueError):
    """The request itself is malformed (missing "{}", empty subject, layer out of range...)."""


class PreconditionFailed(EditingError):
    """Well-formed, but cannot be carried out now (NaN in the optimisation, no statistics)."""


class Cancelled(EditingError):
    """The caller gave up (its deadline passed or it cancelled): the computation stopped
    between two steps and produced nothing."""


def check_stop(should_stop: StopCheck | None, where: str) -> None:
    """Raise :class:`Cancelled` naming ``where`` once ``should_stop()`` says so (None: never)."""
    if should_stop is not None and should_stop():
        raise Cancelled(f"stopped during {where}: the caller gave up")
