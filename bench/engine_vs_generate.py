"""The serving engine against transformers' ``generate`` at one batch size, interleaved.

    .venv/bin/python bench/engine_vs_generate.py [--batch 16] [--tokens 64] [--runs 3]

decode_bench.py measured ``generate`` first and the engine afterwards, with different linear
kernels (plain for ``generate``, blocked for the engine) and different prompts (one prompt
repeated for ``generate``, four of different lengths for the engine); on this machine speed
drifts by up to ~1.5x within minutes, so that comparison (0.66x) said little. Here both run
with the same products (the engine's blocked ones, installed when the engine is built), run
by run in turn, and the engine is timed on the same prompt repeated (no padding, as
``generate``) and on the four prompts of different lengths (padded). Rates include prefill
in both: submit to last token.
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
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    import torch

    from bench.decode_bench import PROMPTS, engine_run, generate_rate
    from editserve.server.backends import hf
    from editserve.server.fresh_thread import in_fresh_thread
    from editserve.server.host import ModelHost
    from editserve.server.models import load_model

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    # as in the server, torch work outside the engine runs in threads that end with it: a
    # thread that lives on keeps an idle OpenMP team, which throttles the engine's
    # (server/fresh_thread.py); generate's runs get a fresh thread each for the same reason
    model, tokenizer, _ = in_fresh_thread(partial(load_model, args.model, dtype="fp32"))
    host = ModelHost(model, tokenizer, name=args.model, dtype="fp32", device="cpu")
    hf.IDLE_RELEASE_SECONDS = 0.05  # the engine's thread (and team) ends before each generate run
    backend = in_fresh_thread(partial(hf.HFBackend, host, max_batch_size=args.batch, max_pending=args.batch))
    backend.start()
    same = [PROMPTS[0]] * args.batch
    mixed = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    rates: dict[str, list[float]] = {"generate, one prompt repeated": [], "engine, one prompt repeated": [],
                                     "engine, 4 prompts of different lengths": []}
    try:
        engine_run(backend, tokenizer, 1, 4)  # warm-up
        for _ in range(args.runs):
            time.sleep(0.2)
            rates["generate, one prompt repeated"].append(
                in_fresh_thread(partial(generate_rate, model, tokenizer, args.batch, args.tokens, 1)))
            rates["engine, one prompt repeated"].append(engine_run(backend, tokenizer, args.batch, args.tokens,
                                                                   prompts=same)[0])
            rates["engine, 4 prompts of different lengths"].append(
                engine_run(backend, tokenizer, args.batch, args.tokens, prompts=mixed)[0])
    finally:
        backend.stop()
    base = statistics.median(rates["generate, one prompt repeated"])
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {args.model} fp32, {args.threads} threads, batch {args.batch}, "
          f"{args.tokens} new tokens, median of {args.runs} interleaved runs")
    print("| path | tok/s (runs) | / generate |")
    print("|---|---|---:|")
    for name, values in rates.items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {name} | {statistics.median(values):.1f} ({runs}) | {statistics.median(values) / base:.2f}x |")


if __name__ == "__main__":
    main()
