"""The vLLM backend against the Hugging Face backend, both over gRPC, in one run.

    .venv-vllm/bin/python bench/backend_bench.py --cache-dir ~/.cache/editserve \\
        [--backends hf,vllm,vllm-recompute] [--concurrency 1,16,64] [--new-tokens 32] [--edits 3]

Run it from the environment that has vLLM (README: Serving with vLLM); every server it starts
runs under the same interpreter, so its "hf" row is the HF backend under vLLM's pinned
transformers and torch. For the HF backend in the main environment, run
``.venv/bin/python bench/backend_bench.py --backends hf`` in the same sitting.

Per backend, a real server subprocess (same model, dtype and cache) and, measured in this
run on this machine:
- tokens/s summed over N concurrent streams (N from --concurrency), each generating
  --new-tokens tokens greedily with ignore_eos (every stream the same length);
- time to first token: median over those streams of (first text chunk - call);
- the pause a stream sees while an edit is committed: one stream runs while ROME edits are
  applied and reverted; the gap between the two tokens on either side of the revision
  switch, next to the median gap of that stream with no edit running, and the server's own
  `editserve_weight_swap_pause_seconds` (for vLLM: pausing the scheduler, loading the
  tensors into the worker, resetting the prefix cache).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = ["The capital of France is", "Once upon a time", "Michael Jordan plays the sport of",
           "The mother tongue of Danielle Darrieux is"]


@dataclass
class Row:
    backend: str
    concurrency: dict[int, tuple[float, float]] = field(default_factory=dict)  # N -> (tok/s, median ttft s)
    gaps: list[float] = field(default_factory=list)  # token gap at each commit (s)
    steady_gap: float = 0.0
    server_pause: tuple[float, float] = (0.0, 0.0)  # (mean, count) of the server-side pause
    start_seconds: float = 0.0


def streams(server, n: int, new_tokens: int) -> tuple[float, float]:
    """(tokens/s over all streams, median time to first token) for ``n`` concurrent streams."""
    ttfts, counts = [], []
    barrier = threading.Barrier(n + 1)
    lock = threading.Lock()

    def one(i: int) -> None:
        with server.client() as client:
            barrier.wait()
            began = time.perf_counter()
            first, count = None, 0
            for chunk in client.stream(PROMPTS[i % len(PROMPTS)], max_new_tokens=new_tokens, ignore_eos=True):
                if chunk.text:
                    count += 1
                    first = first or time.perf_counter() - began
            with lock:
                ttfts.append(first)
                counts.append(count)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    return sum(counts) / wall, statistics.median(ttfts)


def edit_pauses(server, edits: int) -> tuple[list[float], float]:
    """Gaps at each revision switch of a running stream, and its median gap without edits."""
    from editserve.client import Fact

    facts = [Fact("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
             Fact("{} plays the sport of", "Michael Jordan", "soccer", "basketball"),
             Fact("The capital of {} is", "France", "Rome", "Paris")]
    stamps: list[tuple[float, int]] = []
    stop = threading.Event()

    def read() -> None:
        with server.client() as client:
            while not stop.is_set():
                for chunk in client.stream("Once upon a time", max_new_tokens=1000, ignore_eos=True):
                    if chunk.text:
                        stamps.append((time.perf_counter(), chunk.revision))
                    if stop.is_set():
                        break

    with server.client() as client:
        client.edit(facts[0], dry_run=True)  # statistics and contexts warm, outside the timing
        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(3)
        for i in range(edits):
            result = client.edit(facts[i % len(facts)])
            time.sleep(1)
            client.revert(result.edit_id)
            time.sleep(1)
        stop.set()
        reader.join()
    gaps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:], strict=False) if b[1] != a[1]]
    steady = [b[0] - a[0] for a, b in zip(stamps, stamps[1:], strict=False) if b[1] == a[1]]
    return gaps, statistics.median(steady)


def run_backend(backend: str, args, tmp: Path) -> Row:
    from tests.server_process import start_server

    row = Row(backend)
    began = time.perf_counter()
    mode = ["--backend", "vllm", "--vllm-on-edit", "recompute"] if backend == "vllm-recompute" else ["--backend", backend]
    extra = [*mode, "--threads", str(args.threads), "--max-batch-size", str(max(args.concurrency)),
             "--max-concurrent-requests", str(2 * max(args.concurrency)), "--no-prepare-statistics",
             "--dtype", args.dtype, "--device", args.device]
    if args.cache_dir:
        extra += ["--cache-dir", args.cache_dir]
    server = start_server(args.model, tmp / backend / "state", tmp / backend / "logs", *extra, timeout=900)
    row.start_seconds = time.perf_counter() - began
    try:
        streams(server, 1, 4)  # warm-up
        for n in args.concurrency:
            row.concurrency[n] = streams(server, n, args.new_tokens)
            print(f"{backend}: {n} streams {row.concurrency[n][0]:.1f} tok/s, ttft {1e3 * row.concurrency[n][1]:.0f} ms",
                  flush=True)
        if args.edits:
            row.gaps, row.steady_gap = edit_pauses(server, args.edits)
            total = sum(server.metric("editserve_weight_swap_pause_seconds_sum", operation=op)
                        for op in ("apply", "revert"))
            count = sum(server.metric("editserve_weight_swap_pause_seconds_count", operation=op)
                        for op in ("apply", "revert"))
            row.server_pause = (total / max(count, 1), count)
            print(f"{backend}: token gaps at commits {[round(1e3 * g) for g in row.gaps]} ms (steady "
                  f"{1e3 * row.steady_gap:.0f} ms); server-side pause mean {1e3 * row.server_pause[0]:.1f} ms "
                  f"over {count:.0f}", flush=True)
    finally:
        server.stop()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--backends", default="hf,vllm,vllm-recompute",
                        help="hf, vllm (running requests keep their KV across an edit), vllm-recompute (they re-read it)")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--edits", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server process")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default="")
    args = parser.parse_args()
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            rows.append(run_backend(backend, args, Path(tmp)))
    print(f"\nmodel {args.model} {args.dtype} on {args.device}; {args.new_tokens} new tokens per stream, greedy")
    print("| backend | start (s) | " + " | ".join(f"{n} streams tok/s (ttft ms)" for n in args.concurrency)
          + " | token gap at a commit, max (ms) | steady gap (ms) | server-side pause, mean (ms) |")
    print("|---" * (5 + len(args.concurrency)) + "|")
    for row in rows:
        cells = " | ".join(f"{r:.1f} ({1e3 * t:.0f})" for r, t in (row.concurrency[n] for n in args.concurrency))
        gap = f"{1e3 * max(row.gaps):.0f}" if row.gaps else "-"
        print(f"| {row.backend} | {row.start_seconds:.0f} | {cells} | {gap} | {1e3 * row.steady_gap:.0f} | "
              f"{1e3 * row.server_pause[0]:.1f} (n={row.server_pause[1]:.0f}) |")


if __name__ == "__main__":
    main()
