"""Whether the caller of one RPC is still there: its deadline, its cancellation, and the
server's own shutdown.

Why: an Edit can wait for the edit mutex and then compute for minutes. A client that gave up
(deadline passed, cancelled) must not have its edit journaled and applied later, when nobody
reads the reply and a retry may already be on its way. The servicer builds one
:class:`CallWatch` per call and hands its :meth:`gave_up` to the edit manager, so the manager
and the science only ever see a ``() -> bool`` (``editing.errors.StopCheck``), never gRPC.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import grpc

from .rpc import ServiceError

# A call that ended at most this long before its deadline (by the server's clock) is reported
# as DEADLINE_EXCEEDED: the client's own deadline fires first and cancels the call before the
# server's copy of it (received a little later) runs out, by the network and queueing delay.
DEADLINE_SLACK_SECONDS = 1.0


@dataclass(frozen=True)
class CallWatch:
    """``context``: the call's gRPC context. ``stopping``: set by the server when it stops
    waiting for calls in flight (the shutdown grace period is over)."""

    context: grpc.ServicerContext
    stopping: threading.Event

    def _expired(self, slack: float = 0.0) -> bool:
        remaining = self.context.time_remaining()
        return remaining is not None and remaining <= slack

    def gave_up(self) -> bool:
        """True once the deadline passed, the client cancelled, or the server is stopping.
        Cheap (two reads of call state): it is called once per optimisation step."""
        return self.stopping.is_set() or not self.context.is_active() or self._expired()

    def error(self, detail: str) -> ServiceError:
        """The status for a call that stopped because :meth:`gave_up`: DEADLINE_EXCEEDED,
        UNAVAILABLE (the server is shutting down: retry elsewhere) or CANCELLED."""
        # a call gone just short of its deadline ended by it (see DEADLINE_SLACK_SECONDS)
        if self._expired(slack=DEADLINE_SLACK_SECONDS if not self.context.is_active() else 0.0):
            return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"the deadline passed: {detail}; nothing was journaled or applied")
        if self.stopping.is_set():
            return ServiceError(grpc.StatusCode.UNAVAILABLE,
                                f"the server is shutting down: {detail}; nothing was journaled or applied")
        return ServiceError(grpc.StatusCode.CANCELLED, f"cancelled by the client: {detail}; nothing was journaled "
                                                       "or applied")
