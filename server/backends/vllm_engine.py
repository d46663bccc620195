"""vLLM's asynchronous engine, driven from the server's threads.

gRPC handlers run in a thread pool; vLLM's :class:`AsyncLLM` lives on an asyncio loop. This
module owns that loop (one daemon thread) and exposes three thread-safe operations: start a
request, cancel it, and commit new weights at a revision. vLLM itself is imported only here
and in :mod:`.vllm`, so a server without the extra never imports it.

Committing weights while requests stream (:meth:`VLLMEngine.commit`):

1. pause the scheduler, keeping requests (``pause_scheduler(mode="keep")``): the step under
   way finishes, no new one starts, and the pause reply follows that step's outputs;
2. wait until the frontend has dispatched every output that came before the reply (see
   :meth:`VLLMEngine._settle`), then hand each request its pending output at the *old*
   revision: every token produced so far is attributed to the weights that produced it;
3. ``collective_rpc`` the tensors into every worker (:mod:`.vllm_worker`);
4. reset the prefix cache, so that no request reads KV computed by the old weights. With
   ``on_edit="recompute"`` running requests are preempted
   (``reset_prefix_cache(reset_running_requests=True)``) and recompute their prompt and the
   tokens so far with the new weights: every token after the commit is produced by the new
   weights alone, at the price of that recompute in the pause. With ``on_edit="keep"`` (the
   default) running requests keep their KV (as the Hugging Face backend's running sequences do) and
   the cache is reset only when no request holds blocks; every request's prompt is salted
   with the revision it arrived at (``cache_salt``), so a request arriving later never
   matches blocks of another revision. (A request already queued at an older revision when
   the commit lands may still reuse that revision's prompt blocks: "keep" trades that for
   the shorter pause; docs/ARCHITECTURE.md);
5. label vLLM's weight version with the revision, bump ours and resume.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

WORKER_EXTENSION = "editserve.server.backends.vllm_worker.EditserveWorkerExtension"


@dataclass(frozen=True)
class EngineOptions:
    """How the engine is built; every field comes from :class:`~editserve.server.config.ServeConfig`."""

    model_dir: str
    dtype: str  # "float32", "bfloat16", "float16"
    max_model_len: int
    max_num_seqs: int
    kv_cache_bytes: int
    enforce_eager: bool = True
    # what running requests do when weights change: "recompute" their KV, or "keep" it
    on_edit: str = "keep"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    seed: int = 0


@dataclass
class _Live:
    """One request inside the engine: its output collector and who consumes it."""

    collector: object  # vllm RequestOutputCollector
    on_output: Callable[[object, int], bool]  # (RequestOutput, revision) -> keep going?
    task: asyncio.Task | None = None
    done: bool = False  # no more outputs wanted (finished, stopped by its consumer, cancelled)
    finished: bool = False  # vLLM finished it (nothing to abort)
    cancel_requested: bool = False


@dataclass
class VLLMEngine:
    """An ``AsyncLLM`` on its own event-loop thread. ``revision`` labels the weights the
    workers hold; every output is attributed to the revision current when it was produced."""

    options: EngineOptions
    revision: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _engine: object | None = None
    _live: dict[str, _Live] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=itertools.count)
    _commit_lock: threading.Lock = field(default_factory=threading.Lock)
    packed_modules: dict[str, list[str]] = field(default_factory=dict)

    # --- life cycle ----------------------------------------------------------------------
    def start(self, timeout: float = 900) -> None:
        """Start the loop thread and the engine (spawns vLLM's engine-core and worker
        processes; ~25 s on a 2-core CPU with ``enforce_eager``)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="editserve-vllm-loop", daemon=True)
        self._thread.start()
        self._call(self._start(), timeout)

    async def _start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        o = self.options
        args = AsyncEngineArgs(
            model=o.model_dir, tokenizer=o.model_dir, dtype=o.dtype, max_model_len=o.max_model_len,
            max_num_seqs=o.max_num_seqs, kv_cache_memory_bytes=o.kv_cache_bytes, enforce_eager=o.enforce_eager,
            tensor_parallel_size=o.tensor_parallel_size, gpu_memory_utilization=o.gpu_memory_utilization,
            enable_prefix_caching=True, worker_extension_cls=WORKER_EXTENSION, seed=o.seed,
            disable_log_stats=True, skip_tokenizer_init=False,
        )
        self._engine = AsyncLLM.from_engine_args(args)
        (self.packed_modules,) = set_of_one(await self._engine.collective_rpc("editserve_packed_modules"))

    def stop(self) -> None:
        """Cancel every request and shut the engine's processes down."""
        if self._loop is None:
            return
        try:
            self._call(self._stop(), 60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._loop = None

    async def _stop(self) -> None:
        tasks = [live.task for live in self._live.values() if live.task is not None]
        for live in list(self._live.values()):
            live.cancel_requested = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    def _call(self, coroutine, timeout: float | None):
        if self._loop is None:
            raise RuntimeError("the vLLM engine is not running")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    # --- requests ------------------------------------------------------------------------
    @property
    def load(self) -> int:
        """Requests the engine still holds: queued, running, or cancelled but not yet aborted
        inside vLLM (an entry leaves once vLLM has finished or aborted it)."""
        return len(self._live)

    def submit(self, prompt_ids: list[int], sampling: object, on_output: Callable[[object, int], bool],
               on_end: Callable[[BaseException | None, bool], None]) -> str:
        """Queue one request. ``on_output(output, revision)`` runs on the loop thread for
        every delta and returns False to stop the request (a stop string matched);
        ``on_end(error, cancelled)`` runs once when it has left the engine."""
        request_id = f"editserve-{next(self._ids)}"
        if self._loop is None:
            raise RuntimeError("the vLLM engine is not running")
        self._loop.call_soon_threadsafe(self._begin, request_id, list(prompt_ids), sampling, on_output, on_end)
        return request_id

    def cancel(self, request_id: str) -> None:
        """Abort a request (client cancel, deadline, shutdown); frees its KV blocks and slot."""
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._cancel, request_id)

    def _cancel(self, request_id: str) -> None:
        live = self._live.get(request_id)
        if live is not None and live.task is not None and not live.done:
            live.cancel_requested = True
            live.task.cancel()

    def _begin(self, request_id, prompt_ids, sampling, on_output, on_end) -> None:
        live = _Live(collector=None, on_output=on_output)
        self._live[request_id] = live
        live.task = asyncio.ensure_future(self._run(request_id, live, prompt_ids, sampling, on_end))

    async def _run(self, request_id, live: _Live, prompt_ids, sampling, on_end) -> None:
        error: BaseException | None = None
        cancelled = False
        try:
            prompt = {"prompt_token_ids": prompt_ids, "cache_salt": f"revision-{self.revision}"}
            live.collector = await self._engine.add_request(request_id, prompt, sampling)
            while not live.done:
                out = live.collector.get_nowait() or await live.collector.get()
                self._deliver(live, out)
        except asyncio.CancelledError:
            # a client's cancel, or a commit that delivered this request's last output itself
            cancelled = live.cancel_requested
        except Exception as failure:  # noqa: BLE001 - reported to its own request
            error = failure
        finally:
            live.done = True
            try:
                if not live.finished and live.collector is not None and self._engine is not None:
                    await self._engine.abort(live.collector.request_id, internal=True)
            finally:
                self._live.pop(request_id, None)
                on_end(error, cancelled)

    def _deliver(self, live: _Live, out) -> None:
        """One output at the current revision; marks the request done when it finished or
        its consumer wants no more."""
        keep_going = live.on_output(out, self.revision)
        live.finished = live.finished or out.finished
        if live.finished or not keep_going:
            live.done = True

    # --- weights -------------------------------------------------------------------------
    def commit(self, payload: str | None, revision: int) -> float:
        """Load ``payload`` (a safetensors file of checkpoint-named tensors) into every
        worker at ``revision``; None only relabels (an edit that changes no weights, e.g. a
        SERAC memory). Returns the seconds generation was paused."""
        with self._commit_lock:
            if payload is None:
                self._call(self._relabel(revision), None)
                return 0.0
            return self._call(self._commit(payload, revision), 600)

    async def _relabel(self, revision: int) -> None:
        self.revision = revision
        await self._engine.engine_core.set_weight_version_async(str(revision))

    async def _commit(self, payload: str, revision: int) -> float:
        engine = self._engine
        started = time.perf_counter()
        await engine.engine_core.pause_scheduler_async(mode="keep", clear_cache=False)
        paused = time.perf_counter()
        try:
            await self._settle()
            for live in list(self._live.values()):
                while not live.done and live.collector is not None and (out := live.collector.get_nowait()):
                    self._deliver(live, out)  # produced by the old weights: old revision
                    if live.done and live.task is not None:
                        live.task.cancel()  # its consumer waits on an empty collector: end it
            sent = time.perf_counter()
            worker_seconds = await engine.collective_rpc("editserve_load", args=(payload,))
            loaded = time.perf_counter()
            if self.options.on_edit == "recompute":
                if not await engine.reset_prefix_cache(reset_running_requests=True):
                    raise RuntimeError("vLLM could not reset its prefix cache after a weight change")
            elif not self._live:  # "keep": only an idle cache can be reset; salts cover the rest
                await engine.reset_prefix_cache()
            await engine.engine_core.set_weight_version_async(str(revision))
            self.revision = revision
        finally:
            await engine.engine_core.resume_scheduler_async()
        done = time.perf_counter()
        log.info("weights at revision %d committed to vLLM: paused %.1f ms (pause %.1f, settle %.1f, load %.1f "
                 "of which in the worker %.1f, cache reset and resume %.1f), %d bytes", revision, 1e3 * (done - started),
                 1e3 * (paused - started), 1e3 * (sent - paused), 1e3 * (loaded - sent), 1e3 * max(worker_seconds),
                 1e3 * (done - loaded), os.path.getsize(payload))
        return done - started

    async def _settle(self) -> None:
        """Until the frontend has dispatched every engine output received so far.

        The engine core sends a step's outputs before the reply to the pause that follows it,
        and the client resolves that reply immediately while outputs wait in its queue for
        the output handler, which takes each one and dispatches it to the request
        collectors without yielding in between (fewer than 128 outputs a message). So once
        that queue is empty, every earlier output sits in a collector."""
        queue = self._engine.engine_core.outputs_queue
        for _ in range(10_000):
            if queue.empty():
                await asyncio.sleep(0)
                if queue.empty():
                    return
            await asyncio.sleep(0)
        raise RuntimeError("vLLM's output queue did not drain while generation was paused")


def set_of_one(replies: list):
    """The one distinct reply of a collective RPC (every rank must agree)."""
    distinct = {repr(r): r for r in replies}
    if len(distinct) != 1:
        raise RuntimeError(f"vLLM workers disagree: {list(distinct)[:3]}")
    return tuple(distinct.values())

