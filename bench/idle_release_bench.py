"""What a docked engine team costs the server's other torch work, and what releasing it saves.

    .venv/bin/python bench/idle_release_bench.py [--runs 3]

In-process: the engine serves a short Generate, then 0.3 s later a forward of 10 prompts x 8
tokens runs in a fresh thread (as an edit, trace or score does in the server). A: the engine
thread is kept (idle release far away); B: it ends after 0.1 s idle, taking its OpenMP team
with it (server/fresh_thread.py, ``IDLE_RELEASE_SECONDS`` in server/backends/hf.py). A and B
alternate run by run in one process; the printed ratio is A / B of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    import torch

    from editserve.server.backends import hf
    from editserve.server.backends.base import Finished, GenerationParams
    from editserve.server.fresh_thread import in_fresh_thread
    from editserve.server.host import ModelHost
    from editserve.server.models import load_model

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, tokenizer, _ = in_fresh_thread(partial(load_model, args.model))
    host = ModelHost(model, tokenizer, name=args.model, dtype="fp32", device="cpu")
    backend = in_fresh_thread(partial(hf.HFBackend, host))
    backend.start()
    batch = tokenizer(["The capital of France is a city"] * 10, return_tensors="pt").input_ids

    def forward() -> float:
        times = []
        for _ in range(5):
            started = time.perf_counter()
            model(input_ids=batch)
            times.append(time.perf_counter() - started)
        return statistics.median(times[1:])

    results: dict[str, list[float]] = {"kept": [], "released": []}
    try:
        for _ in range(args.runs):
            for name, idle in (("kept", 1e6), ("released", 0.1)):
                hf.IDLE_RELEASE_SECONDS = idle  # read by the next engine thread's idle wait
                for event in backend.submit(tokenizer("Hello there").input_ids,
                                            GenerationParams(max_new_tokens=4, ignore_eos=True)):
                    if isinstance(event, Finished):
                        break
                time.sleep(0.3)
                results[name].append(in_fresh_thread(forward))
    finally:
        backend.stop()
    kept, released = (statistics.median(results[k]) for k in ("kept", "released"))
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {args.model} fp32, {args.threads} threads, forward of 10 x "
          f"{batch.shape[1]} tokens 0.3 s after a Generate, median of {args.runs}")
    print("| engine thread after the Generate | forward (runs) |")
    print("|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values) * 1e3:.0f} ms ({', '.join(f'{v * 1e3:.0f}' for v in values)}) |")
    print(f"kept / released: {kept / released:.2f}x")


if __name__ == "__main__":
    main()
