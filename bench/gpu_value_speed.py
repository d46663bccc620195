"""Batched MEMIT target (value) optimisation against one fact at a time, on a GPU.

    python3 bench/gpu_value_speed.py --model-dir DIR --cases FILE [--facts 16,64] [--single 16]

The issue's goal is ">= 3x the facts per second of one at a time". On the 2-core CPU the step
is compute-bound and batching buys 1.87x (docs/BENCHMARKS.md, MEMIT compute); on a GPU one
fact's step leaves the device mostly idle, which is what batching is for. The lent GPU machine
has no package index and takes at most 64 MiB of files, so the real weights (540 MB) cannot
travel: the model is built from the real model's ``config.json`` with random weights (seed 0)
and the real tokenizer, and early stopping is off, so every fact runs the same fixed number of
steps in both paths and the ratio measures the code on the hardware, not how fast random
weights converge. Same facts (CounterFact), same context templates, same hyperparameters
(SmolLM2's MEMIT defaults: value at the last layer of the range) in both paths.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="config.json and tokenizer files of the real model")
    parser.add_argument("--cases", required=True, help="CounterFact JSON")
    parser.add_argument("--facts", default="16,64", help="batched runs: this many facts each, in one batch")
    parser.add_argument("--single", type=int, default=16, help="facts timed one at a time")
    parser.add_argument("--steps", type=int, default=0, help="override the optimisation steps (0: the default)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from editserve.editing.context import EditingContext
    from editserve.editing.evaluation.datasets import load_cases
    from editserve.editing.hparams import MemitHyperParams
    from editserve.editing.values import compute_value_deltas

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(args.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    ctx = EditingContext(model, tokenizer, cache_dir=Path("/tmp/editserve-gpu-stats"))
    counts = [int(x) for x in args.facts.split(",")]
    cases, _ = load_cases(args.cases, limit=max(counts + [args.single]))
    facts = [c.fact for c in cases]
    overrides = {"early_stop_loss": 0.0, **({"steps": args.steps} if args.steps else {})}
    hp = MemitHyperParams.load(ctx.adapter.model_type, ctx.adapter.num_layers).with_overrides(**overrides)
    hp = hp.for_depth(ctx.adapter.num_layers)
    module = ctx.adapter.layer(max(hp.layers))
    templates = ctx.context_templates(hp.context_count, hp.context_length)
    hidden = ctx.adapter.hidden_size

    def timed(subset, batch: int) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        began = time.perf_counter()
        compute_value_deltas(model, tokenizer, module, hidden, subset, templates, hp, batch_facts=batch)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - began

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"# {name}; {config.model_type} from config, random weights; {len(templates)} context templates; "
          f"{hp.steps} steps per fact (early stop off); value at {module}", flush=True)
    timed(facts[:2], 2)  # warm-up: kernels, allocator
    single = timed(facts[: args.single], 1)
    single_rate = args.single / single
    print(f"one at a time: {args.single} facts in {single:.2f} s = {single_rate:.2f} facts/s", flush=True)
    print("| facts in one batch | seconds | facts/s | batched / one at a time |")
    print("|---|---|---|---|")
    for n in counts:
        seconds = timed(facts[:n], n)
        print(f"| {n} | {seconds:.2f} | {n / seconds:.2f} | **{n / seconds / single_rate:.2f}x** |", flush=True)


if __name__ == "__main__":
    main()
