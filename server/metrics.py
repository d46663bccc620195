"""Prometheus metrics of one server instance, in their own registry.

Names follow Prometheus conventions: prefix ``editserve_``, base units (seconds, tokens),
``_total`` for counters, and only bounded labels (rpc, code, method) - never an edit id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from .backends.hf import EngineObserver

# The swap under the write lock is a pointer exchange: microseconds, so finer buckets.
_PAUSE_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5)  # > 0.05: the alert can fire
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_EDIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class Metrics(EngineObserver):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("editserve_requests", "gRPC requests by method and status code", ["rpc", "code"], registry=r)
        self.in_flight = Gauge("editserve_requests_in_flight", "gRPC requests being served", ["rpc"], registry=r)
        self.request_duration = Histogram(
            "editserve_request_duration_seconds", "End-to-end request latency", ["rpc"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("editserve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.prefix_reused_tokens = Counter(
            "editserve_prefix_cache_reused_tokens", "Prompt tokens whose keys and values came from the prefix cache "
            "(an earlier prompt at the same revision) instead of a forward pass", registry=r)
        self.prefix_hits = Counter("editserve_prefix_cache_hits", "Prefills that reused a cached prompt prefix",
                                   registry=r)
        self.prefills = Counter("editserve_prefills", "Prompts prefilled by the engine", registry=r)
        self.generated_tokens = Counter("editserve_generated_tokens", "Tokens generated", registry=r)
        self.routed = Counter("editserve_serac_routed", "Generate requests answered through a SERAC edit's "
                              "counterfactual path (in scope of an active memory entry)", registry=r)
        self.ttft = Histogram(
            "editserve_time_to_first_token_seconds", "Time from request arrival to its first token",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.inter_token = Histogram(
            "editserve_inter_token_latency_seconds", "Time between consecutive tokens of one request",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "editserve_batch_size", "Sequences per decode step", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.engine_requests = Gauge(
            "editserve_engine_requests", "Requests the generation engine holds (queued or running)", registry=r
        )
        self.model_info = Info("editserve_model", "The served model", registry=r)
        self.revision = Gauge("editserve_model_revision", "Edit revision of the served weights", registry=r)
        self.active_edits = Gauge("editserve_active_edits", "Edits currently applied", registry=r)
        self.edits = Counter("editserve_edits", "Edit requests by method and outcome", ["method", "status"], registry=r)
        self.quarantined_edits = Gauge(
            "editserve_quarantined_edits", "Edits active in the journal but not applied: their artifact was missing "
            "or corrupt at start-up (revert them to acknowledge)", registry=r)
        self.quarantines = Counter("editserve_edit_quarantines", "Edits quarantined at start-up", registry=r)
        self.reverts = Counter("editserve_reverts", "Reverts by outcome", ["status"], registry=r)
        self.edit_compute = Histogram(
            "editserve_edit_compute_seconds", "Time to compute an edit", ["method"], buckets=_EDIT_BUCKETS, registry=r
        )
        self.edit_apply = Histogram(
            "editserve_edit_apply_seconds", "Time to apply or revert an edit in memory", ["operation"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.weight_swap_pause = Histogram(
            "editserve_weight_swap_pause_seconds",
            "Time generation is held off (write lock) while an apply or revert swaps weights in",
            ["operation"], buckets=_PAUSE_BUCKETS, registry=r,
        )
        self.trace_duration = Histogram(
            "editserve_trace_seconds", "Causal trace wall time", buckets=_EDIT_BUCKETS, registry=r
        )
        self.drift_kl = Gauge(
            "editserve_drift_kl_divergence", "Mean KL(unedited || current) of next-token distributions on the probe set (nats)",
            registry=r,
        )
        self.drift_kl_max = Gauge(
            "editserve_drift_kl_divergence_max", "Largest per-probe KL(unedited || current) (nats)", registry=r
        )
        self.drift_top1 = Gauge(
            "editserve_drift_top1_agreement", "Share of probes whose top next token is unchanged by the edits", registry=r
        )
        self.drift_refreshed = Gauge(
            "editserve_drift_last_refresh_timestamp_seconds", "When drift was last recomputed", registry=r
        )
        self.drift_revision = Gauge(
            "editserve_drift_revision", "Model revision the drift gauges were measured at (below "
            "editserve_model_revision while a refresh is pending, or when refreshes fail)", registry=r)
        self.drift_probes = Gauge("editserve_drift_probes", "Prompts in the drift probe set", registry=r)
        self.statistics_ready = Gauge(
            "editserve_key_statistics_ready",
            "1 once the key statistics of the default edit layers are prepared (edits no longer wait)", registry=r)
        self.statistics_seconds = Gauge(
            "editserve_key_statistics_prepare_seconds", "How long preparing the key statistics took", registry=r)
        # --- a fleet sharing one journal (server/replica.py) ---
        self.journal_revision = Gauge(
            "editserve_journal_revision", "Newest revision in the edit journal, as this server last read it "
            "(above editserve_model_revision: edits journaled by other replicas not applied here yet)", registry=r)
        self.followed_events = Counter(
            "editserve_followed_events", "Journal events other replicas committed, applied here", ["kind"], registry=r)
        self.follow_errors = Counter(
            "editserve_journal_follow_errors", "Failed attempts to read or apply the shared journal's new events "
            "(database unreachable, apply failed); retried at the next poll", registry=r)
        self.journal_synced = Gauge(
            "editserve_journal_last_sync_timestamp_seconds", "When this server last read the shared journal "
            "successfully (serving its newest revision from then on)", registry=r)
        self.ready = Gauge("editserve_ready", "1 once the model is loaded and the journal replayed", registry=r)

    # EngineObserver
    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_token(self, seconds_since_previous: float) -> None:
        self.inter_token.observe(seconds_since_previous)

    def on_step(self, batch_size: int, seconds: float) -> None:
        self.batch_size.observe(batch_size)

    def on_prefill(self, prompt_tokens: int, reused_tokens: int) -> None:
        self.prefills.inc()
        if reused_tokens:
            self.prefix_hits.inc()
            self.prefix_reused_tokens.inc(reused_tokens)

    def serve_http(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the /metrics HTTP endpoint; returns the bound port (0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]
