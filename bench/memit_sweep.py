"""Sweep MEMIT's layer range and lambda (``mom2_update_weight``) on CounterFact, reusing the
optimised targets of every range that ends at the same layer (the costly step).

  .venv/bin/python bench/memit_sweep.py --model smollm2-135m --facts 20 --ranges 3-7,5-7,2-6 --lambdas 1500,5000,15000

Prints one JSON line per (range, lambda) with ES / PS / NS on those facts (under preview) and
drift (KL and top-1 agreement on the shipped probes against the unedited model), the unedited
row first. Results and the chosen defaults: docs/MEMIT.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.memit_bench import _layers, load_setup, quality  # noqa: E402
from bench.rome_quality import DEFAULT_DATA, _value  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--ranges", required=True)
    parser.add_argument("--lambdas", default="15000")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from editserve.editing.hparams import MemitHyperParams
    from editserve.editing.memit import compute_targets, spread

    model, tokenizer, ctx, cases = load_setup(args.model, args.data, args.start, args.facts)
    facts = [c.fact for c in cases]
    overrides = {k: _value(v) for k, _, v in (p.partition("=") for p in args.set)}
    base = MemitHyperParams.load(ctx.adapter.model_type, ctx.adapter.num_layers).with_overrides(**overrides)
    templates = ctx.context_templates(base.context_count, base.context_length)
    ranges = [_layers(r) for r in args.ranges.split(",")]
    ctx.second_moments(sorted({x for r in ranges for x in r}), base.stats_source, base.stats_tokens)
    print(f"# {datetime.datetime.now().isoformat(timespec='minutes')} {args.model} facts {args.start}.."
          f"{args.start + len(facts) - 1} overrides {overrides}")
    from editserve.editing.evaluation.probes import load_probes, next_token_logits

    reference = next_token_logits(model, tokenizer, load_probes())
    print(json.dumps({"unedited": quality(model, tokenizer, cases)}))
    targets: dict[int, tuple[torch.Tensor, float]] = {}
    for layers in ranges:
        if layers[-1] not in targets:
            started = time.perf_counter()
            values = compute_targets(ctx, facts, base.with_overrides(layers=layers), templates)
            targets[layers[-1]] = (values.unedited + values.deltas, time.perf_counter() - started)
        z, seconds = targets[layers[-1]]
        for lam in (float(x) for x in args.lambdas.split(",")):
            hp = base.with_overrides(layers=layers, mom2_update_weight=lam)
            delta, per_layer = spread(ctx, facts, hp, templates, z)
            print(json.dumps({"layers": list(layers), "lambda": lam, "targets_s": round(seconds, 1),
                              "missing_norm": [round(p["missing_norm"], 1) for p in per_layer],
                              **quality(model, tokenizer, cases, delta, reference)}), flush=True)


if __name__ == "__main__":
    main()
