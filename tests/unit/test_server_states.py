"""The server object's states without a model: a second signal ends the shutdown grace, and a
divergence of journal and weights turns everything NOT_SERVING / UNAVAILABLE with the reason."""

from __future__ import annotations

import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from editserve.server.app import EditserveServer
from editserve.server.config import ServeConfig
from editserve.server.rpc import ServiceError


def _health(server: EditserveServer, service: str = "") -> int:
    return server.health.Check(health_pb2.HealthCheckRequest(service=service), None).status


def test_a_second_signal_ends_the_grace_period():
    server = EditserveServer(ServeConfig(shutdown_grace_seconds=600, metrics_port=-1))
    server.runtime.acquire_slot()  # a generation in flight that would never end
    started = time.monotonic()
    server.on_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert not server._finished.is_set()  # draining: it waits for the call
    assert _health(server) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(ServiceError) as refused:
        server.runtime.require_ready()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.value.message
    server.on_signal(signal.SIGTERM)
    assert server._finished.wait(10) and time.monotonic() - started < 10
    assert server.runtime.stopping.is_set()  # edits still computing are told to stop


def test_divergence_stops_serving_with_the_reason():
    server = EditserveServer(ServeConfig(metrics_port=-1))
    server.runtime.ready.set()
    server._diverged("applying edit e failed and taking its commit back failed too")
    assert all(_health(server, s) == health_pb2.HealthCheckResponse.NOT_SERVING
               for s in ("", "editserve.v1.Inference", "editserve.v1.Editing"))
    with pytest.raises(ServiceError) as refused:
        server.runtime.require_ready()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert "journal and weights may disagree (applying edit e failed" in refused.value.message
    server.stop(0)
