"""Locality drift: what the active edits did to prompts unrelated to any of them.

At start-up, before the journal is replayed, the unedited model's next-token distributions
on the fixed probe set are kept as the reference. After every apply or revert a background
thread recomputes them under the current weights and publishes the mean and maximum KL
divergence and the top-1 agreement as gauges, so an SRE sees an edit's side effects in
Prometheus within a second of it landing.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import ExitStack

import torch

from editserve.editing.artifacts import Artifact, RuntimeLayer, preview
from editserve.editing.evaluation.metrics import distribution_drift
from editserve.editing.evaluation.probes import load_probes, next_token_logits
from editserve.editing.memory import LAYER_TYPE as MEMORY_LAYER

from .fresh_thread import in_fresh_thread
from .host import ModelHost
from .metrics import Metrics

log = logging.getLogger(__name__)


class DriftMonitor:
    def __init__(self, host: ModelHost, metrics: Metrics, stable_weights: threading.Lock) -> None:
        self.host = host
        self.metrics = metrics
        self.probes = load_probes()
        self._stable = stable_weights
        self._reference = next_token_logits(host.model, host.tokenizer, self.probes)
        # (mean KL, top-1 agreement, revision measured at) of the last refresh
        self.latest: tuple[float, float, int] = (0.0, 1.0, host.revision)
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="editserve-drift", daemon=True)
        metrics.drift_probes.set(len(self.probes))
        self._publish(0.0, 0.0, 1.0, host.revision)

    def start(self) -> None:
        self._thread.start()
        self.request_refresh()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop and wait for a refresh in progress: no torch work may outlive the server."""
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def request_refresh(self) -> None:
        self._idle.clear()
        self._wake.set()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        return self._idle.wait(timeout)

    def _publish(self, kl: float, kl_max: float, agreement: float, revision: int) -> None:
        """Set the gauges together with the revision they describe, so an alert can tell a
        measurement of the served weights from one of older weights."""
        self.metrics.drift_kl.set(kl)
        self.metrics.drift_kl_max.set(kl_max)
        self.metrics.drift_top1.set(agreement)
        self.metrics.drift_refreshed.set(time.time())
        self.metrics.drift_revision.set(revision)

    def _logits(self, artifacts: list[Artifact] = ()) -> torch.Tensor:
        """Next-token logits on the probes as serving would compute them (through a SERAC
        memory's counterfactual path where a probe is in scope), with ``artifacts`` previewed
        together (SERAC memories join the routing, the others are previewed as hooks)."""
        def is_memory(a: Artifact) -> bool:
            return isinstance(a, RuntimeLayer) and a.layer_type == MEMORY_LAYER

        extra = [(f"preview-{i}", a) for i, a in enumerate(artifacts) if is_memory(a)]
        prompts, _matches = self.host.routed_prompts(self.probes, extra)
        with ExitStack() as stack:
            for artifact in artifacts:
                if not is_memory(artifact):
                    stack.enter_context(preview(self.host.model, artifact))
            return next_token_logits(self.host.model, self.host.tokenizer, prompts)

    def measure(self, artifacts: list[Artifact]) -> tuple[float, float]:
        """(mean KL, top-1 agreement) against the unedited model with ``artifacts`` previewed
        on top of the served edits: the drift guard's figures. The caller holds the edit
        mutex (the edit thread, before journaling), so it is not taken here."""
        return distribution_drift(self._reference, self._logits(artifacts))

    def refresh(self) -> tuple[float, float]:
        with self._stable:
            current = self._logits()
            revision = self.host.revision
        kl, agreement = distribution_drift(self._reference, current)
        self.latest = (kl, agreement, revision)
        per_probe = [distribution_drift(self._reference[i : i + 1], current[i : i + 1])[0] for i in range(len(self.probes))]
        self._publish(kl, max(per_probe), agreement, revision)
        return kl, agreement

    def _loop(self) -> None:
        while not self._stop:
            self._wake.wait()
            self._wake.clear()
            if self._stop:
                return
            try:
                in_fresh_thread(self.refresh, "editserve-drift-refresh")  # no idle OpenMP team left behind
            except Exception:  # noqa: BLE001 - drift is advisory; never take the server down
                log.exception("drift refresh failed")
            if not self._wake.is_set():
                self._idle.set()
