"""asyncio client: the same calls as :class:`EditserveClient`, awaited."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

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
    ModelInfo,
    RevertResult,
    StreamChunk,
    TraceResult,
)


class AsyncEditserveClient:
    """The asyncio twin of :class:`EditserveClient`, with the same TLS and token options."""

    def __init__(self, target: str = "localhost:50051", *, timeout: float | None = None, tls: bool = False,
                 tls_ca_file: PathLike | None = None, tls_cert_file: PathLike | None = None,
                 tls_key_file: PathLike | None = None, tls_server_name: str | None = None,
                 token: str | None = None) -> None:
        security = ChannelSecurity(tls=tls, ca_file=tls_ca_file, cert_file=tls_cert_file, key_file=tls_key_file,
                                   server_name=tls_server_name, token=token)
        self.channel = security.aio_channel(target)
        self._metadata = security.metadata()
        self.timeout = timeout
        self._inference = inference_pb2_grpc.InferenceStub(self.channel)
        self._editing = editing_pb2_grpc.EditingStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> AsyncEditserveClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method, request, timeout: float | None):
        try:
            return await method(request, timeout=timeout if timeout is not None else self.timeout,
                                metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        reply = await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def generate(self, prompt: convert.Prompt, *, timeout: float | None = None, **options) -> Generation:
        reply = await self._call(self._inference.Generate, convert.generate_request(prompt, **options), timeout)
        return convert.generation(reply)

    async def stream(self, prompt: convert.Prompt, *, timeout: float | None = None,
                     **options) -> AsyncIterator[StreamChunk]:
        call = self._inference.GenerateStream(
            convert.generate_request(prompt, **options), timeout=timeout if timeout is not None else self.timeout,
            metadata=self._metadata,
        )
        try:
            async for chunk in call:
                yield convert.stream_chunk(chunk)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def model_info(self, *, include_weights_digest: bool = False, timeout: float | None = None) -> ModelInfo:
        request = ipb.GetModelInfoRequest(include_weights_digest=include_weights_digest)
        return convert.model_info(await self._call(self._inference.GetModelInfo, request, timeout))

    async def score(self, pairs: Sequence[tuple[str, str]], *, timeout: float | None = None) -> list[ContinuationScore]:
        """Teacher-forced scores of (prompt, continuation) pairs (at most 256 per call)."""
        return convert.scores(await self._call(self._inference.Score, convert.score_request(pairs), timeout))

    async def edit(self, facts: Fact | Sequence[Fact], *, method: str = "rome", dry_run: bool = False,
                   description: str = "", timeout: float | None = None, idempotency_key: str | None = None,
                   max_drift_kl: float | None = None, min_top1_agreement: float | None = None,
                   **options) -> EditResult:
        """Compute and apply an edit (``options``: the method's fields). This client never
        retries on its own; to retry an Edit safely, make a key with
        :func:`~editserve.client.new_idempotency_key` and send it with every attempt: a retry
        of an edit the server already journaled returns its original reply (``replayed``)."""
        request = convert.edit_request(facts, method=method, dry_run=dry_run, description=description,
                                       idempotency_key=idempotency_key, max_drift_kl=max_drift_kl,
                                       min_top1_agreement=min_top1_agreement, **options)
        return convert.edit_result(await self._call(self._editing.Edit, request, timeout))

    async def revert(self, edit_id: str, *, timeout: float | None = None) -> RevertResult:
        reply = await self._call(self._editing.Revert, epb.RevertRequest(edit_id=edit_id), timeout)
        return convert.revert_result(reply)

    async def list_edits(self, *, include_reverted: bool = False, timeout: float | None = None) -> list[EditInfo]:
        reply = await self._call(self._editing.ListEdits, epb.ListEditsRequest(include_reverted=include_reverted),
                                 timeout)
        return [convert.edit_info(e) for e in reply.edits]

    async def get_edit(self, edit_id: str, *, timeout: float | None = None) -> EditInfo:
        return convert.edit_info(await self._call(self._editing.GetEdit, epb.GetEditRequest(edit_id=edit_id), timeout))

    async def trace(self, prompt: str, subject: str, *, timeout: float | None = None, **options) -> TraceResult:
        reply = await self._call(self._editing.Trace, convert.trace_request(prompt, subject, **options), timeout)
        return convert.trace_result(reply)
