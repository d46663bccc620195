"""Serving with vLLM: generation in vLLM's engine, edits computed in-process and committed
into vLLM's workers.

Two objects, the two faces of :mod:`editserve.server.state`:

- :class:`VLLMHost`, the served state. It *is* a :class:`~editserve.server.host.ModelHost`
  (the analysis view: an in-process Hugging Face copy of the same weights, on which edits
  are computed, traces and scores read, drift is measured), whose commits also go to the
  engine: after the local storage swap, every touched parameter's composed value
  (``base + active deltas``, exactly the analysis view's bits) is sent to every worker
  (:mod:`.vllm_worker`), with the other members of any group vLLM fuses (q/k/v, gate/up):
  vLLM reloads a fused layer whole, and a member left out would be lost. A revert sends the
  recomposed value, which for a tensor no other edit touches is the pristine copy the host
  keeps: the worker ends with the checkpoint's bits.
- :class:`VLLMBackend`, the :class:`~.base.GenerationBackend`: a request goes to vLLM's
  scheduler (continuous batching, prefix caching), its tokens come back through the same
  events as the Hugging Face backend's, decoded and stop-string-checked by the same code
  (:class:`~editserve.server.detokenize.IncrementalText`), so replies match token for token.

Runtime layers: SERAC memory needs nothing in the engine (routing rewrites the prompt before
it is submitted). T-Patcher neurons ride in the same commit as weights: when the active
neurons change, the payload carries every patched MLP's whole bank and each worker swaps its
banks under one forward hook per MLP (:mod:`.vllm_worker`). Hooks run only in an eager model
(``vllm_enforce_eager``, the default); with it off this host lacks the ``ffn_neurons``
capability and T-Patcher edits are refused before anything is computed (a compiled model
would need fixed-capacity neuron buffers registered before vLLM captures it).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from editserve.editing import neurons
from editserve.editing.artifacts import Artifact, RuntimeLayer
from editserve.editing.registry import ArtifactKind

from ..detokenize import IncrementalText
from ..host import ModelHost
from .base import (
    Failed,
    Finished,
    FinishReason,
    GenerationBackend,
    GenerationParams,
    LimitExceeded,
    RequestHandle,
    Started,
    Tokens,
)
from .hf import EngineObserver, _eos_ids
from .vllm_engine import VLLMEngine
from .vllm_worker import NEURONS_KEY, neuron_tensor_name

NAME = "vllm"


@dataclass
class VLLMHost(ModelHost):
    """The analysis view plus the engine its commits are mirrored into (set once the engine
    runs, before the journal is replayed, so replay reaches the workers too)."""

    engine: VLLMEngine | None = None
    # the engine's model runs eagerly (``vllm_enforce_eager``), so the workers' neuron hooks run
    neuron_hooks: bool = True

    @property
    def backend_name(self) -> str:
        return NAME

    @property
    def capabilities(self) -> frozenset[str]:
        """Weight deltas (reloaded into the workers), SERAC routing (before the engine) and,
        in an eager engine, FFN neurons (hooked in the workers)."""
        kinds = {ArtifactKind.WEIGHT_DELTA.value, ArtifactKind.RUNTIME_LAYER.value, "routing"}
        return frozenset(kinds | ({"ffn_neurons"} if self.neuron_hooks else set()))

    def check_delta(self, delta: Artifact) -> None:
        if (isinstance(delta, RuntimeLayer) and delta.layer_type == neurons.LAYER_TYPE
                and not self.neuron_hooks):
            raise ValueError(f"the {NAME} backend hosts runtime layers of type {delta.layer_type!r} only "
                             "with vllm_enforce_eager")
        super().check_delta(delta)

    def engine_names(self, names: list[str]) -> list[str]:
        """``names`` plus every other member of the fused groups they belong to, in name order."""
        packed = self.engine.packed_modules if self.engine is not None else {}
        out = set(names)
        for name in names:
            *parent, leaf, kind = name.split(".")
            for members in packed.values():
                if leaf in members:
                    for member in members:
                        sibling = ".".join([*parent, member, kind])
                        try:
                            self.model.get_parameter(sibling)
                        except AttributeError:
                            continue
                        out.add(sibling)
        return sorted(out)

    def _commit(self, active, prepared, revision: int) -> float:
        """Swap the analysis view's tensors (and neuron banks), then load the same bits into
        the workers: the touched weights, and every bank whenever the active neurons changed."""
        from safetensors.torch import save_file

        values, _pristine = prepared
        neurons_before = _neuron_edits(self._active)
        pause = super()._commit(active, prepared, revision)
        if self.engine is None:
            return pause
        names = self.engine_names(sorted(values))
        tensors = {n: self.model.get_parameter(n).detach().cpu().contiguous() for n in names}
        metadata = {}
        if _neuron_edits(active) != neurons_before:
            metadata[NEURONS_KEY] = json.dumps(sorted(self._banks))
            for module, bank in self._banks.items():
                for part in ("keys", "biases", "values"):
                    tensors[neuron_tensor_name(module, part)] = getattr(bank, part).detach().cpu().contiguous()
        if not tensors and not metadata:
            return pause + self.engine.commit(None, revision)
        shm = Path("/dev/shm")
        with tempfile.TemporaryDirectory(prefix="editserve-weights-", dir=shm if shm.is_dir() else None) as tmp:
            path = Path(tmp) / f"revision-{revision}.safetensors"
            save_file(tensors, str(path), metadata=metadata)
            return pause + self.engine.commit(str(path), revision)


def _neuron_edits(active) -> list[str]:
    """The ids of the active edits that are FFN neurons, in order: the banks follow from them."""
    return [a.edit_id for a in active
            if isinstance(a.delta, RuntimeLayer) and a.delta.layer_type == neurons.LAYER_TYPE]


@dataclass
class _VLLMHandle(RequestHandle):
    """A request handle whose cancel also aborts the request inside vLLM."""

    engine: VLLMEngine | None = None
    request_id: str = ""

    def cancel(self) -> None:
        super().cancel()
        if self.engine is not None and self.request_id:
            self.engine.cancel(self.request_id)


@dataclass
class _Stream:
    """One request's state on the engine's loop thread: turns vLLM deltas into events."""

    handle: RequestHandle
    params: GenerationParams
    prompt_ids: list[int]
    text: IncrementalText
    eos: set[int]
    observer: EngineObserver
    engine: VLLMEngine
    submitted_at: float
    generated: list[int] = field(default_factory=list)
    last_token_at: float = 0.0
    finished: bool = False

    def on_output(self, out, revision: int) -> bool:
        """Emit one event per token (as the Hugging Face backend does); False once done."""
        completion = out.outputs[0]
        now = time.perf_counter()
        for i, token in enumerate(completion.token_ids):
            token = int(token)
            if token in self.eos and not self.params.ignore_eos:
                self._finish(FinishReason.STOP, "eos", revision)
                return False
            first = not self.generated
            if first:
                self.observer.on_first_token(now - self.submitted_at)
            else:
                self.observer.on_token(now - self.last_token_at)
            self.last_token_at = now
            self.generated.append(token)
            logprobs = [float(completion.logprobs[i][token].logprob)] if self.params.return_logprobs else []
            self.handle.events.put(Tokens(token_ids=[token], text=self.text.add(token), logprobs=logprobs,
                                          revision=revision, first=first))
            if self.text.stopped_by is not None:
                self._finish(FinishReason.STOP, self.text.stopped_by, revision)
                return False
        if out.finished:
            stop = completion.finish_reason == "stop"
            self._finish(FinishReason.STOP if stop else FinishReason.LENGTH, "eos" if stop else "", revision)
            return False
        return True

    def on_end(self, error: BaseException | None, cancelled: bool) -> None:
        if self.finished:
            return
        if error is not None:
            self.finished = True
            self.handle.events.put(Failed(error))
        else:
            self._finish(FinishReason.CANCELLED, "", None)

    def _finish(self, reason: FinishReason, stop_reason: str, revision: int | None) -> None:
        if self.finished:
            return
        self.finished = True
        rest = "" if reason == FinishReason.STOP and stop_reason != "eos" else self.text.flush()
        self.handle.events.put(Finished(reason=reason, stop_reason=stop_reason, prompt_tokens=len(self.prompt_ids),
                                        generated_tokens=len(self.generated),
                                        revision=self.engine.revision if revision is None else revision,
                                        text=rest))


class VLLMBackend(GenerationBackend):
    """Generate/GenerateStream on vLLM's engine, with the Hugging Face backend's events,
    limits and errors."""

    name = NAME

    def __init__(self, host: VLLMHost, engine: VLLMEngine, *, max_batch_size: int, max_pending: int,
                 observer: EngineObserver | None = None) -> None:
        self.host = host
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_pending = max_pending
        self.observer = observer or EngineObserver()
        self.max_positions = engine.options.max_model_len
        self._eos = _eos_ids(host.model, host.tokenizer)
        self._stopping = False

    def start(self) -> None:
        """Start the engine (if not yet) and mirror the host's commits into it."""
        if self.engine._loop is None:
            self.engine.start()
        self.host.engine = self.engine

    def stop(self) -> None:
        self._stopping = True
        self.engine.stop()

    @property
    def load(self) -> int:
        return self.engine.load

    def submit(self, prompt_ids: list[int], params: GenerationParams) -> RequestHandle:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if len(prompt_ids) + params.max_new_tokens > self.max_positions:
            raise LimitExceeded(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"model's context of {self.max_positions} tokens"
            )
        if self._stopping:
            raise LimitExceeded("server is shutting down", exhausted=True)
        if self.engine.load >= self.max_batch_size + self.max_pending:
            raise LimitExceeded(f"too many queued requests (max_pending_requests={self.max_pending})", exhausted=True)
        sampling = SamplingParams(
            n=1, max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k, seed=params.seed if params.temperature > 0 else None,
            # end-of-sequence is decided here, as in the HF backend: same ids, and the token is not emitted
            ignore_eos=True, stop_token_ids=[] if params.ignore_eos else sorted(self._eos),
            logprobs=0 if params.return_logprobs else None, detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )
        handle = _VLLMHandle(engine=self.engine)
        stream = _Stream(handle=handle, params=params, prompt_ids=list(prompt_ids),
                         text=IncrementalText(self.host.tokenizer, prompt_ids, params.stop), eos=self._eos,
                         observer=self.observer, engine=self.engine, submitted_at=time.perf_counter())
        handle.events.put(Started(prompt_tokens=len(prompt_ids), prompt_token_ids=list(prompt_ids)))
        handle.request_id = self.engine.submit(prompt_ids, sampling, stream.on_output, stream.on_end)
        return handle


def torch_dtype_name(dtype: str) -> str:
    """The server's dtype option as vLLM spells it."""
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]


def context_length(model: torch.nn.Module) -> int:
    """The model's context (what the Hugging Face backend allows too)."""
    config = model.config.get_text_config()
    return int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 2048))
