"""Load on loopback: N concurrent GenerateStream clients and an Edit every few seconds.

Bounded in count and time (``streams`` clients, ``duration_s`` seconds, a fixed number of tokens
per stream) and on 127.0.0.1 only. What it measures, from the clients' side and the server
process's: errors of any kind (a stream that fails, ends early or short, an edit or revert that
fails), request latency (stream start to last chunk) and the gap between consecutive token
chunks of one stream (what a reader feels during an edit's weight swap), p50 and p99, and the
server's resident memory before and after the measured window.

Why a warm-up: the first edit loads statistics and allocator pools grow to the batch size in
the first seconds; measuring memory from there would count one-off growth as a leak. The
baseline is taken after every stream has completed once, one edit and its revert are done, and
then ``warmup_s`` more seconds of the same load with its edits have run: on SmolLM2 the heap
reached its plateau only once an edit's compute had overlapped a full decode batch (a 43 MiB
step in the first 20 s of a window measured from an earlier baseline, flat for the 580 s after).
Besides the point-to-point growth (end against baseline), the result gives the growth of the
median of the window's last minute against the median of its first: a single sample can land
in an edit's transient working set (tens of MiB on SmolLM2), a median of six cannot.
Each edit tick applies a new edit and reverts the previous one, so the active set stays at one
edit and growth past the baseline is not the edits' own (legitimate) state.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field

import psutil

from editserve.client import EditserveError
from tests.proofs.crash import fact
from tests.server_process import ServerProcess

PROMPT = "Once upon a time there was"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


@dataclass
class LoadResult:
    streams: int
    duration_s: float
    requests: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds per completed stream
    gaps: list[float] = field(default_factory=list)  # seconds between token chunks of one stream
    edits: int = 0
    reverts: int = 0
    edit_seconds: list[float] = field(default_factory=list)
    rss_baseline: int = 0
    rss_final: int = 0
    rss_peak: int = 0
    # (seconds since the measured window began, RSS) every ~10 s: a plateau (allocator arenas
    # filling up) and a leak (linear growth) end at the same final figure but differ here
    rss_series: list[tuple[float, int]] = field(default_factory=list)

    @property
    def rss_growth(self) -> float:
        return (self.rss_final - self.rss_baseline) / self.rss_baseline

    def summary(self) -> dict[str, float | int]:
        ms = 1000.0
        return {
            "streams": self.streams, "duration_s": round(self.duration_s, 1), "requests": self.requests,
            "tokens": self.tokens, "tokens_per_s": round(self.tokens / self.duration_s, 1),
            "errors": len(self.errors), "edits": self.edits, "reverts": self.reverts,
            "latency_p50_ms": round(percentile(self.latencies, 50) * ms, 1),
            "latency_p99_ms": round(percentile(self.latencies, 99) * ms, 1),
            "gap_p50_ms": round(percentile(self.gaps, 50) * ms, 1),
            "gap_p99_ms": round(percentile(self.gaps, 99) * ms, 1),
            "gap_max_ms": round(max(self.gaps, default=0.0) * ms, 1),
            "edit_median_s": round(statistics.median(self.edit_seconds), 2) if self.edit_seconds else 0.0,
            "rss_baseline_mib": round(self.rss_baseline / 2**20, 1),
            "rss_final_mib": round(self.rss_final / 2**20, 1),
            "rss_peak_mib": round(self.rss_peak / 2**20, 1),
            "rss_growth_pct": round(100 * self.rss_growth, 2),
            "rss_growth_second_half_pct": round(100 * self.rss_growth_second_half, 2),
            "rss_growth_minute_medians_pct": round(100 * self.rss_growth_minute_medians, 2),
            "rss_series_mib": [(round(t), round(rss / 2**20, 1)) for t, rss in self.rss_series],
        }

    @property
    def rss_growth_minute_medians(self) -> float:
        """Median RSS of the window's last minute against the median of its first minute."""
        if len(self.rss_series) < 2:
            return 0.0
        end = self.rss_series[-1][0]
        first = statistics.median(rss for t, rss in self.rss_series if t < 60)
        last = statistics.median(rss for t, rss in self.rss_series if t > end - 60)
        return (last - first) / first

    @property
    def rss_growth_second_half(self) -> float:
        """Growth over the second half of the window, against the baseline: near 0 for a
        plateau, about half the total growth for a steady leak."""
        if not self.rss_series:
            return 0.0
        middle = min(self.rss_series, key=lambda point: abs(point[0] - self.duration_s / 2))[1]
        return (self.rss_final - middle) / self.rss_baseline


def run_load(server: ServerProcess, *, streams: int, duration_s: float, max_new_tokens: int = 32,
             edit_every_s: float = 10.0, edit_options: dict | None = None, warmup_s: float = 0.0) -> LoadResult:
    """Drive ``streams`` GenerateStream clients and an edit every ``edit_every_s`` seconds for
    ``duration_s`` seconds after a warm-up; see the module docstring for what is measured."""
    from tests.proofs.crash import ROME_TINY

    options = dict(edit_options or ROME_TINY)
    result = LoadResult(streams, duration_s)
    lock = threading.Lock()
    measuring = threading.Event()
    stop = threading.Event()
    warmed = threading.Barrier(streams + 1)
    process = psutil.Process(server.proc.pid)

    def stream_client() -> None:
        first_round = True
        with server.client(timeout=300) as client:
            while not stop.is_set():
                measured = measuring.is_set()
                started = last = time.perf_counter()
                gaps, generated = [], None
                try:
                    for chunk in client.stream(PROMPT, max_new_tokens=max_new_tokens, ignore_eos=True):
                        now = time.perf_counter()
                        if chunk.token_ids or chunk.text:
                            if chunk.prompt_tokens is None:
                                gaps.append(now - last)
                            last = now
                        if chunk.generated_tokens is not None:
                            generated = chunk.generated_tokens
                    if generated != max_new_tokens:
                        raise RuntimeError(f"stream ended after {generated} of {max_new_tokens} tokens")
                except (EditserveError, RuntimeError) as error:
                    with lock:
                        result.errors.append(f"stream: {type(error).__name__}: {error}")
                    time.sleep(0.5)
                    continue
                finally:
                    if first_round:
                        first_round = False
                        warmed.wait(timeout=600)
                if measured:
                    with lock:
                        result.requests += 1
                        result.tokens += generated
                        result.latencies.append(time.perf_counter() - started)
                        result.gaps += gaps[1:]  # the first gap is the time to first token

    def edit_once(client, previous: str | None) -> str | None:
        started = time.perf_counter()
        try:
            edit_id = client.edit(fact(result.edits), **options).edit_id
            result.edit_seconds.append(time.perf_counter() - started)
            result.edits += 1
            if previous is not None:
                client.revert(previous)
                result.reverts += 1
            return edit_id
        except EditserveError as error:
            with lock:
                result.errors.append(f"edit: {type(error).__name__}: {error}")
            return previous

    clients = [threading.Thread(target=stream_client, daemon=True) for _ in range(streams)]
    for thread in clients:
        thread.start()
    with server.client(timeout=600) as editor:
        warmed.wait(timeout=600)  # every stream done once
        previous = edit_once(editor, None)
        previous = edit_once(editor, previous)
        warm_until = time.monotonic() + warmup_s
        while time.monotonic() < warm_until:  # the same load and edits, not yet measured
            time.sleep(min(edit_every_s, max(0.0, warm_until - time.monotonic())))
            previous = edit_once(editor, previous)
        result.rss_baseline = result.rss_peak = process.memory_info().rss
        result.edits = result.reverts = 0
        result.edit_seconds.clear()
        measuring.set()
        began = time.monotonic()
        next_edit = began + edit_every_s
        next_sample = began
        while (now := time.monotonic()) < began + duration_s:
            rss = process.memory_info().rss
            result.rss_peak = max(result.rss_peak, rss)
            if now >= next_sample:
                result.rss_series.append((now - began, rss))
                next_sample += 10.0
            if now >= next_edit:
                previous = edit_once(editor, previous)
                next_edit += edit_every_s
            time.sleep(0.2)
        measuring.clear()
        stop.set()
        for thread in clients:
            thread.join(300)
        result.duration_s = time.monotonic() - began  # streams started in the window finish in it
        result.rss_final = process.memory_info().rss
        result.rss_peak = max(result.rss_peak, result.rss_final)
        if previous is not None:
            editor.revert(previous)
    return result
