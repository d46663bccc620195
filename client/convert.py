"""Request building and reply conversion shared by the sync and asyncio clients."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Sequence

from editserve.editing.registry import METHODS as REGISTRY

from ._pb import editing_pb2 as epb
from ._pb import inference_pb2 as ipb
from .types import (
    ContinuationScore,
    DriftCheck,
    EditInfo,
    EditResult,
    Fact,
    FactReport,
    Generation,
    ImportedEdit,
    ImportResult,
    ModelInfo,
    PromptScore,
    RevertResult,
    Route,
    StreamChunk,
    TraceResult,
)

FINISH = {
    ipb.FINISH_REASON_LENGTH: "length",
    ipb.FINISH_REASON_STOP: "stop",
    ipb.FINISH_REASON_CANCELLED: "cancelled",
}
METHODS = {name: epb.EditMethod.Value(spec.proto_enum) for name, spec in REGISTRY.items()}
METHOD_NAMES = {v: k for k, v in METHODS.items()}
OPTION_FIELDS = {name: spec.options_field for name, spec in REGISTRY.items()}
KINDS = {"hidden": epb.TRACE_KIND_HIDDEN, "mlp": epb.TRACE_KIND_MLP, "attn": epb.TRACE_KIND_ATTENTION}
KIND_NAMES = {v: k for k, v in KINDS.items()}
PRECISIONS = {"model": epb.TRACE_PRECISION_MODEL, "bf16": epb.TRACE_PRECISION_BF16}
PRECISION_NAMES = {v: k for k, v in PRECISIONS.items()}
EDIT_STATUS = {epb.EDIT_STATUS_ACTIVE: "active", epb.EDIT_STATUS_REVERTED: "reverted",
               epb.EDIT_STATUS_QUARANTINED: "quarantined", epb.EDIT_STATUS_CONSOLIDATED: "consolidated"}

Prompt = str | Sequence[int] | Sequence[dict]


def generate_request(
    prompt: Prompt,
    *,
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: Iterable[str] = (),
    ignore_eos: bool = False,
    return_token_ids: bool = False,
    return_logprobs: bool = False,
) -> ipb.GenerateRequest:
    """Text, token ids, or chat messages ({"role": ..., "content": ...}) as the prompt."""
    request = ipb.GenerateRequest(
        sampling=ipb.SamplingOptions(temperature=temperature, top_p=top_p, top_k=top_k),
        stopping=ipb.StoppingOptions(max_new_tokens=max_new_tokens, stop=list(stop), ignore_eos=ignore_eos),
        response=ipb.ResponseOptions(return_token_ids=return_token_ids, return_logprobs=return_logprobs),
    )
    if seed is not None:
        request.sampling.seed = seed
    if isinstance(prompt, str):
        request.text = prompt
    elif prompt and isinstance(prompt[0], dict):
        request.chat.messages.extend(ipb.ChatMessage(role=m["role"], content=m["content"]) for m in prompt)
    else:
        request.token_ids.ids.extend(int(i) for i in prompt)
    return request


def generation(reply: ipb.GenerateResponse) -> Generation:
    return Generation(
        text=reply.text, finish_reason=FINISH.get(reply.finish_reason, "unspecified"),
        stop_reason=reply.stop_reason, prompt_tokens=reply.usage.prompt_tokens,
        generated_tokens=reply.usage.generated_tokens, revision=reply.revision, model=reply.model,
        token_ids=list(reply.token_ids), logprobs=list(reply.logprobs),
        time_to_first_token_seconds=reply.time_to_first_token_seconds,
        route=route(reply),
    )


def route(message) -> Route | None:
    """The SERAC route a reply reports, if any."""
    if not message.HasField("route"):
        return None
    return Route(message.route.edit_id, message.route.score)


def stream_chunk(chunk: ipb.GenerateStreamChunk) -> StreamChunk:
    last = chunk.finish_reason != ipb.FINISH_REASON_UNSPECIFIED
    return StreamChunk(
        text=chunk.text, revision=chunk.revision, token_ids=list(chunk.token_ids), logprobs=list(chunk.logprobs),
        prompt_tokens=chunk.prompt.prompt_tokens if chunk.HasField("prompt") else None,
        finish_reason=FINISH.get(chunk.finish_reason) if last else None,
        stop_reason=chunk.stop_reason,
        generated_tokens=chunk.usage.generated_tokens if last else None,
        route=route(chunk),
    )


def model_info(reply: ipb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        model=reply.model, model_type=reply.model_type, num_layers=reply.num_layers, hidden_size=reply.hidden_size,
        vocab_size=reply.vocab_size, dtype=reply.dtype, device=reply.device, revision=reply.revision,
        active_edits=reply.active_edits, backend=reply.backend, default_max_new_tokens=reply.default_max_new_tokens,
        max_prompt_tokens=reply.max_prompt_tokens, max_new_tokens_limit=reply.max_new_tokens_limit,
        has_chat_template=reply.has_chat_template, weights_digest=reply.weights_digest, journal=reply.journal,
        journal_revision=reply.journal_revision, drift_kl=reply.drift_kl,
        drift_top1_agreement=reply.drift_top1_agreement, drift_revision=reply.drift_revision,
    )


def _fact_pb(fact: Fact) -> epb.Fact:
    return epb.Fact(
        prompt=fact.prompt, subject=fact.subject, target_new=fact.target_new, target_true=fact.target_true,
        paraphrase_prompts=list(fact.paraphrase_prompts), neighborhood_prompts=list(fact.neighborhood_prompts),
    )


def _fact(message: epb.Fact) -> Fact:
    return Fact(
        prompt=message.prompt, subject=message.subject, target_new=message.target_new,
        target_true=message.target_true, paraphrase_prompts=tuple(message.paraphrase_prompts),
        neighborhood_prompts=tuple(message.neighborhood_prompts),
    )


def option_names(method: str) -> list[str]:
    """The per-request options a method accepts (the fields of its options message)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    return sorted(getattr(epb.EditRequest(), OPTION_FIELDS[method]).DESCRIPTOR.fields_by_name)


def new_idempotency_key() -> str:
    """A fresh idempotency key (32 hex digits): make one per edit, before the first attempt,
    and send the same one with every retry of that edit."""
    return uuid.uuid4().hex


def edit_request(
    facts: Fact | Sequence[Fact], *, method: str = "rome", dry_run: bool = False, description: str = "",
    idempotency_key: str | None = None, max_drift_kl: float | None = None,
    min_top1_agreement: float | None = None, **options
) -> epb.EditRequest:
    """``options`` are the method's fields (e.g. layer=5, steps=20 for ROME). ``idempotency_key``
    makes a retry safe: the server answers it with the first attempt's reply (docs/RELIABILITY.md).
    ``max_drift_kl`` / ``min_top1_agreement``: this edit's drift budget (the server refuses it
    when its drift on the probes would pass them), over the server's defaults."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    facts = [facts] if isinstance(facts, Fact) else list(facts)
    request = epb.EditRequest(method=METHODS[method], facts=[_fact_pb(f) for f in facts], dry_run=dry_run,
                              description=description, idempotency_key=idempotency_key or "")
    budget = _drift_budget(max_drift_kl, min_top1_agreement)
    if budget is not None:
        request.max_drift.CopyFrom(budget)
    if options:
        target = getattr(request, OPTION_FIELDS[method])
        for key, value in options.items():
            if key not in target.DESCRIPTOR.fields_by_name:
                raise ValueError(f"unknown {method} option {key!r}; known: {option_names(method)}")
            try:
                if isinstance(value, (list, tuple)):
                    getattr(target, key).extend(value)
                else:
                    setattr(target, key, value)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{method} option {key!r} cannot be {value!r}: {error}") from None
    return request


def _score(message: epb.PromptScore) -> PromptScore:
    return PromptScore(message.prompt, message.p_new_before, message.p_true_before, message.p_new_after,
                       message.p_true_after)


def edit_info(message: epb.EditInfo) -> EditInfo:
    return EditInfo(
        edit_id=message.edit_id, method=METHOD_NAMES.get(message.method, "unspecified"),
        facts=[_fact(f) for f in message.facts], layers=list(message.layers), delta_norm=message.delta_norm,
        created_unix_seconds=message.created_unix_seconds,
        status=EDIT_STATUS.get(message.status, "unspecified"),
        applied_revision=message.applied_revision, reverted_revision=message.reverted_revision,
        parameters=list(message.parameters), description=message.description,
        compute_seconds=message.compute_seconds, quarantine_reason=message.quarantine_reason,
        idempotency_key=message.idempotency_key, consolidates=list(message.consolidates),
        consolidated_into=message.consolidated_into,
    )


def edit_result(reply: epb.EditResponse) -> EditResult:
    return EditResult(
        edit_id=reply.edit_id, revision=reply.revision, applied=reply.applied,
        facts=[
            FactReport(_fact(r.fact), _score(r.rewrite), [_score(s) for s in r.paraphrase],
                       [_score(s) for s in r.neighborhood])
            for r in reply.facts
        ],
        compute_seconds=reply.compute_seconds, apply_seconds=reply.apply_seconds,
        edit=edit_info(reply.edit) if reply.HasField("edit") else None,
        notes=list(reply.notes), replayed=reply.replayed,
        drift=_drift(reply.drift) if reply.HasField("drift") else None,
    )


def consolidate_request(edit_ids: Sequence[str] = (), *, dry_run: bool = False, description: str = "",
                        idempotency_key: str | None = None, max_drift_kl: float | None = None,
                        min_top1_agreement: float | None = None, **options) -> epb.ConsolidateRequest:
    """``options``: MEMIT's fields for the joint solve."""
    request = epb.ConsolidateRequest(edit_ids=list(edit_ids), dry_run=dry_run, description=description,
                                     idempotency_key=idempotency_key or "")
    budget = _drift_budget(max_drift_kl, min_top1_agreement)
    if budget is not None:
        request.max_drift.CopyFrom(budget)
    # the same option checks as an Edit's (unknown names, wrong types), on MEMIT's message
    request.options.CopyFrom(edit_request(Fact("{} is", "x", "y"), method="memit", **options).memit)
    return request


IMPORT_CHUNK_BYTES = 1 << 20


def _drift_budget(max_drift_kl: float | None, min_top1_agreement: float | None) -> epb.DriftBudget | None:
    if max_drift_kl is None and min_top1_agreement is None:
        return None
    return epb.DriftBudget(max_kl=max_drift_kl or 0.0, min_top1_agreement=min_top1_agreement or 0.0)


def import_requests(bundle: bytes, *, dry_run: bool = False, max_drift_kl: float | None = None,
                    min_top1_agreement: float | None = None) -> Iterator[epb.ImportEditsRequest]:
    """The bundle in 1 MiB messages; the first carries the options."""
    budget = _drift_budget(max_drift_kl, min_top1_agreement)
    for start in range(0, max(len(bundle), 1), IMPORT_CHUNK_BYTES):
        request = epb.ImportEditsRequest(data=bundle[start:start + IMPORT_CHUNK_BYTES])
        if start == 0:
            request.dry_run = dry_run
            if budget is not None:
                request.max_drift.CopyFrom(budget)
        yield request


def _drift(message: epb.DriftCheck) -> DriftCheck:
    return DriftCheck(message.kl, message.top1_agreement, message.budget.max_kl, message.budget.min_top1_agreement)


def import_result(reply: epb.ImportEditsResponse) -> ImportResult:
    return ImportResult(
        edits=[ImportedEdit(e.source_edit_id, e.edit_id, e.revision, e.skipped, e.sha256) for e in reply.edits],
        revision=reply.revision, drift=_drift(reply.drift) if reply.HasField("drift") else None)


def revert_result(reply: epb.RevertResponse) -> RevertResult:
    return RevertResult(reply.edit_id, reply.revision, reply.revert_seconds)


def trace_request(
    prompt: str, subject: str, *, answer: str = "", samples: int = 0, noise_scale: float = 0.0, window: int = 0,
    seed: int | None = None, kinds: Iterable[str] = (), precision: str = "model",
) -> epb.TraceRequest:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown trace precision {precision!r}; choose from {sorted(PRECISIONS)}")
    request = epb.TraceRequest(prompt=prompt, subject=subject, answer=answer, samples=samples,
                               noise_scale=noise_scale, window=window, precision=PRECISIONS[precision])
    if seed is not None:
        request.seed = seed
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown trace kind {kind!r}; choose from {sorted(KINDS)}")
        request.kinds.append(KINDS[kind])
    return request


def trace_result(reply: epb.TraceResponse) -> TraceResult:
    grids = {}
    for grid in reply.grids:
        values = list(grid.probs)
        grids[KIND_NAMES.get(grid.kind, str(grid.kind))] = [
            values[r * grid.cols : (r + 1) * grid.cols] for r in range(grid.rows)
        ]
    return TraceResult(
        tokens=list(reply.tokens), subject_start=reply.subject_start, subject_end=reply.subject_end,
        answer=reply.answer, clean_prob=reply.clean_prob, corrupted_prob=reply.corrupted_prob,
        noise_scale=reply.noise_scale, samples=reply.samples, window=reply.window, grids=grids,
        revision=reply.revision, seconds=reply.seconds,
        precision=PRECISION_NAMES.get(reply.precision, "model"),
    )


def score_request(pairs: Sequence[tuple[str, str]]) -> ipb.ScoreRequest:
    return ipb.ScoreRequest(items=[ipb.ScoreItem(prompt=p, continuation=c) for p, c in pairs])


def scores(reply: ipb.ScoreResponse) -> list[ContinuationScore]:
    return [ContinuationScore(list(s.token_ids), list(s.token_logprobs), list(s.argmax_ids), s.logprob,
                              reply.revision, route(s)) for s in reply.scores]
