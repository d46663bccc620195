"""Causal tracing speed: the product's tracer against the straightforward one, same run.

    flock /tmp/editserve-heavy.lock .venv/bin/python bench/trace_bench.py [--model smollm2-135m] [--threads 2]

Both trace the same prompt with the same noise (all three kinds, 10 samples, window 10); the
grids must agree, then the wall times and their ratio are printed. Nothing else may run on
the machine meanwhile (hence the lock).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "The Space Needle is located in the city of"


def _machine_busy_s() -> float:
    """CPU seconds spent by every process on the machine so far (Linux /proc/stat)."""
    import os

    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class _Timer:
    """Wall time, and the CPU seconds other processes took meanwhile (a timing taken while
    something else runs is not worth reporting)."""

    def __enter__(self):
        import os

        self.wall = time.perf_counter()
        self.machine = _machine_busy_s()
        self.own = sum(os.times()[:2])
        return self

    def __exit__(self, *exc):
        import os

        self.seconds = time.perf_counter() - self.wall
        own = sum(os.times()[:2]) - self.own
        self.others = max(0.0, _machine_busy_s() - self.machine - own)

    def __str__(self) -> str:
        return f"{self.seconds:7.1f} s wall (other processes used {self.others:.1f} CPU-s meanwhile)"


SUBJECT = "The Space Needle"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--skip-naive", action="store_true", help="time the fast tracer only")
    parser.add_argument("--plot", help="also draw the fast trace to this PNG")
    args = parser.parse_args()

    import numpy as np
    import torch

    from bench.trace_naive import causal_trace_naive
    from editserve.editing.adapter import ArchitectureAdapter
    from editserve.editing.tracing import causal_trace, embedding_noise_scale
    from editserve.server.models import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model(args.model, dtype=args.dtype)
    adapter = ArchitectureAdapter.from_model(model)
    noise = embedding_noise_scale(model, adapter)  # cached by the server; not part of either timing
    kwargs = dict(samples=args.samples, window=args.window, noise_scale=noise, seed=0)

    n_tokens = len(tokenizer(PROMPT).input_ids)
    print(
        f"model {args.model} ({adapter.num_layers} layers, {args.dtype}), {args.threads} threads, "
        f"prompt {PROMPT!r} ({n_tokens} tokens), subject {SUBJECT!r}, {args.samples} samples, "
        f"window {args.window}, noise {noise:.4f}"
    )

    with _Timer() as fast_t:
        fast = causal_trace(model, tokenizer, adapter, PROMPT, SUBJECT, **kwargs)
    print(f"answer {fast.answer!r}: clean {fast.clean_prob:.4f}, corrupted {fast.corrupted_prob:.4f}")
    print(f"fast tracer:            {fast_t}")
    for kind in fast.kinds:
        grid = fast.grids[kind]
        t, layer = np.unravel_index(grid.argmax(), grid.shape)
        print(f"  {kind:6s} max {grid.max():.4f} at token {t} ({fast.tokens[t]!r}), layer {layer}")
    if args.plot:
        from editserve.client.trace_plot import plot_trace

        plot_trace(fast.to_dict(), args.plot)
        print(f"picture: {args.plot}")
    if args.skip_naive:
        return

    with _Timer() as naive_t:
        naive = causal_trace_naive(model, tokenizer, adapter, PROMPT, SUBJECT, **kwargs)
    print(f"straightforward tracer: {naive_t}")
    worst = max(float(np.abs(fast.grids[k] - naive.grids[k]).max()) for k in fast.kinds)
    agree = worst <= 1e-4 and abs(fast.clean_prob - naive.clean_prob) <= 1e-5
    print(f"grids agree: {agree} (max |difference| {worst:.2e} in probability)")
    print(f"speed-up: {naive_t.seconds / fast_t.seconds:.1f}x")
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
