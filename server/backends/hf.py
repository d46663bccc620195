"""Generation with Hugging Face transformers, batching concurrent requests.

One engine thread owns all forward passes. Requests are prefilled when admitted (short
prompts admitted together share one left-padded pass), then join the running batch: every
decode step advances all running sequences by one token in a single forward pass over a
left-padded KV cache. When the set of running sequences changes (a join, a finish, a cancel)
the batch cache is rebuilt from each sequence's valid slice; while it is stable the cache is
reused as is.

Every step holds the host's read lock, so an edit's apply (the writer) lands exactly between
two steps and every token knows the revision that produced it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..detokenize import IncrementalText
from ..host import ModelHost
from ..prefix_cache import PrefixCache, PrefixHit
from ..sampling import sample_token
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
from .bf16_products import DecodeScope
from .kv_slab import left_padded_slab_cache
from .lean_decode import lean_decoder_for
from .product_choice import choose_products

log = logging.getLogger(__name__)

# Positions a decode batch's KV slabs are allocated with past the current width (they double
# when a batch outgrows them).
SLAB_HEADROOM = 256
# An engine thread with nothing to do for this long ends (the next request starts another):
# its OpenMP team goes with it, so edits, traces and scores run while generation is idle are
# not throttled by a docked team (server/fresh_thread.py: 1.2-1.5x on their products).
IDLE_RELEASE_SECONDS = 1.0
# Prompts of at most this many tokens, admitted together and not served by the prefix cache,
# share one prefill pass (HFBackend._prefill_admitted); longer ones run alone.
PREFILL_TOGETHER_MAX_TOKENS = 64


class EngineObserver:
    """Hooks for metrics; the default does nothing."""

    def on_first_token(self, seconds: float) -> None: ...
    def on_token(self, seconds_since_previous: float) -> None: ...
    def on_step(self, batch_size: int, seconds: float) -> None: ...
    def on_prefill(self, prompt_tokens: int, reused_tokens: int) -> None: ...


@dataclass
class _Sequence:
    handle: RequestHandle
    params: GenerationParams
    prompt_ids: list[int]
    text: IncrementalText
    generator: torch.Generator | None
    submitted_at: float
    generated: list[int] = field(default_factory=list)
    length: int = 0  # tokens in this sequence's KV cache
    last_token: int = 0
    last_token_at: float = 0.0
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # own cache when not batched
    done: bool = False


@dataclass
class _Batch:
    rows: list[_Sequence]
    cache: DynamicCache
    mask: torch.Tensor  # [B, width] 1 = real token
    padded: bool  # some row is shorter than the width (else the mask is all ones and is not passed)
    width: int


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


class HFBackend(GenerationBackend):
    name = "hf"

    def __init__(
        self,
        host: ModelHost,
        *,
        max_batch_size: int = 8,
        max_pending: int = 64,
        observer: EngineObserver | None = None,
        prefix_cache_bytes: int = 0,
        products: str = "auto",
        lean_decode: bool = True,
        bf16_min_rows: int = 0,
    ) -> None:
        self.host = host
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.max_batch_size = max_batch_size
        self.max_pending = max_pending
        self.observer = observer or EngineObserver()
        self._eos = _eos_ids(host.model, host.tokenizer)
        config = host.model.config.get_text_config()
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 2048))
        self._device = next(host.model.parameters()).device
        # small fp32 products: F.linear or blocked, whichever this CPU runs faster (product_choice.py)
        # decode steps of at least bf16_min_rows rows may round products to bf16 (opt-in;
        # bf16_products.py): only inside this engine's decode steps, which set the scope
        self.decode_scope = DecodeScope()
        on_cpu = self._device.type == "cpu"
        self.products = choose_products(host.model, products if on_cpu else "plain",
                                        bf16_min_rows=bf16_min_rows if on_cpu else 0, scope=self.decode_scope)
        log.info("%s", self.products.describe())
        if bf16_min_rows and not self.products.bf16_rows:
            log.warning("decode_bf16_min_rows = %d: no batch size takes bf16 products here (not faster on this "
                        "machine, no oneDNN packed linear in this torch build, or not a CPU)", bf16_min_rows)
        # decode steps without transformers' per-call work where the architecture allows (lean_decode.py)
        self.lean, why = lean_decoder_for(host.model) if lean_decode else (None, "turned off (lean_decode = false)")
        log.info("lean decode step: %s", "on" if self.lean is not None else f"off, {why}")
        # prompts up to this many tokens admitted together share a prefill pass (0: never;
        # benchmarks set 0 to measure the engine as it was before)
        self.prefill_together_max_tokens = PREFILL_TOGETHER_MAX_TOKENS
        self._pending: collections.deque[_Sequence] = collections.deque()
        self._running: list[_Sequence] = []
        self._batch: _Batch | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._accepting = False
        self._thread: threading.Thread | None = None  # the engine thread while one runs

    # --- public ------------------------------------------------------------------------
    def start(self) -> None:
        """Accept requests. The engine thread starts with the first one and ends after
        IDLE_RELEASE_SECONDS without work; the next request starts a new one."""
        with self._cond:
            self._accepting = True
            if self._pending:
                self._wake_locked()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=30)

    def _wake_locked(self) -> None:
        """Start an engine thread unless one runs (call holding ``_cond``)."""
        if self._thread is None and self._accepting:
            self._thread = threading.Thread(target=self._loop, name="editserve-engine", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    @property
    def decode_path(self) -> str:
        """How decode steps run, for the model info metric: "lean" or "full" forward, and the
        batch sizes whose fp32 products take the blocked kernel."""
        blocked = ",".join(map(str, sorted(self.products.blocked_rows))) or "none"
        path = f"{'lean' if self.lean is not None else 'full'} step, blocked products for rows {blocked}"
        if self.products.bf16_rows:
            path += ", bf16 products for rows " + ",".join(map(str, sorted(self.products.bf16_rows)))
        return path

    @property
    def load(self) -> int:
        with self._cond:
            return len(self._pending) + len(self._running)

    def submit(self, prompt_ids: list[int], params: GenerationParams) -> RequestHandle:
        if len(prompt_ids) + params.max_new_tokens > self.max_positions:
            raise LimitExceeded(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"model's context of {self.max_positions} tokens"
            )
        handle = RequestHandle()
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        seq = _Sequence(
            handle=handle,
            params=params,
            prompt_ids=list(prompt_ids),
            text=IncrementalText(self.host.tokenizer, prompt_ids, params.stop),
            generator=generator,
            submitted_at=time.perf_counter(),
        )
        with self._cond:
            if self._stopping:
                raise LimitExceeded("server is shutting down", exhausted=True)
            if len(self._pending) >= self.max_pending:
                raise LimitExceeded(
                    f"too many queued requests (max_pending_requests={self.max_pending})", exhausted=True
                )
            self._pending.append(seq)
            self._wake_locked()
        handle.events.put(Started(prompt_tokens=len(prompt_ids), prompt_token_ids=list(prompt_ids)))
        return handle

    # --- engine loop -------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stopping and not self._pending and not self._running:
                    if not self._cond.wait(IDLE_RELEASE_SECONDS) and not self._pending and not self._stopping:
                        self._thread = None  # idle: this thread ends, its OpenMP team with it
                        return
                if self._stopping:
                    self._drain()
                    self._thread = None
                    return
                admit = []
                while self._pending and len(self._running) + len(admit) < self.max_batch_size:
                    admit.append(self._pending.popleft())
            try:
                live = []
                for seq in admit:
                    if seq.handle.cancelled.is_set():
                        self._finish(seq, FinishReason.CANCELLED, "")
                    else:
                        live.append(seq)
                self._prefill_admitted(live)
                for seq in live:
                    if not seq.done:
                        self._invalidate_batch()  # membership changed
                        self._running.append(seq)
                self._reap()
                if self._running:
                    self._decode_step()
                    self._reap()
            except Exception as error:  # noqa: BLE001 - a failed step fails its requests, not the server
                log.exception("generation step failed")
                for seq in [*admit, *self._running]:
                    if not seq.done:
                        seq.done = True
                        seq.handle.events.put(Failed(error))
                self._running = []
                self._batch = None

    def _drain(self) -> None:
        for seq in [*self._pending, *self._running]:
            if not seq.done:
                self._finish(seq, FinishReason.CANCELLED, "")
        self._pending.clear()
        self._running = []
        self._batch = None

    def _reap(self) -> None:
        """Drop finished and cancelled sequences from the running set."""
        keep = []
        for seq in self._running:
            if not seq.done and seq.handle.cancelled.is_set():
                self._finish(seq, FinishReason.CANCELLED, "")
            if seq.done:
                continue
            keep.append(seq)
        if len(keep) != len(self._running):
            self._invalidate_batch()
            self._running = keep

    # --- model work --------------------------------------------------------------------
    def _prefill_admitted(self, seqs: list[_Sequence]) -> None:
        """Prefill the sequences admitted together: short prompts that no earlier prompt's
        prefix covers share one left-padded forward pass, the rest run one by one.

        A short prompt's forward is mostly per-call work (the model's Python, one small
        product per weight), so 16 requests arriving at once used to spend ~0.75 s in 16
        prefills of ~47 ms before their first tokens; together they take one pass
        (docs/BENCHMARKS.md "Decode speed"). Long prompts are compute-bound, gain nothing from
        sharing a pass and would pay for the padding; a prompt the prefix cache serves reuses
        the cached keys instead. Each prompt that runs alone takes the read lock for its own
        lookup and forward and streams its first token at once, as before: an edit can land
        between two long prefills, and a long prompt's first token does not wait for the
        others'."""
        group: list[_Sequence] = []
        for seq in seqs:
            with self.host.lock.read():  # lookup, forward and store at one revision
                revision = self.host.revision
                hit = self.prefix_cache.lookup(seq.prompt_ids, revision)
                together = hit is None and len(seq.prompt_ids) <= self.prefill_together_max_tokens
                alone = None if together else self._prefill(seq, hit, revision)
            if alone is None:
                group.append(seq)
            else:
                self._first_token(*alone, revision)
        if not group:
            return
        with self.host.lock.read():
            revision = self.host.revision
            done = [self._prefill(group[0], None, revision)] if len(group) == 1 \
                else self._prefill_together(group, revision)
        for item in done:  # sampling and streaming need no lock
            self._first_token(*item, revision)

    def _first_token(self, seq: _Sequence, logits: torch.Tensor, reused: int, revision: int) -> None:
        """Account for a finished prefill and take the sequence's first token."""
        self.observer.on_prefill(len(seq.prompt_ids), reused)
        seq.length = len(seq.prompt_ids)
        now = time.perf_counter()
        self.observer.on_first_token(now - seq.submitted_at)
        seq.last_token_at = now
        self._accept(seq, logits, revision, first=True)

    def _prefill(self, seq: _Sequence, hit: PrefixHit | None, revision: int) -> tuple[_Sequence, torch.Tensor, int]:
        """Run one prompt, past whatever prefix an earlier prompt already computed (``hit``);
        (sequence, next-token logits, tokens reused). Called holding the host's read lock."""
        start = hit.tokens if hit is not None else 0
        cache = DynamicCache(ddp_cache_data=hit.kv) if hit is not None else DynamicCache()
        ids = torch.tensor([seq.prompt_ids[start:]], device=self._device)
        positions = torch.arange(start, len(seq.prompt_ids), device=self._device)
        out = self.host.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                              position_ids=positions[None], cache_position=positions)
        seq.kv = [(layer.keys, layer.values) for layer in cache.layers]
        self.prefix_cache.store(seq.prompt_ids, seq.kv, revision)
        return seq, out.logits[0, -1], start

    def _prefill_together(self, seqs: list[_Sequence], revision: int) -> list[tuple[_Sequence, torch.Tensor, int]]:
        """Run several whole prompts in one forward pass, left-padded to the longest; each
        keeps the unpadded slice of the keys and values. Called holding the read lock."""
        width = max(len(seq.prompt_ids) for seq in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long, device=self._device)
        mask = torch.zeros((len(seqs), width), dtype=torch.long, device=self._device)
        positions = torch.zeros((len(seqs), width), dtype=torch.long, device=self._device)
        for i, seq in enumerate(seqs):
            pad = width - len(seq.prompt_ids)
            ids[i, pad:] = torch.tensor(seq.prompt_ids, device=self._device)
            mask[i, pad:] = 1
            positions[i, pad:] = torch.arange(len(seq.prompt_ids), device=self._device)
        cache = DynamicCache()
        out = self.host.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                              use_cache=True, logits_to_keep=1,
                              cache_position=torch.arange(width, device=self._device))
        for i, seq in enumerate(seqs):
            pad = width - len(seq.prompt_ids)
            seq.kv = [(layer.keys[i : i + 1, :, pad:], layer.values[i : i + 1, :, pad:]) for layer in cache.layers]
            if self.prefix_cache.enabled:  # a slice would keep the whole batch's tensors alive
                self.prefix_cache.store(seq.prompt_ids, [(k.clone(), v.clone()) for k, v in seq.kv], revision)
        return [(seq, out.logits[i, -1], 0) for i, seq in enumerate(seqs)]

    def _invalidate_batch(self) -> None:
        """Give every still-running row its own KV slice back; the next step rebuilds the batch."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        for i, seq in enumerate(batch.rows):
            if seq.done:
                continue
            pad = batch.width - seq.length
            seq.kv = [(layer.keys[i : i + 1, :, pad:], layer.values[i : i + 1, :, pad:]) for layer in batch.cache.layers]

    def _build_batch(self) -> _Batch:
        rows = self._running
        lengths = [s.length for s in rows]
        # room for the tokens the rows may still generate (up to a bound; slabs double past it)
        room = max(s.params.max_new_tokens - len(s.generated) for s in rows)
        cache, width = left_padded_slab_cache([s.kv for s in rows], lengths,
                                              max(lengths) + min(max(room, 1), SLAB_HEADROOM))
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=self._device)
        for i, seq in enumerate(rows):
            mask[i, width - seq.length :] = 1
            seq.kv = None
        return _Batch(rows=list(rows), cache=cache, mask=mask, width=width,
                      padded=any(length != width for length in lengths))

    def _decode_step(self) -> None:
        if self._batch is None:
            self._batch = self._build_batch()
        batch = self._batch
        rows = batch.rows
        input_ids = torch.tensor([[s.last_token] for s in rows], device=self._device)
        positions = torch.tensor([[s.length] for s in rows], device=self._device)
        mask = None  # no padding: the mask would be all ones, plain causal attention needs none
        if batch.padded:
            mask = torch.cat([batch.mask, torch.ones((len(rows), 1), dtype=batch.mask.dtype, device=self._device)], 1)
        cache_position = torch.tensor([batch.width], device=self._device)
        started = time.perf_counter()
        with self.host.lock.read():
            revision = self.host.revision
            self.decode_scope.active = True  # this step's products may be bf16 (if opted in for its row count)
            try:
                if self.lean is not None and self.lean.usable():
                    logits = self.lean.step(input_ids, positions, batch.cache.layers, mask)
                else:  # a hook the lean step would skip is attached (or the model is not Llama-like)
                    logits = self.host.model(
                        input_ids=input_ids,
                        attention_mask=mask,
                        position_ids=positions,
                        past_key_values=batch.cache,
                        cache_position=cache_position,
                        use_cache=True,
                    ).logits[:, -1]
            finally:
                self.decode_scope.active = False
        now = time.perf_counter()
        self.observer.on_step(len(rows), now - started)
        if mask is not None:
            batch.mask = mask
        batch.width += 1
        # greedy rows' tokens in one operation: one argmax per row cost ~0.1 ms each here
        greedy = logits.argmax(-1).tolist() if any(s.params.temperature <= 0.0 for s in rows) else None
        for i, seq in enumerate(rows):
            seq.length += 1
            self.observer.on_token(now - seq.last_token_at)
            seq.last_token_at = now
            self._accept(seq, logits[i], revision, first=False,
                         greedy=greedy[i] if greedy is not None and seq.params.temperature <= 0.0 else None)

    def _accept(self, seq: _Sequence, logits: torch.Tensor, revision: int, *, first: bool,
                greedy: int | None = None) -> None:
        """Sample the next token of one sequence (``greedy``: already chosen, the row's
        argmax), emit it, and decide whether it is done.

        Everything here is one request's own business (its sampling options, its stop
        strings), so a failure fails that request alone: its neighbours in the batch go on."""
        try:
            self._accept_token(seq, logits, revision, first=first, greedy=greedy)
        except Exception as error:  # noqa: BLE001 - reported to the one request it belongs to
            log.exception("sampling failed for one request; the others in its batch go on")
            seq.done = True
            seq.kv = None
            seq.handle.events.put(Failed(error))

    def _accept_token(self, seq: _Sequence, logits: torch.Tensor, revision: int, *, first: bool,
                      greedy: int | None) -> None:
        params = seq.params
        token = greedy if greedy is not None else sample_token(logits, params, seq.generator)
        logprob = float(torch.log_softmax(logits.float(), -1)[token]) if params.return_logprobs else 0.0
        if token in self._eos and not params.ignore_eos:
            self._finish(seq, FinishReason.STOP, "eos", revision)
            return
        seq.generated.append(token)
        seq.last_token = token
        text = seq.text.add(token)
        seq.handle.events.put(
            Tokens(token_ids=[token], text=text, logprobs=[logprob] if params.return_logprobs else [],
                   revision=revision, first=first)
        )
        if seq.text.stopped_by is not None:
            self._finish(seq, FinishReason.STOP, seq.text.stopped_by, revision)
        elif len(seq.generated) >= params.max_new_tokens or seq.length + 1 >= self.max_positions:
            self._finish(seq, FinishReason.LENGTH, "", revision)

    def _finish(self, seq: _Sequence, reason: FinishReason, stop_reason: str, revision: int | None = None) -> None:
        seq.done = True
        seq.kv = None
        rest = "" if reason == FinishReason.STOP and stop_reason != "eos" else seq.text.flush()
        seq.handle.events.put(
            Finished(
                reason=reason,
                stop_reason=stop_reason,
                prompt_tokens=len(seq.prompt_ids),
                generated_tokens=len(seq.generated),
                revision=self.host.revision if revision is None else revision,
                text=rest,
            )
        )
