"""The Inference servicer: a thin layer from protobuf to the generation backend."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

from editserve.client._pb import inference_pb2 as pb
from editserve.client._pb import inference_pb2_grpc as pb_grpc
from editserve.editing.memory import Match, counterfactual_input

from .backends.base import Failed, Finished, FinishReason, GenerationParams, RequestHandle, Started, Tokens
from .rpc import invalid, rpc_handler
from .runtime import Runtime

MAX_SCORE_ITEMS = 256
# Generate's sampling and stopping bounds: a temperature of 1e-40 divides logits into inf
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 100.0
MAX_TOP_K = 1_000_000
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256
# no token is longer than this many characters: a longer text is over a token limit untokenized
MAX_CHARS_PER_TOKEN = 64

_FINISH = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}


def _route(match: Match | None) -> pb.RouteInfo | None:
    return None if match is None else pb.RouteInfo(edit_id=match.entry.edit_id, score=match.score)


def _metrics(servicer: InferenceServicer):
    return servicer.runtime.metrics


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    # --- request translation -----------------------------------------------------------
    def _prompt_ids(self, request: pb.GenerateRequest) -> tuple[list[int], Match | None]:
        """The prompt's token ids as the model will read them, and the SERAC edit that
        answers it (None: out of every edit's scope, or no SERAC edit active).

        Routing reads the prompt as text: a text prompt as given, token ids decoded, a chat
        by its last user message (the statement goes at the start of that message)."""
        host = self.runtime.host
        tokenizer = host.tokenizer
        which = request.WhichOneof("prompt")
        match = None
        if which is None:
            raise invalid("prompt is required: set one of text, token_ids or chat")
        if which == "text":
            if not request.text:
                raise invalid("prompt.text is empty")
            text = request.text
            (match,) = host.route([text])
            ids = tokenizer(text if match is None else counterfactual_input(match, text)).input_ids
        elif which == "token_ids":
            ids = list(request.token_ids.ids)
            vocab = host.model.config.get_text_config().vocab_size
            bad = [i for i in ids if i >= vocab]
            if bad:
                raise invalid(f"prompt.token_ids contains ids outside the vocabulary (size {vocab}): {bad[:5]}")
            if ids:
                text = tokenizer.decode(ids, skip_special_tokens=True)
                (match,) = host.route([text])
                if match is not None:
                    ids = tokenizer(counterfactual_input(match, text)).input_ids
        else:
            if not request.chat.messages:
                raise invalid("prompt.chat has no messages")
            if not getattr(tokenizer, "chat_template", None):
                raise invalid(f"model {host.name} has no chat template; send prompt.text instead")
            for i, message in enumerate(request.chat.messages):
                if message.role not in ("system", "user", "assistant"):
                    raise invalid(f"prompt.chat.messages[{i}].role must be system, user or assistant, got {message.role!r}")
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if users:
                last = messages[users[-1]]
                (match,) = host.route([last["content"]])
                if match is not None:
                    last["content"] = counterfactual_input(match, last["content"])
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        if not ids:
            raise invalid("prompt tokenizes to nothing")
        limit = self.runtime.config.max_prompt_tokens
        if len(ids) > limit:
            raise invalid(f"prompt has {len(ids)} tokens, over the limit max_prompt_tokens={limit}")
        if match is not None:
            self.runtime.metrics.routed.inc()
        return list(ids), match

    def _params(self, request: pb.GenerateRequest) -> GenerationParams:
        config = self.runtime.config
        s, st = request.sampling, request.stopping
        # every option bounded here, before anything runs (NaN fails every comparison, so
        # each check is written as "inside the range", never as "outside it")
        if not (s.temperature == 0 or MIN_TEMPERATURE <= s.temperature <= MAX_TEMPERATURE):
            raise invalid(f"sampling.temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                          f"got {s.temperature}")
        if not 0 <= s.top_p <= 1:
            raise invalid(f"sampling.top_p must be in [0, 1], got {s.top_p}")
        if s.top_k > MAX_TOP_K:
            raise invalid(f"sampling.top_k must be at most {MAX_TOP_K}, got {s.top_k}")
        if len(st.stop) > MAX_STOP_STRINGS or any(len(x) > MAX_STOP_CHARS for x in st.stop):
            raise invalid(f"stopping.stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters")
        max_new = st.max_new_tokens or config.default_max_new_tokens
        if max_new > config.max_new_tokens_limit:
            raise invalid(f"stopping.max_new_tokens={max_new} is over the limit max_new_tokens_limit={config.max_new_tokens_limit}")
        if any(not s_ for s_ in st.stop):
            raise invalid("stopping.stop contains an empty string")
        return GenerationParams(
            max_new_tokens=max_new,
            temperature=s.temperature,
            top_p=s.top_p or 1.0,
            top_k=s.top_k,
            seed=s.seed if s.HasField("seed") else None,
            stop=tuple(st.stop),
            ignore_eos=st.ignore_eos,
            return_logprobs=request.response.return_logprobs,
        )

    def _start(self, request: pb.GenerateRequest, context: grpc.ServicerContext
               ) -> tuple[RequestHandle, list[int], Match | None]:
        self.runtime.require_ready()
        ids, match = self._prompt_ids(request)
        params = self._params(request)
        self.runtime.acquire_slot()
        try:
            handle = self.runtime.backend.submit(ids, params)
        except BaseException:
            self.runtime.release_slot()
            raise
        context.add_callback(handle.cancel)  # client cancel, deadline, or completion
        self.runtime.metrics.prompt_tokens.inc(len(ids))
        return handle, ids, match

    # --- RPCs ----------------------------------------------------------------------------
    @rpc_handler(_metrics, "Generate")
    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        arrived = time.perf_counter()
        handle, _ids, match = self._start(request, context)
        response = pb.GenerateResponse(model=self.runtime.host.name, route=_route(match))
        text_parts: list[str] = []
        try:
            for event in handle:
                if isinstance(event, Tokens):
                    if event.first:
                        response.time_to_first_token_seconds = time.perf_counter() - arrived
                    text_parts.append(event.text)
                    if request.response.return_token_ids:
                        response.token_ids.extend(event.token_ids)
                    response.logprobs.extend(event.logprobs)
                    self.runtime.metrics.generated_tokens.inc(len(event.token_ids))
                elif isinstance(event, Finished):
                    text_parts.append(event.text)
                    response.finish_reason = _FINISH[event.reason]
                    response.stop_reason = event.stop_reason
                    response.usage.prompt_tokens = event.prompt_tokens
                    response.usage.generated_tokens = event.generated_tokens
                    response.revision = event.revision
                elif isinstance(event, Failed):
                    raise event.error
        finally:
            self.runtime.release_slot()
        response.text = "".join(text_parts)
        return response

    @rpc_handler(_metrics, "GenerateStream", streaming=True)
    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateStreamChunk]:
        handle, _ids, match = self._start(request, context)
        try:
            for event in handle:
                if isinstance(event, Started):
                    prompt = pb.PromptInfo(prompt_tokens=event.prompt_tokens, model=self.runtime.host.name)
                    if request.response.return_token_ids:
                        prompt.prompt_token_ids.extend(event.prompt_token_ids)
                    yield pb.GenerateStreamChunk(prompt=prompt, revision=self.runtime.host.revision, route=_route(match))
                elif isinstance(event, Tokens):
                    self.runtime.metrics.generated_tokens.inc(len(event.token_ids))
                    chunk = pb.GenerateStreamChunk(text=event.text, logprobs=event.logprobs, revision=event.revision)
                    if request.response.return_token_ids:
                        chunk.token_ids.extend(event.token_ids)
                    yield chunk
                elif isinstance(event, Finished):
                    yield pb.GenerateStreamChunk(
                        text=event.text,
                        finish_reason=_FINISH[event.reason],
                        stop_reason=event.stop_reason,
                        usage=pb.Usage(prompt_tokens=event.prompt_tokens, generated_tokens=event.generated_tokens),
                        revision=event.revision,
                    )
                elif isinstance(event, Failed):
                    raise event.error
        finally:
            handle.cancel()  # a consumer that stopped reading stops the generation too
            self.runtime.release_slot()

    @rpc_handler(_metrics, "Score")
    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        self.runtime.require_ready()
        with self.runtime.heavy_slot("score"):
            return self._score(request, context)

    def _score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        self.runtime.require_ready()
        from editserve.editing.evaluation.teacher_forcing import score_continuations

        if not request.items:
            raise invalid("items is empty")
        if len(request.items) > MAX_SCORE_ITEMS:
            raise invalid(f"{len(request.items)} items is over the limit of {MAX_SCORE_ITEMS} per request")
        host = self.runtime.host
        limit = self.runtime.config.max_prompt_tokens
        for i, item in enumerate(request.items):
            if not item.prompt:
                raise invalid(f"items[{i}].prompt is empty")
            if not item.continuation.strip():
                raise invalid(f"items[{i}].continuation is empty")
            # bounded like a Generate prompt: an unbounded item made one Score call run for
            # minutes and allocate without limit (found by the fuzzer, docs/RELIABILITY.md)
            chars = len(item.prompt) + len(item.continuation)
            if chars > limit * MAX_CHARS_PER_TOKEN:
                raise invalid(f"items[{i}] is {chars} characters, over the limit max_prompt_tokens={limit}")
            tokens = len(host.tokenizer(item.prompt).input_ids) + len(
                host.tokenizer(item.continuation, add_special_tokens=False).input_ids)
            if tokens > limit:
                raise invalid(f"items[{i}] is {tokens} tokens (prompt and continuation), over the limit "
                              f"max_prompt_tokens={limit}")
        def scored():
            prompts, matches = host.routed_prompts([i.prompt for i in request.items])
            scores = score_continuations(host.model, host.tokenizer, prompts, [i.continuation for i in request.items])
            return scores, matches, host.revision

        scores, matches, revision = self.runtime.run_stable(context, "score", scored)
        return pb.ScoreResponse(
            scores=[pb.ScoredContinuation(token_ids=s.token_ids, token_logprobs=s.token_logprobs,
                                          argmax_ids=s.argmax_ids, logprob=s.logprob, route=_route(m))
                    for s, m in zip(scores, matches, strict=True)],
            revision=revision,
        )

    @rpc_handler(_metrics, "GetModelInfo")
    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        self.runtime.require_ready()
        host, config = self.runtime.host, self.runtime.config
        text_config = host.model.config.get_text_config()
        info = pb.ModelInfo(
            model=host.name,
            model_type=host.adapter.model_type,
            num_layers=host.adapter.num_layers,
            hidden_size=host.adapter.hidden_size,
            vocab_size=text_config.vocab_size,
            dtype=host.dtype,
            device=host.device,
            revision=host.revision,
            active_edits=len(host.active_edit_ids),
            default_max_new_tokens=config.default_max_new_tokens,
            max_prompt_tokens=config.max_prompt_tokens,
            max_new_tokens_limit=config.max_new_tokens_limit,
            has_chat_template=bool(getattr(host.tokenizer, "chat_template", None)),
            backend=self.runtime.backend.name,
            journal="postgresql" if self.runtime.edits.journal.shared else "sqlite",
            journal_revision=max(self.runtime.edits.journal_revision, host.revision),
        )
        if self.runtime.drift is not None:
            info.drift_kl, info.drift_top1_agreement, info.drift_revision = self.runtime.drift.latest
        if request.include_weights_digest:
            info.weights_digest = host.weights_digest()
        return info
