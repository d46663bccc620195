"""Time to first token with a shared system prompt: prefix cache on against off, one run.

    flock /tmp/editserve-heavy.lock .venv/bin/python bench/prefix_bench.py [--model smollm2-135m]

A service that puts the same instructions ahead of every question pays for them once with
the prefix cache: later prompts run only the tokens past the shared start. Both engines run
in this process on the same model, alternating request by request, so machine noise hits
both alike. The greedy outputs of the two must be identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

INSTRUCTIONS = (
    "You are the assistant of a travel agency. Answer the customer's question in one short, friendly "
    "sentence. If you do not know the answer, say so and offer to ask a colleague. Never invent prices, "
    "opening hours or visa rules. Prefer public transport in your suggestions, mention accessibility when "
    "it matters, and keep the tone warm but professional. Use the metric system and 24-hour times. "
)
QUESTIONS = [
    "Question: What is the capital of France? Answer:",
    "Question: Which river flows through Vienna? Answer:",
    "Question: Where is the Space Needle? Answer:",
    "Question: What language do people speak in Brazil? Answer:",
    "Question: Which city is home to the Colosseum? Answer:",
    "Question: What is the tallest mountain in Japan? Answer:",
    "Question: How do I get from Paris to Lyon? Answer:",
    "Question: Is the Louvre open on Tuesdays? Answer:",
    "Question: What currency is used in Denmark? Answer:",
    "Question: Which airport serves Lisbon? Answer:",
    "Question: What is a typical dish in Naples? Answer:",
    "Question: Do I need a ferry to visit Capri? Answer:",
]


def first_token_seconds(backend, ids: list[int], tokens: int) -> tuple[float, list[int]]:
    from editserve.server.backends.base import Finished, GenerationParams, Tokens

    started = time.perf_counter()
    first, out = None, []
    for event in backend.submit(ids, GenerationParams(max_new_tokens=tokens, ignore_eos=True)):
        if isinstance(event, Tokens):
            first = first if first is not None else time.perf_counter() - started
            out += event.token_ids
        elif isinstance(event, Finished):
            break
    return first, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=4, help="times the instructions are repeated (prompt length)")
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args()

    import torch

    from editserve.server.backends import hf
    from editserve.server.fresh_thread import in_fresh_thread
    from editserve.server.host import ModelHost
    from editserve.server.models import load_model

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    # one live OpenMP team at a time, as in a server (server/fresh_thread.py): loading in a thread
    # that ends, and each engine's thread released before the other engine runs
    hf.IDLE_RELEASE_SECONDS = 0.05
    model, tokenizer, _ = in_fresh_thread(partial(load_model, args.model))
    host = ModelHost(model, tokenizer, name=args.model, dtype="fp32", device="cpu")
    engines = {"off": in_fresh_thread(partial(hf.HFBackend, host, prefix_cache_bytes=0)),
               "on": in_fresh_thread(partial(hf.HFBackend, host, prefix_cache_bytes=256 << 20))}
    for engine in engines.values():
        engine.start()
    preamble = INSTRUCTIONS * args.repeat
    times: dict[str, list[float]] = {name: [] for name in engines}
    same = total = 0
    try:
        for engine in engines.values():  # warm-up; "on" computes the instructions here once
            first_token_seconds(engine, tokenizer(preamble + "Hello").input_ids, 1)
        for question in QUESTIONS:  # each question once: only the instructions are shared
            ids = tokenizer(preamble + question).input_ids
            outputs = {}
            for name, engine in engines.items():
                time.sleep(0.2)  # the other engine's thread (and team) has ended
                seconds, outputs[name] = first_token_seconds(engine, ids, args.tokens)
                times[name].append(seconds)
            same += outputs["on"] == outputs["off"]
            total += 1
    finally:
        for engine in engines.values():
            engine.stop()
    prompt = len(tokenizer(preamble + QUESTIONS[0]).input_ids)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"{time.strftime('%Y-%m-%d')}, model {args.model}, fp32, {args.threads} threads, prompts of ~{prompt} tokens "
          f"(shared instructions + a question), {total} requests per engine, medians")
    print("| prefix cache | time to first token | ratio |")
    print("|---|---:|---:|")
    print(f"| off | {off * 1000:.0f} ms | 1.00x |")
    print(f"| on | {on * 1000:.0f} ms | {off / on:.2f}x |")
    print(f"greedy outputs identical: {same}/{total}")


if __name__ == "__main__":
    main()
