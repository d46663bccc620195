"""Decode speed against the machine's memory-bandwidth bound, measured in the same run.

    flock /tmp/editserve-heavy.lock .venv/bin/python bench/decode_bench.py [--model smollm2-135m]

At batch 1 every new token reads every weight once (the tied embedding too, as the output
head), so tokens/s can be at most (read bandwidth) / (bytes of weights). The bandwidth is
measured here, by summing a buffer much larger than the caches with the same threads, so the
bound and the speeds come from one sitting. Rows:

* ``generate``: transformers' ``model.generate`` (greedy, fp32), the baseline;
* ``engine``: editserve's batching engine (``HFBackend``), in-process, for each dtype; batch
  16 submits 16 requests at once. In fp32 five variants run by run in turn: the engine as it
  was before issue 17's decode work (transformers' full forward, blocked products always,
  each prompt prefilled alone),
  full forward or lean step (``server/backends/lean_decode.py``) each with ``F.linear`` and
  with blocked products (``server/backends/blocked_linear.py``), and the engine as served
  now (lean step, products chosen by timing both at start-up,
  ``server/backends/product_choice.py``, whose measurement is printed); a sixth is the opt-in
  ``decode_bf16_min_rows`` (bf16 products against packed copies for the batch sizes where
  they measured faster, ``server/backends/bf16_products.py``), whose greedy tokens are
  compared like the rest.

Tokens/s at batch 1 is the decode rate of one stream (tokens after the first over the time
between first and last); at batch 16 it is all tokens over the wall time, prefill included.
Greedy outputs of each dtype are compared with the fp32 engine's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = [
    "The capital of France is",
    "Michael Jordan is a professional",
    "The mother tongue of Danielle Darrieux is",
    "Apple was founded by",
]


def read_bandwidth(threads: int, megabytes: int = 1024, runs: int = 7) -> float:
    """Bytes per second ``torch.sum`` reads from a buffer far larger than the caches."""
    import torch

    torch.set_num_threads(threads)
    buffer = torch.ones(megabytes << 18)  # float32: 4 bytes each
    buffer.sum()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - started)
    return buffer.nbytes / statistics.median(times)


def weight_bytes(model) -> int:
    """Bytes one batch-1 decode step reads: every parameter once (a tied embedding once, as the
    head reads it whole; an untied input embedding only reads one row, so it is left out)."""
    seen: dict[int, int] = {p.data_ptr(): p.nbytes for p in model.parameters()}
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embedding.data_ptr()
    return sum(seen.values()) - (0 if tied else embedding.nbytes)


def generate_rate(model, tokenizer, batch: int, tokens: int, runs: int) -> float:
    import torch

    ids = tokenizer([PROMPTS[0]] * batch, return_tensors="pt").input_ids
    rates = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        rates.append(batch * (out.shape[1] - ids.shape[1]) / (time.perf_counter() - started))
    return statistics.median(rates[1:])


def engine_run(backend, tokenizer, batch: int, tokens: int,
               prompts: list[str] | None = None) -> tuple[float, list[list[int]]]:
    """(tokens/s, each request's tokens): see the module docstring for what the rate counts.
    ``prompts``: one per request (default: PROMPTS in turn)."""
    from editserve.server.backends.base import Finished, GenerationParams, Tokens

    params = GenerationParams(max_new_tokens=tokens, ignore_eos=True)
    started = time.perf_counter()
    prompts = prompts or [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    handles = [backend.submit(tokenizer(prompt).input_ids, params) for prompt in prompts]
    outputs, stamps = [], []
    for handle in handles:
        ids, times = [], []
        for event in handle:
            if isinstance(event, Tokens):
                ids += event.token_ids
                times.append(time.perf_counter())
            elif isinstance(event, Finished):
                break
        outputs.append(ids)
        stamps.append(times)
    ended = time.perf_counter()
    if batch == 1:
        return (len(stamps[0]) - 1) / (stamps[0][-1] - stamps[0][0]), outputs
    return sum(len(o) for o in outputs) / (ended - started), outputs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--bf16-min-rows", type=int, default=2, help="the opt-in row's decode_bf16_min_rows")
    args = parser.parse_args()

    import torch

    from editserve.server.backends.blocked_linear import ALL_ROWS, use_bf16_products, use_blocked_linear
    from editserve.server.backends.hf import PREFILL_TOGETHER_MAX_TOKENS, HFBackend
    from editserve.server.fresh_thread import in_fresh_thread
    from editserve.server.host import ModelHost
    from editserve.server.models import load_model

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    batches = [int(b) for b in args.batches.split(",")]
    # torch work outside the engine runs in threads that end with it, as in the server: an idle
    # OpenMP team left in this thread would throttle the engine's (server/fresh_thread.py)
    bandwidth = in_fresh_thread(lambda: read_bandwidth(args.threads))
    rows: list[tuple[str, str, int, float, str]] = []
    bounds: dict[str, float] = {}
    reference: dict[int, list[list[int]]] = {}
    baseline: dict[int, float] = {}
    before: dict[int, float] = {}
    choices: list[str] = []
    for dtype in args.dtypes.split(","):
        model, tokenizer, _ = in_fresh_thread(partial(load_model, args.model, dtype=dtype))
        bounds[dtype] = bandwidth / weight_bytes(model)
        if dtype == "fp32":
            for batch in batches:
                baseline[batch] = in_fresh_thread(partial(generate_rate, model, tokenizer, batch, args.tokens,
                                                          args.runs))
                rows.append(("generate", dtype, batch, baseline[batch], ""))
        host = ModelHost(model, tokenizer, name=args.model, dtype=dtype, device="cpu")
        backend = in_fresh_thread(partial(HFBackend, host, max_batch_size=max(batches),  # products "auto"
                                          max_pending=max(batches), bf16_min_rows=args.bf16_min_rows))
        choices.append(f"{dtype}: {backend.products.describe()}")
        lean, served_rows, bf16_rows = backend.lean, backend.products.blocked_rows, backend.products.bf16_rows
        none: frozenset[int] = frozenset()
        # (name, lean step or None, rows taking the blocked product, rows taking bf16 products,
        # shared prefills); the first is the engine as it was before the lean step, the product
        # choice and the shared prefill (2026-11-30), the fifth as served by default now, the
        # last the opt-in bf16 products
        together = PREFILL_TOGETHER_MAX_TOKENS
        variants = [("engine before: full forward, blocked products, prompts prefilled alone", None, ALL_ROWS, none, 0),
                    ("full forward, F.linear", None, none, none, together),
                    ("lean step, F.linear", lean, none, none, together),
                    ("lean step, blocked products", lean, ALL_ROWS, none, together),
                    ("engine as served: lean step, products chosen at start-up", lean, served_rows, none, together),
                    (f"opt-in decode_bf16_min_rows={args.bf16_min_rows}: bf16 products for rows "
                     f"{','.join(map(str, sorted(bf16_rows))) or 'none'}", lean, served_rows, bf16_rows, together)]
        if dtype != "fp32":  # the blocked and bf16 products are fp32 only: no product variants
            variants = [("engine before: full forward, prompts prefilled alone", None, served_rows, none, 0),
                        ("engine as served: lean step", lean, served_rows, none, together)]
        backend.start()
        try:
            engine_run(backend, tokenizer, 1, 4)  # warm-up
            for batch in batches:
                # variants alternate run by run, so a change in machine load hits them alike
                results: dict[str, list[tuple[float, list[list[int]]]]] = {name: [] for name, *_ in variants}
                for _ in range(args.runs):
                    for name, step, blocked_rows, reduced_rows, shared in variants:
                        backend.lean = step  # the engine is idle between runs
                        backend.prefill_together_max_tokens = shared
                        use_blocked_linear(model, blocked_rows)  # no torch work: attributes only
                        use_bf16_products(model, reduced_rows, backend.decode_scope)  # packed copies are kept
                        results[name].append(engine_run(backend, tokenizer, batch, args.tokens))
                for name, runs in results.items():
                    rate = statistics.median(r for r, _ in runs)
                    if dtype == "fp32" and name.startswith("engine before"):
                        before[batch] = rate
                    outputs = runs[0][1]
                    reference.setdefault(batch, outputs)
                    same = sum(a == b for a, b in zip(outputs, reference[batch], strict=True))
                    first = [next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
                             for a, b in zip(outputs, reference[batch], strict=True)]
                    agree = f"{same}/{len(outputs)} identical"
                    if same < len(outputs):
                        agree += f", first difference at token {min(first)}"
                    rows.append((name, dtype, batch, rate, agree))
        finally:
            backend.stop()
        del model, backend, lean, host

    print(f"{time.strftime('%Y-%m-%d %H:%M')}, model {args.model}, {args.threads} torch threads, {args.tokens} new "
          f"tokens, median of {args.runs}; read bandwidth {bandwidth / 1e9:.1f} GB/s")
    for line in choices:
        print(f"  {line}")
    print("| path | dtype | batch | tok/s | / generate fp32 | / engine before (fp32) | / bandwidth bound (batch 1) "
          "| greedy vs engine before (fp32) |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for path, dtype, batch, rate, agree in rows:
        bound = f"{rate / bounds[dtype]:.0%} of {bounds[dtype]:.0f}" if batch == 1 else ""
        ratio = f"{rate / before[batch]:.2f}x" if batch in before else ""
        print(f"| {path} | {dtype} | {batch} | {rate:.1f} | {rate / baseline[batch]:.2f}x | {ratio} | {bound} | {agree} |")


if __name__ == "__main__":
    main()
