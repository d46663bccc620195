"""The backend comparison of bench/backend_bench.py on one GPU, sized to finish in < 10 minutes.

    .venv-vllm/bin/python bench/vllm_gpu_bench.py            # an environment with editserve[vllm]

Prepared, not yet run: the task that wrote it had no GPU, and the lent GPU image has no vLLM
and no package index. What it measures, per backend (hf, then vllm), on SmolLM2-135M in bf16:
tokens/s and time to first token at 1, 16, 64 and 256 concurrent streams of 128 tokens, and
the token gap a running stream sees while 5 ROME edits are committed and reverted (goal
< 50 ms), next to the server-side pause. Expected wall time: two server starts (vLLM
compiles CUDA graphs unless --eager: ~1-2 min), about 2 x 4 runs of a few seconds, and 10
edit/revert cycles of ~1 s each on a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budget-seconds", type=float, default=540)
    args = parser.parse_args()
    if importlib.util.find_spec("vllm") is None:
        sys.exit("vLLM is not installed here: pip install -e '.[vllm]' first (README: Serving with vLLM)")
    import torch

    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this is the GPU benchmark; on a CPU run bench/backend_bench.py")
    from bench.backend_bench import run_backend

    settings = argparse.Namespace(model=args.model, concurrency=[1, 16, 64, 256], new_tokens=128, edits=5,
                                  threads=4, dtype="bf16", device="cuda", cache_dir="")
    began = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("hf", "vllm"):
            if time.perf_counter() - began > args.budget_seconds / 2 and rows:
                print(f"stopping before {backend}: over half the time budget already", flush=True)
                break
            rows.append(run_backend(backend, settings, Path(tmp)))
    print(f"\nGPU {torch.cuda.get_device_name()}; {args.model} bf16; 128 new tokens per stream, greedy")
    for row in rows:
        cells = ", ".join(f"{n}: {r:.0f} tok/s ttft {1e3 * t:.0f} ms" for n, (r, t) in row.concurrency.items())
        gap = f"{1e3 * max(row.gaps):.0f} ms" if row.gaps else "-"
        print(f"{row.backend}: start {row.start_seconds:.0f} s; {cells}; gap at a commit {gap} "
              f"(steady {1e3 * row.steady_gap:.0f} ms); server pause {1e3 * row.server_pause[0]:.1f} ms")
    print(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
