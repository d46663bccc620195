"""The Editing servicer: Edit, Revert, ListEdits, GetEdit and Trace over the edit manager."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import grpc

from editserve.client._pb import editing_pb2 as pb
from editserve.client._pb import editing_pb2_grpc as pb_grpc
from editserve.editing.errors import Cancelled
from editserve.editing.facts import Fact
from editserve.editing.registry import METHODS

from .drift_budget import DriftBudget, DriftCheck
from .edits import BackendLacksCapability, EditOutcome, MethodUnavailable, UnknownEdit
from .journal import EditRecord
from .rpc import ServiceError, invalid, rpc_handler
from .runtime import Runtime

log = logging.getLogger(__name__)

BUNDLE_CHUNK_BYTES = 1 << 20  # ExportEdits streams the bundle in chunks of this size
MAX_EDIT_ID_CHARS = 64


def _budget(request: pb.EditRequest | pb.ImportEditsRequest) -> DriftBudget:
    """The request's max_drift, checked (INVALID_ARGUMENT naming the field and its bounds)."""
    try:
        return DriftBudget(request.max_drift.max_kl, request.max_drift.min_top1_agreement)
    except ValueError as error:
        raise invalid(str(error)) from None


def _drift_pb(check: DriftCheck) -> pb.DriftCheck:
    return pb.DriftCheck(kl=check.kl, top1_agreement=check.top1_agreement,
                         budget=pb.DriftBudget(max_kl=check.budget.max_kl,
                                               min_top1_agreement=check.budget.min_top1_agreement))

METHOD_NAMES = {pb.EditMethod.Value(spec.proto_enum): name for name, spec in METHODS.items()}
METHOD_ENUMS = {v: k for k, v in METHOD_NAMES.items()}
OPTION_FIELDS = {name: spec.options_field for name, spec in METHODS.items()}
TRACE_KINDS = {pb.TRACE_KIND_HIDDEN: "hidden", pb.TRACE_KIND_MLP: "mlp", pb.TRACE_KIND_ATTENTION: "attn"}
TRACE_ENUMS = {v: k for k, v in TRACE_KINDS.items()}
TRACE_PRECISIONS = {pb.TRACE_PRECISION_UNSPECIFIED: "model", pb.TRACE_PRECISION_MODEL: "model",
                    pb.TRACE_PRECISION_BF16: "bf16"}
TRACE_PRECISION_ENUMS = {"model": pb.TRACE_PRECISION_MODEL, "bf16": pb.TRACE_PRECISION_BF16}


def _metrics(servicer: EditingServicer):
    return servicer.runtime.metrics


def _options_dict(message) -> dict:
    """Only the fields the caller set: unset options fall back to the shipped hyperparameters."""
    out = {}
    for field, value in message.ListFields():
        out[field.name] = list(value) if field.is_repeated else value
    if out.get("stats_source", None) == "":
        out.pop("stats_source")
    return out


def _fact_pb(fact: dict) -> pb.Fact:
    return pb.Fact(
        prompt=fact["prompt"], subject=fact["subject"], target_new=fact["target_new"],
        target_true=fact.get("target_true", ""),
        paraphrase_prompts=fact.get("paraphrase_prompts", []),
        neighborhood_prompts=fact.get("neighborhood_prompts", []),
    )


_STATUS = {"active": pb.EDIT_STATUS_ACTIVE, "reverted": pb.EDIT_STATUS_REVERTED,
           "quarantined": pb.EDIT_STATUS_QUARANTINED, "consolidated": pb.EDIT_STATUS_CONSOLIDATED}


def edit_info(record: EditRecord) -> pb.EditInfo:
    return pb.EditInfo(
        edit_id=record.edit_id,
        method=METHOD_ENUMS.get(record.method, pb.EDIT_METHOD_UNSPECIFIED),
        facts=[_fact_pb(f) for f in record.facts],
        layers=record.layers,
        delta_norm=record.delta_norm,
        created_unix_seconds=record.created,
        status=_STATUS[record.state],
        applied_revision=record.applied_revision,
        reverted_revision=record.reverted_revision,
        parameters=record.parameters,
        description=record.description,
        compute_seconds=record.compute_seconds,
        quarantine_reason=record.quarantined,
        idempotency_key=record.idempotency_key,
        consolidates=record.consolidates,
        consolidated_into=record.consolidated_into,
    )


def _score_pb(score) -> pb.PromptScore:
    return pb.PromptScore(
        prompt=score.prompt, p_new_before=score.p_new_before, p_true_before=score.p_true_before,
        p_new_after=score.p_new_after, p_true_after=score.p_true_after,
    )


def _edit_response(outcome: EditOutcome) -> pb.EditResponse:
    response = pb.EditResponse(
        edit_id=outcome.edit_id,
        revision=outcome.revision,
        applied=outcome.applied,
        compute_seconds=outcome.compute_seconds,
        apply_seconds=outcome.apply_seconds,
        notes=outcome.notes,
        replayed=outcome.replayed,
    )
    if outcome.drift is not None:
        response.drift.CopyFrom(_drift_pb(outcome.drift))
    for report in outcome.reports:
        response.facts.append(
            pb.FactReport(
                fact=_fact_pb(report.fact.__dict__),
                rewrite=_score_pb(report.rewrite),
                paraphrase=[_score_pb(s) for s in report.paraphrase],
                neighborhood=[_score_pb(s) for s in report.neighborhood],
            )
        )
    if outcome.record is not None:
        response.edit.CopyFrom(edit_info(outcome.record))
    return response


class EditingServicer(pb_grpc.EditingServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @rpc_handler(_metrics, "Edit")
    def Edit(self, request: pb.EditRequest, context: grpc.ServicerContext) -> pb.EditResponse:
        self.runtime.require_ready()
        with self.runtime.heavy_slot("edit"):
            return self._edit(request, context)

    def _edit(self, request: pb.EditRequest, context: grpc.ServicerContext) -> pb.EditResponse:
        self.runtime.require_ready()
        if request.method == pb.EDIT_METHOD_UNSPECIFIED:
            raise invalid("method is required (e.g. EDIT_METHOD_ROME)")
        method = METHOD_NAMES.get(request.method)
        if method is None:
            raise invalid(f"unknown method {request.method}")
        which = request.WhichOneof("options")
        if which is not None and which != OPTION_FIELDS[method]:
            raise invalid(f"options.{which} given for method {method}; use options.{OPTION_FIELDS[method]}")
        options = _options_dict(getattr(request, which)) if which else {}
        facts = [
            Fact(prompt=f.prompt, subject=f.subject, target_new=f.target_new, target_true=f.target_true,
                 paraphrase_prompts=tuple(f.paraphrase_prompts), neighborhood_prompts=tuple(f.neighborhood_prompts))
            for f in request.facts
        ]
        max_drift = _budget(request) if request.HasField("max_drift") else None
        watch = self.runtime.watch(context)
        try:
            outcome: EditOutcome = self.runtime.edits.edit(
                method, facts, options, dry_run=request.dry_run, description=request.description,
                should_stop=watch.gave_up, idempotency_key=request.idempotency_key, max_drift=max_drift,
            )
        except BackendLacksCapability as error:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, str(error.args[0])) from None
        except MethodUnavailable as error:
            raise ServiceError(grpc.StatusCode.UNIMPLEMENTED, str(error.args[0])) from None
        except Cancelled as error:
            log.info("Edit (%s, %d facts) abandoned, nothing journaled: %s", method, len(facts), error)
            raise watch.error(str(error)) from None
        return _edit_response(outcome)

    @rpc_handler(_metrics, "Consolidate")
    def Consolidate(self, request: pb.ConsolidateRequest, context: grpc.ServicerContext) -> pb.EditResponse:
        self.runtime.require_ready()
        if any(not 1 <= len(i) <= MAX_EDIT_ID_CHARS for i in request.edit_ids):
            raise invalid(f"edit_ids: each id needs 1 to {MAX_EDIT_ID_CHARS} characters")
        max_drift = _budget(request) if request.HasField("max_drift") else None
        with self.runtime.heavy_slot("edit"):
            watch = self.runtime.watch(context)
            try:
                outcome = self.runtime.edits.consolidate(
                    list(request.edit_ids), _options_dict(request.options), dry_run=request.dry_run,
                    description=request.description, should_stop=watch.gave_up,
                    idempotency_key=request.idempotency_key, max_drift=max_drift)
            except UnknownEdit as error:
                raise ServiceError(grpc.StatusCode.NOT_FOUND, error.args[0]) from None
            except MethodUnavailable as error:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, str(error.args[0])) from None
            except Cancelled as error:
                raise watch.error(str(error)) from None
        return _edit_response(outcome)

    @rpc_handler(_metrics, "Revert")
    def Revert(self, request: pb.RevertRequest, context: grpc.ServicerContext) -> pb.RevertResponse:
        self.runtime.require_ready()
        if not request.edit_id:
            raise invalid("edit_id is required")
        watch = self.runtime.watch(context)
        try:
            revision, seconds = self.runtime.edits.revert(request.edit_id, should_stop=watch.gave_up)
        except UnknownEdit as error:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, error.args[0]) from None
        except Cancelled as error:
            raise watch.error(str(error)) from None
        return pb.RevertResponse(edit_id=request.edit_id, revision=revision, revert_seconds=seconds)

    @rpc_handler(_metrics, "ListEdits")
    def ListEdits(self, request: pb.ListEditsRequest, context: grpc.ServicerContext) -> pb.ListEditsResponse:
        self.runtime.require_ready()
        records = self.runtime.edits.list(request.include_reverted)
        return pb.ListEditsResponse(edits=[edit_info(r) for r in records], revision=self.runtime.host.revision)

    @rpc_handler(_metrics, "GetEdit")
    def GetEdit(self, request: pb.GetEditRequest, context: grpc.ServicerContext) -> pb.EditInfo:
        self.runtime.require_ready()
        if not request.edit_id:
            raise invalid("edit_id is required")
        try:
            return edit_info(self.runtime.edits.get(request.edit_id))
        except UnknownEdit as error:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, error.args[0]) from None

    @rpc_handler(_metrics, "ExportEdits", streaming=True)
    def ExportEdits(self, request: pb.ExportEditsRequest, context: grpc.ServicerContext) -> Iterator[pb.BundleChunk]:
        self.runtime.require_ready()
        if any(not 1 <= len(i) <= MAX_EDIT_ID_CHARS for i in request.edit_ids):
            raise invalid(f"edit_ids: each id needs 1 to {MAX_EDIT_ID_CHARS} characters")
        watch = self.runtime.watch(context)
        try:
            data = self.runtime.edits.export_bundle(list(request.edit_ids), should_stop=watch.gave_up)
        except UnknownEdit as error:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, error.args[0]) from None
        except Cancelled as error:
            raise watch.error(str(error)) from None
        for start in range(0, len(data), BUNDLE_CHUNK_BYTES):
            yield pb.BundleChunk(data=data[start:start + BUNDLE_CHUNK_BYTES])

    @rpc_handler(_metrics, "ImportEdits")
    def ImportEdits(self, requests: Iterator[pb.ImportEditsRequest], context: grpc.ServicerContext
                    ) -> pb.ImportEditsResponse:
        self.runtime.require_ready()
        with self.runtime.heavy_slot("edit"):
            limit = self.runtime.config.max_bundle_mb << 20
            parts, size, first = [], 0, None
            for request in requests:
                first = first or request
                size += len(request.data)
                if size > limit:
                    raise invalid(f"the bundle is over {self.runtime.config.max_bundle_mb} MiB, the server's "
                                  "max_bundle_mb")
                parts.append(request.data)
            if first is None or not size:
                raise invalid("the bundle is empty")
            max_drift = _budget(first) if first.HasField("max_drift") else None
            watch = self.runtime.watch(context)
            try:
                outcome = self.runtime.edits.import_bundle(b"".join(parts), max_drift=max_drift, dry_run=first.dry_run,
                                                          should_stop=watch.gave_up)
            except Cancelled as error:
                raise watch.error(str(error)) from None
        response = pb.ImportEditsResponse(revision=outcome.revision, edits=[
            pb.ImportedEdit(source_edit_id=e.source_edit_id, edit_id=e.edit_id, revision=e.revision,
                            skipped=e.skipped, sha256=e.sha256) for e in outcome.edits])
        if outcome.drift is not None:
            response.drift.CopyFrom(_drift_pb(outcome.drift))
        return response

    @rpc_handler(_metrics, "Trace")
    def Trace(self, request: pb.TraceRequest, context: grpc.ServicerContext) -> pb.TraceResponse:
        self.runtime.require_ready()
        with self.runtime.heavy_slot("edit"):
            return self._trace(request, context)

    def _trace(self, request: pb.TraceRequest, context: grpc.ServicerContext) -> pb.TraceResponse:
        self.runtime.require_ready()
        from editserve.editing.tracing import causal_trace

        host = self.runtime.host
        kinds = [TRACE_KINDS[k] for k in request.kinds if k in TRACE_KINDS] or ["hidden", "mlp", "attn"]
        if any(k not in TRACE_KINDS for k in request.kinds):
            raise invalid(f"kinds contains an unknown value: {list(request.kinds)}")
        started = time.perf_counter()
        def traced():
            result = causal_trace(
                host.model,
                host.tokenizer,
                host.adapter,
                request.prompt,
                request.subject,
                answer=request.answer or None,
                samples=request.samples or 10,
                noise_scale=request.noise_scale or self.runtime.noise_scale(),
                window=request.window or min(10, host.adapter.num_layers),
                seed=request.seed if request.HasField("seed") else 0,
                kinds=tuple(kinds),
                max_prompt_tokens=self.runtime.config.trace_max_prompt_tokens,
                # an unknown enum number is passed on as such: causal_trace's validation
                # (the one place Trace options are checked) rejects it as INVALID_ARGUMENT
                precision=TRACE_PRECISIONS.get(request.precision, f"enum value {request.precision}"),
            )
            return result, host.revision

        result, revision = self.runtime.run_stable(context, "trace", traced)
        seconds = time.perf_counter() - started
        self.runtime.metrics.trace_duration.observe(seconds)
        response = pb.TraceResponse(
            tokens=result.tokens,
            subject_start=result.subject_range[0],
            subject_end=result.subject_range[1],
            answer=result.answer,
            clean_prob=result.clean_prob,
            corrupted_prob=result.corrupted_prob,
            noise_scale=result.noise_scale,
            samples=result.samples,
            window=result.window,
            revision=revision,
            seconds=seconds,
            precision=TRACE_PRECISION_ENUMS[result.precision],
        )
        for kind in kinds:
            grid = result.grids[kind]
            rows, cols = len(grid), len(grid[0]) if len(grid) else 0
            response.grids.append(
                pb.TraceGrid(kind=TRACE_ENUMS[kind], rows=rows, cols=cols,
                             probs=[float(x) for row in grid for x in row])
            )
        return response
