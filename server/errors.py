"""Server-side failures that are neither the caller's fault nor the science's, each mapped to
one gRPC status in :mod:`.rpc`. Kept apart from :mod:`.edits` so the RPC layer maps them
without importing torch."""

from __future__ import annotations


class Diverged(Exception):
    """Journal and weights may disagree (a failed apply or revert could not be taken back):
    the edit manager refuses every edit and revert until a restart replays the journal.
    UNAVAILABLE, since another replica (or this one, restarted) can serve the call."""
