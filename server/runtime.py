"""What the servicers share: configuration, metrics, and (once loaded) the model host,
backend and edit manager. The gRPC server starts before the model is loaded so health
checks can answer NOT_SERVING; every other RPC answers UNAVAILABLE until ``ready``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from .config import ServeConfig
from .metrics import Metrics
from .rpc import ServiceError

if TYPE_CHECKING:
    from .backends.base import GenerationBackend
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
    startup_error: str = ""
    # in-flight generation RPCs, bounded by config.max_concurrent_requests
    _inflight: int = 0
    _inflight_lock: threading.Lock = field(default_factory=threading.Lock)
    _noise_scale: float | None = None
    # running or waiting calls per heavy pool ("edit": Edit and Trace, "score": Score)
    _pools: dict[str, int] = field(default_factory=dict)

    def noise_scale(self) -> float:
        """Default trace noise (3x the embeddings' std), computed once per served model."""
        if self._noise_scale is None:
            from editserve.editing.tracing import embedding_noise_scale

            self._noise_scale = float(embedding_noise_scale(self.host.model, self.host.adapter))
        return self._noise_scale

    def require_ready(self) -> None:
        if not self.ready.is_set():
            detail = f": {self.startup_error}" if self.startup_error else ""
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"model is not ready yet (loading or replaying the journal){detail}")

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
