"""Why decode uses blocked products: F.linear against BlockedLinear on SmolLM2's weight shapes.

    flock /tmp/editserve-heavy.lock .venv/bin/python bench/gemv_bench.py

Every weight matrix of SmolLM2-135M (30 layers of q, k, v, o, gate, up, down, and the output
head), random values, multiplied by 1, 4 and 16 rows, as one decode step would: plain
``F.linear`` against the engine's blocked product, alternating run by run, with the read
bandwidth of the same threads measured beside them (a sum over a buffer larger than the
caches). GB/s here is weight bytes read per second.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
HEAD = (49152, 576)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from torch import nn

    from editserve.server.backends.blocked_linear import BlockedLinear

    torch.set_grad_enabled(False)
    print(f"{time.strftime('%Y-%m-%d')}, SmolLM2-135M weight shapes, median of {args.runs} steps")
    print("| threads | dtype | rows | read bandwidth | F.linear | blocked | speed-up |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        buffer = torch.ones(256 << 20)
        buffer.sum()
        sums = []
        for _ in range(args.runs):
            started = time.perf_counter()
            buffer.sum()
            sums.append(time.perf_counter() - started)
        bandwidth = buffer.nbytes / statistics.median(sums)
        del buffer
        for dtype in (torch.float32, torch.bfloat16):
            layers = []
            for out_features, in_features in LAYER * 30 + [HEAD]:
                layer = nn.Linear(in_features, out_features, bias=False).to(dtype)
                layer.__class__ = BlockedLinear
                layers.append(layer)
            nbytes = sum(layer.weight.nbytes for layer in layers)
            for rows in (1, 4, 16):
                inputs = {n: torch.randn(rows, 1, n, dtype=dtype) for n in (576, 1536)}

                def plain(layers=layers, inputs=inputs) -> None:
                    for layer in layers:
                        F.linear(inputs[layer.in_features], layer.weight)

                def blocked(layers=layers, inputs=inputs) -> None:
                    for layer in layers:
                        layer(inputs[layer.in_features])

                times: dict[str, list[float]] = {"plain": [], "blocked": []}
                plain(), blocked()
                for _ in range(args.runs):
                    for name, step in (("plain", plain), ("blocked", blocked)):
                        started = time.perf_counter()
                        step()
                        times[name].append(time.perf_counter() - started)
                p, b = statistics.median(times["plain"]), statistics.median(times["blocked"])
                print(f"| {threads} | {str(dtype).removeprefix('torch.')} | {rows} | {bandwidth / 1e9:.1f} GB/s | "
                      f"{p * 1000:.1f} ms ({nbytes / p / 1e9:.1f} GB/s) | {b * 1000:.1f} ms ({nbytes / b / 1e9:.1f} GB/s) "
                      f"| {p / b:.2f}x |")


if __name__ == "__main__":
    main()
