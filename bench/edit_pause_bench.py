"""What a concurrent stream feels while an edit is computed and applied.

    flock /tmp/editserve-heavy.lock .venv/bin/python bench/edit_pause_bench.py [--edits 5]

A client streams tokens continuously from a real server while another client runs ROME
edits. Per edit it reports: the longest gap between two tokens of the stream during the
apply (the write-lock pause; goal < 50 ms), the stream's throughput while the edit was being
computed versus with no edit running (baseline measured in the same run), and the edit's
compute/apply/revert times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from editserve.client import Fact
    from tests.server_process import start_server

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--edits", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    facts = [
        Fact("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
        Fact("{} plays the sport of", "Michael Jordan", "soccer", "basketball"),
        Fact("{} is located in the city of", "The Space Needle", "London", "Seattle"),
        Fact("The capital of {} is", "France", "Rome", "Paris"),
        Fact("{} was founded by", "Apple", "Bill Gates", "Steve Jobs"),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(args.model, Path(tmp) / "state", Path(tmp) / "logs", "--threads", str(args.threads))
        stamps: list[tuple[float, int]] = []  # (time, revision) per token
        stop = threading.Event()

        def stream() -> None:
            with server.client() as client:
                while not stop.is_set():
                    for chunk in client.stream("Once upon a time", max_new_tokens=400, ignore_eos=True):
                        if chunk.text or chunk.token_ids:
                            stamps.append((time.perf_counter(), chunk.revision))
                        if stop.is_set():
                            break

        try:
            reader = threading.Thread(target=stream)
            reader.start()
            time.sleep(8)  # baseline window: streaming alone
            baseline_end = time.perf_counter()
            rows = []
            with server.client() as client:
                client.edit(facts[0], dry_run=True)  # warm caches (statistics, contexts) outside the timing
                for i in range(args.edits):
                    fact = facts[i % len(facts)]
                    began = time.perf_counter()
                    result = client.edit(fact)
                    ended = time.perf_counter()
                    revert = client.revert(result.edit_id)
                    rows.append((began, ended, result))
                    rows[-1] = (began, ended, result, revert)
            stop.set()
            reader.join()
            swaps = {op: (server.metric("editserve_weight_swap_pause_seconds_sum", operation=op),
                          server.metric("editserve_weight_swap_pause_seconds_count", operation=op))
                     for op in ("apply", "revert")}
            slowest_bucket = _max_bucket(server.metrics(), "editserve_weight_swap_pause_seconds_bucket")
        finally:
            server.stop()

    def rate(t0: float, t1: float) -> float:
        n = sum(1 for t, _ in stamps if t0 <= t <= t1)
        return n / (t1 - t0)

    times = [t for t, _ in stamps]
    baseline_rate = rate(times[0] + 1, baseline_end)
    baseline_gap = max(b - a for a, b in zip(times, times[1:], strict=False) if b <= baseline_end)
    print(f"model {args.model}, {args.threads} torch threads, streaming 'Once upon a time' while editing (ROME)")
    print("| edit | compute (s) | apply (ms) | revert (ms) | stream tok/s during compute | longest token gap around the apply (ms) |")
    print("|---|---|---|---|---|---|")
    gaps, rates = [], []
    for i, (began, ended, result, revert) in enumerate(rows):
        # the apply happens at the end of the call; the revision switch marks it in the stream
        switch = [j for j in range(1, len(stamps)) if stamps[j][1] != stamps[j - 1][1] and began <= stamps[j][0] <= ended + 1]
        gap = max((stamps[j][0] - stamps[j - 1][0] for j in switch), default=float("nan"))
        compute_rate = rate(began, began + result.compute_seconds)
        gaps.append(gap)
        rates.append(compute_rate)
        print(f"| {i + 1} | {result.compute_seconds:.2f} | {1000 * result.apply_seconds:.1f} | "
              f"{1000 * revert.revert_seconds:.1f} | {compute_rate:.1f} | {1000 * gap:.0f} |")
    print()
    print(f"baseline (no edit running): {baseline_rate:.1f} tok/s, longest gap {1000 * baseline_gap:.0f} ms")
    print(f"median stream throughput during compute: {statistics.median(rates):.1f} tok/s "
          f"({statistics.median(rates) / baseline_rate:.2f} of baseline)")
    print(f"longest gap at an apply: {1000 * max(gaps):.0f} ms (a decode step plus the weight swap)")
    for op, (total, count) in swaps.items():
        print(f"server-side write-lock pause ({op}): mean {1e6 * total / max(count, 1):.0f} us over {count:.0f}")
    print(f"every write-lock pause <= {1000 * slowest_bucket:g} ms (smallest histogram bucket holding all)")


def _max_bucket(exposition: str, name: str) -> float:
    """The smallest histogram bound that holds every observation (over all label sets)."""
    counts: dict[float, float] = {}
    total = 0.0
    for line in exposition.splitlines():
        if not line.startswith(name + "{"):
            continue
        key, _, value = line.rpartition(" ")
        bound = key.split('le="')[1].split('"')[0]
        if bound == "+Inf":
            total += float(value)
        else:
            counts[float(bound)] = counts.get(float(bound), 0.0) + float(value)
    return min((b for b, c in counts.items() if c >= total), default=float("inf"))


if __name__ == "__main__":
    main()
