"""Serving throughput: gRPC vs in-process generate, concurrency gain, time to first token.

    flock /tmp/editserve-heavy.lock .venv/bin/python bench/serving_bench.py [--model smollm2-135m] [--threads 2]

Everything is measured in this run, on this machine: the in-process baseline first (the
server not yet started), then the server as a subprocess with the same thread count.
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

PROMPT = "The capital of France is"


def in_process_tokens_per_second(model_name: str, threads: int, new_tokens: int, runs: int) -> float:
    import torch

    from editserve.server.models import load_model

    torch.set_num_threads(threads)
    model, tokenizer, _ = load_model(model_name)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    rates = []
    for _ in range(runs + 1):  # first run warms up
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        rates.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - started))
    return statistics.median(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()

    from tests.server_process import start_server

    baseline = in_process_tokens_per_second(args.model, args.threads, args.new_tokens, args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(args.model, Path(tmp) / "state", Path(tmp) / "logs", "--threads", str(args.threads),
                              "--max-batch-size", str(args.clients))
        try:
            with server.client() as client:
                client.generate(PROMPT, max_new_tokens=4)  # warm-up
                rates, ttfts = [], []
                for _ in range(args.runs):
                    started = time.perf_counter()
                    first = None
                    count = 0
                    for chunk in client.stream(PROMPT, max_new_tokens=args.new_tokens, ignore_eos=True):
                        if chunk.text and first is None:
                            first = time.perf_counter() - started
                        if chunk.generated_tokens is not None:
                            count = chunk.generated_tokens
                    rates.append(count / (time.perf_counter() - started))
                    ttfts.append(first or 0.0)
                grpc_rate = statistics.median(rates)

                per_request = 32
                started = time.perf_counter()
                for _ in range(args.clients):
                    client.generate(PROMPT, max_new_tokens=per_request, ignore_eos=True)
                sequential = time.perf_counter() - started

            def one() -> None:
                with server.client() as c:
                    c.generate(PROMPT, max_new_tokens=per_request, ignore_eos=True)

            threads = [threading.Thread(target=one) for _ in range(args.clients)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            concurrent = time.perf_counter() - started
        finally:
            server.stop()

    print(f"model {args.model}, fp32, {args.threads} torch threads, prompt {PROMPT!r}")
    print("| measure | value |")
    print("|---|---|")
    print(f"| in-process `model.generate`, batch 1 | {baseline:.1f} tok/s |")
    print(f"| gRPC GenerateStream, batch 1 | {grpc_rate:.1f} tok/s |")
    print(f"| ratio gRPC / in-process (goal >= 0.9) | {grpc_rate / baseline:.2f} |")
    print(f"| time to first token (stream, median of {args.runs}) | {statistics.median(ttfts) * 1000:.0f} ms |")
    print(f"| {args.clients} x {per_request} tokens sequential | {sequential:.2f} s |")
    print(f"| {args.clients} x {per_request} tokens from {args.clients} concurrent clients | {concurrent:.2f} s |")
    print(f"| concurrency speed-up (goal >= 3x) | {sequential / concurrent:.2f}x |")


if __name__ == "__main__":
    main()
