"""Blocking client over one gRPC channel."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import convert
from ._pb import editing_pb2 as epb
from ._pb import editing_pb2_grpc, inference_pb2_grpc
from ._pb import inference_pb2 as ipb
from .errors import from_rpc_error
from .security import ChannelSecurity, PathLike
from .types import (
    ContinuationScore,
    EditInfo,
    EditResult,
    Fact,
    Generation,
    ImportResult,
    ModelInfo,
    RevertResult,
    StreamChunk,
    TraceResult,
)


class GenerationStream:
    """Iterate to receive chunks; ``cancel()`` stops the generation on the server."""

    def __init__(self, call) -> None:
        self._call = call

    def __iter__(self) -> Iterator[StreamChunk]:
        try:
            for chunk in self._call:
                yield convert.stream_chunk(chunk)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED and self._cancelled:
                return
            raise from_rpc_error(error) from None

    _cancelled = False

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


class EditserveClient:
    """``EditserveClient("localhost:50051")``; every call raises an EditserveError subclass
    carrying the gRPC status on failure. ``timeout`` (seconds) becomes the call's deadline.

    TLS: ``tls_ca_file`` (the CA that signed the server's certificate; ``tls=True`` alone uses
    the system's roots), ``tls_cert_file`` and ``tls_key_file`` (a client certificate for
    mTLS), ``tls_server_name`` (the name to verify when it is not the target's host).
    ``token`` is sent on every call as ``authorization: Bearer <token>`` (docs/SECURITY.md)."""

    def __init__(self, target: str = "localhost:50051", *, timeout: float | None = None,
                 channel: grpc.Channel | None = None, tls: bool = False, tls_ca_file: PathLike | None = None,
                 tls_cert_file: PathLike | None = None, tls_key_file: PathLike | None = None,
                 tls_server_name: str | None = None, token: str | None = None) -> None:
        security = ChannelSecurity(tls=tls, ca_file=tls_ca_file, cert_file=tls_cert_file, key_file=tls_key_file,
                                   server_name=tls_server_name, token=token)
        self.channel = channel or security.sync_channel(target)
        self._metadata = security.metadata()
        self.timeout = timeout
        self._inference = inference_pb2_grpc.InferenceStub(self.channel)
        self._editing = editing_pb2_grpc.EditingStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> EditserveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=timeout if timeout is not None else self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    # --- health ------------------------------------------------------------------------
    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """"SERVING", "NOT_SERVING", ... for the whole server ("") or one service."""
        reply = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_until_serving(self, timeout: float = 300.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health(timeout=2.0) == "SERVING":
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not SERVING after {timeout:.0f}s")
            time.sleep(0.2)

    # --- inference -----------------------------------------------------------------------
    def generate(self, prompt: convert.Prompt, *, timeout: float | None = None, **options) -> Generation:
        """``options``: max_new_tokens, temperature, top_p, top_k, seed, stop, ignore_eos,
        return_token_ids, return_logprobs (0 means the server default)."""
        return convert.generation(self._call(self._inference.Generate, convert.generate_request(prompt, **options), timeout))

    def stream(self, prompt: convert.Prompt, *, timeout: float | None = None, **options) -> GenerationStream:
        request = convert.generate_request(prompt, **options)
        return GenerationStream(
            self._inference.GenerateStream(request, timeout=timeout if timeout is not None else self.timeout,
                                           metadata=self._metadata)
        )

    def model_info(self, *, include_weights_digest: bool = False, timeout: float | None = None) -> ModelInfo:
        request = ipb.GetModelInfoRequest(include_weights_digest=include_weights_digest)
        return convert.model_info(self._call(self._inference.GetModelInfo, request, timeout))

    def score(self, pairs: Sequence[tuple[str, str]], *, timeout: float | None = None) -> list[ContinuationScore]:
        """Teacher-forced scores of (prompt, continuation) pairs (at most 256 per call)."""
        return convert.scores(self._call(self._inference.Score, convert.score_request(pairs), timeout))

    # --- editing -------------------------------------------------------------------------
    def edit(self, facts: Fact | Sequence[Fact], *, method: str = "rome", dry_run: bool = False,
             description: str = "", timeout: float | None = None, idempotency_key: str | None = None,
             max_drift_kl: float | None = None, min_top1_agreement: float | None = None,
             **options) -> EditResult:
        """Compute and apply an edit (``options``: the method's fields). This client never
        retries on its own; to retry an Edit safely, make a key with
        :func:`~editserve.client.new_idempotency_key` and send it with every attempt: a retry
        of an edit the server already journaled returns its original reply (``replayed``).
        ``max_drift_kl`` / ``min_top1_agreement``: refuse the edit (FailedPrecondition, nothing
        applied) if its drift on the server's probes would pass them."""
        request = convert.edit_request(facts, method=method, dry_run=dry_run, description=description,
                                       idempotency_key=idempotency_key, max_drift_kl=max_drift_kl,
                                       min_top1_agreement=min_top1_agreement, **options)
        return convert.edit_result(self._call(self._editing.Edit, request, timeout))

    def consolidate(self, edit_ids: Sequence[str] = (), *, dry_run: bool = False, description: str = "",
                    idempotency_key: str | None = None, max_drift_kl: float | None = None,
                    min_top1_agreement: float | None = None, timeout: float | None = None,
                    **options) -> EditResult:
        """Replace active ROME/MEMIT edits (default: all) by one joint MEMIT edit, one revision;
        the replaced edits stay listed as "consolidated" and revertible (docs/LIFELONG.md)."""
        request = convert.consolidate_request(edit_ids, dry_run=dry_run, description=description,
                                              idempotency_key=idempotency_key, max_drift_kl=max_drift_kl,
                                              min_top1_agreement=min_top1_agreement, **options)
        return convert.edit_result(self._call(self._editing.Consolidate, request, timeout))

    def revert(self, edit_id: str, *, timeout: float | None = None) -> RevertResult:
        return convert.revert_result(self._call(self._editing.Revert, epb.RevertRequest(edit_id=edit_id), timeout))

    def list_edits(self, *, include_reverted: bool = False, timeout: float | None = None) -> list[EditInfo]:
        reply = self._call(self._editing.ListEdits, epb.ListEditsRequest(include_reverted=include_reverted), timeout)
        return [convert.edit_info(e) for e in reply.edits]

    def get_edit(self, edit_id: str, *, timeout: float | None = None) -> EditInfo:
        return convert.edit_info(self._call(self._editing.GetEdit, epb.GetEditRequest(edit_id=edit_id), timeout))

    def export_edits(self, edit_ids: Sequence[str] = (), *, timeout: float | None = None) -> bytes:
        """The bundle of the named edits (default: every active one): their artifacts, facts and
        the base model's fingerprint, for :meth:`import_edits` on another server."""
        try:
            chunks = self._editing.ExportEdits(epb.ExportEditsRequest(edit_ids=list(edit_ids)),
                                               timeout=timeout if timeout is not None else self.timeout,
                                               metadata=self._metadata)
            return b"".join(chunk.data for chunk in chunks)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def import_edits(self, bundle: bytes, *, dry_run: bool = False, max_drift_kl: float | None = None,
                     min_top1_agreement: float | None = None, timeout: float | None = None) -> ImportResult:
        """Apply a bundle's edits here (the same bytes, nothing recomputed); those already
        active here are skipped. ``dry_run``: check it (model, files, drift budget) only."""
        requests = convert.import_requests(bundle, dry_run=dry_run, max_drift_kl=max_drift_kl,
                                           min_top1_agreement=min_top1_agreement)
        return convert.import_result(self._call(self._editing.ImportEdits, requests, timeout))

    def trace(self, prompt: str, subject: str, *, timeout: float | None = None, **options) -> TraceResult:
        """``options``: answer, samples, noise_scale, window, seed, kinds (hidden/mlp/attn),
        precision ("model": exact, default; "bf16": faster, see docs/TRACING.md)."""
        return convert.trace_result(self._call(self._editing.Trace, convert.trace_request(prompt, subject, **options), timeout))
