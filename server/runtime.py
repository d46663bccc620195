"""What the servicers share: configuration, metrics, and (once loaded) the model host,
backend and edit manager. The gRPC server starts before the model is loaded so health
checks can answer NOT_SERVING; every other RPC answers UNAVAILABLE until ``ready``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import grpc

from editserve.editing.errors import Cancelled

from .calls import CallWatch
from .config import ServeConfig
from .metrics import Metrics
from .rpc import ServiceError

T = TypeVar("T")

if TYPE_CHECKING:
    from .backends.base import GenerationBackend
    from .drift import DriftMonitor
    from .edits import EditManager
    from .host import ModelHost


@dataclass
class Runtime:
    config: ServeConfig
    metrics: Metrics = field(default_factory=Metrics)
    ready: threading.Event = field(default_factory=threading.Event)
    host: ModelHost | None = None
    backend: GenerationBackend | None = None
    edits: EditManager | None = None
    drift: DriftMonitor | None = None
    # why RPCs answer UNAVAILABLE while ``ready`` is clear after start-up (shutting down, or
    # journal and weights diverged); empty while loading
    unavailable_reason: str = ""
    # set once the server stops waiting for calls in flight: edits still computing abandon
    stopping: threading.Event = field(default_factory=threading.Event)
    # in-flight generation RPCs, bounded by config.max_concurrent_requests
    _inflight: int = 0
    _inflight_lock: threading.Lock = field(default_factory=threading.Lock)
    _noise_scale: float | None = None
    # running or waiting calls per heavy pool ("edit": Edit and Trace, "score": Score)
    _pools: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # notified whenever a generation or heavy call ends (a shutdown waits for none left)
        self._idle = threading.Condition(self._inflight_lock)

    def watch(self, context: grpc.ServicerContext) -> CallWatch:
        """Whether this call's client is still there (deadline, cancel, shutdown)."""
        return CallWatch(context, self.stopping)

    def run_stable(self, context: grpc.ServicerContext, what: str, work: Callable[[], T]) -> T:
        """Run a long read (trace, score) that must see one revision, on the edit thread under
        the edit mutex (:meth:`EditManager.run_stable`); the wait ends when the caller gives up
        (DEADLINE_EXCEEDED / CANCELLED), so calls queued behind a long edit do not outlive
        their clients."""
        watch = self.watch(context)
        try:
            return self.edits.run_stable(watch.gave_up, what, work)
        except Cancelled as error:
            raise watch.error(str(error)) from None

    def in_flight(self) -> int:
        """Generation, Score, Edit and Trace calls running or waiting."""
        with self._inflight_lock:
            return self._inflight + sum(self._pools.values())

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no generation or heavy call is in flight;
        returns whether none is."""
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight + sum(self._pools.values()) == 0, timeout)

    def noise_scale(self) -> float:
        """Default trace noise (3x the embeddings' std), computed once per served model."""
        if self._noise_scale is None:
            from editserve.editing.tracing import embedding_noise_scale

            self._noise_scale = float(embedding_noise_scale(self.host.model, self.host.adapter))
        return self._noise_scale

    def require_ready(self) -> None:
        if not self.ready.is_set():
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, self.unavailable_reason
                               or "model is not ready yet (loading or replaying the journal)")

    def acquire_slot(self) -> None:
        with self._inflight_lock:
            if self._inflight >= self.config.max_concurrent_requests:
                raise ServiceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many concurrent generation requests (max_concurrent_requests={self.config.max_concurrent_requests})",
                )
            self._inflight += 1

    def release_slot(self) -> None:
        with self._inflight_lock:
            self._inflight -= 1
            self._idle.notify_all()

    @contextmanager
    def heavy_slot(self, pool: str) -> Iterator[None]:
        """Hold one of a bounded number of places for a heavy call (RESOURCE_EXHAUSTED past
        them). Edits and traces wait on one mutex: without a bound, clients piling up behind
        a long edit would tie up every gRPC worker thread and starve Generate."""
        limit = {"edit": self.config.max_queued_edits, "score": self.config.max_concurrent_scores}[pool]
        with self._inflight_lock:
            if self._pools.get(pool, 0) >= limit:
                setting = "max_queued_edits" if pool == "edit" else "max_concurrent_scores"
                raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"{limit} {pool} calls already running or waiting ({setting}={limit}); retry later")
            self._pools[pool] = self._pools.get(pool, 0) + 1
        try:
            yield
        finally:
            with self._inflight_lock:
                self._pools[pool] -= 1
                self._idle.notify_all()
