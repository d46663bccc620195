"""Causal tracing speed on real facts: today's tracer against an earlier revision's, one run.

    flock /tmp/editserve-heavy.lock .venv/bin/python bench/trace_speed.py --baseline 3a7b144

Takes the first ``--facts`` facts of ROME's known_1000 that the model answers (the first token
of the attribute is its greedy next token) and traces each, with the attribute as the answer,
all three kinds, ``--samples`` samples, window 10, the same noise for every tracer:

- ``baseline``: ``editing/tracing.py`` as it was at the git revision ``--baseline`` (loaded
  from git into this process, so both run on the same machine in the same sitting);
- ``model``: today's tracer, exact (the model's dtype);
- ``bf16``: today's tracer with ``precision="bf16"``.

The three runs of one fact follow each other, so a slow spell of the machine hits all three.
Printed per fact: the wall times, how much work the trace is (see ``work_units``) and the
seconds per unit of work (flat across prompt lengths when the cost grows like the work), then
the medians and their ratios, and how far the grids are from the baseline's (Pearson r per
grid over the rows from the subject on, and the largest absolute difference in probability).
Nothing else may run on the machine meanwhile (hence the lock); the CPU seconds other
processes used during each fact are printed, so a disturbed timing is visible.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.trace_bench import _Timer  # noqa: E402  (the path above makes bench importable)

DATA = ROOT.parent / "shared" / "data" / "causal_tracing" / "known_1000.json"


def load_baseline(revision: str, workdir: Path) -> ModuleType:
    """``editing/tracing.py`` at ``revision`` as a module of the installed package (its relative
    imports resolve to today's adapter, errors and hooks, which the tracer only calls)."""
    source = subprocess.run(
        ["git", "show", f"{revision}:editing/tracing.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = workdir / "tracing_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("editserve.editing._tracing_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def work_units(n_tokens: int, subject_start: int) -> int:
    """Restored positions: sum over the traced tokens t (from the subject on) of the positions
    t..T-1 a restoration there recomputes. The exact method's arithmetic is this times a
    constant of the model, window and samples (every restoration runs the layers above it at
    those positions), so it grows with the square of (tokens - subject start), not with the
    prompt length alone: a 6-token prompt whose subject starts at token 3 is 6 units, a
    19-token one whose subject starts at token 0 is 190."""
    return sum(n_tokens - t for t in range(subject_start, n_tokens))


def pick_facts(model, tokenizer, adapter, count: int, prepare_inputs, kinds) -> list[dict]:
    """The first ``count`` known_1000 facts the model answers (as bench/trace_report.py)."""
    import torch

    from editserve.editing.errors import InvalidRequest

    out = []
    for record in json.loads(DATA.read_text()):
        if len(out) == count:
            break
        try:
            inputs = prepare_inputs(
                tokenizer, adapter, record["prompt"], record["subject"], answer=record["attribute"],
                samples=1, window=1, kinds=kinds, noise_scale=1.0, max_prompt_tokens=64,
            )
        except InvalidRequest:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([inputs.token_ids]), logits_to_keep=1).logits[0, -1]
        if int(logits.argmax()) == inputs.answer_token_ids[0]:
            out.append(record | {"n_tokens": len(inputs.token_ids), "subject_start": inputs.subject_range[0]})
    return out


def agreement(ours, reference) -> tuple[float, float]:
    """(mean over kinds of Pearson r, max |difference|) between two traces' grids, on the rows
    from the subject on (the rows before it equal the corrupted probability in both)."""
    import numpy as np

    start = reference.subject_range[0]
    rs, worst = [], 0.0
    for kind in reference.grids:
        a, b = ours.grids[kind][start:].ravel(), reference.grids[kind][start:].ravel()
        rs.append(float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan"))
        worst = max(worst, float(np.abs(a - b).max()))
    return statistics.fmean(rs), worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--baseline", default="3a7b144", help="git revision of the tracer to compare with")
    parser.add_argument("--facts", type=int, default=10)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="baseline,model,bf16", help="which tracers, comma-separated")
    parser.add_argument("--max-work", type=int, default=0,
                        help="skip facts with more work units than this (0: none; for quick checks)")
    parser.add_argument("--out", help="write the per-fact numbers to this JSON file")
    args = parser.parse_args()

    import torch

    from editserve.editing import tracing
    from editserve.editing.adapter import ArchitectureAdapter
    from editserve.server.models import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model(args.model)
    adapter = ArchitectureAdapter.from_model(model)
    noise = tracing.embedding_noise_scale(model, adapter)
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as workdir:
        baseline = load_baseline(args.baseline, Path(workdir)) if "baseline" in modes else None
    facts = pick_facts(model, tokenizer, adapter, args.facts, tracing.prepare_inputs, tracing.KINDS)
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}, model {args.model} ({adapter.num_layers} layers), {args.threads} threads, "
        f"{len(facts)} facts, {args.samples} samples, window {args.window}, baseline {args.baseline}"
    )
    compared = modes[1:]  # each against the first mode's grids
    print("| known_id | tokens | subject start | work | " + " | ".join(f"{m} s" for m in modes)
          + " | " + " | ".join(f"{m} s/work" for m in modes) + " | others CPU-s | "
          + " | ".join(f"{m}: mean r, max abs diff" for m in compared) + " |")
    print("|---" * (5 + 2 * len(modes) + len(compared)) + "|")
    rows = []
    for fact in facts:
        if args.max_work and work_units(fact["n_tokens"], fact["subject_start"]) > args.max_work:
            print(f"| {fact['known_id']} | skipped: more than {args.max_work} units of work |")
            continue
        kwargs = dict(answer=fact["attribute"], samples=args.samples, window=args.window, noise_scale=noise, seed=0)
        seconds, results, others = {}, {}, 0.0
        for mode in modes:
            trace = baseline.causal_trace if mode == "baseline" else tracing.causal_trace
            extra = {} if mode == "baseline" else {"precision": mode}
            with _Timer() as timer:
                results[mode] = trace(model, tokenizer, adapter, fact["prompt"], fact["subject"], **kwargs, **extra)
            seconds[mode] = timer.seconds
            others += timer.others
        work = work_units(fact["n_tokens"], fact["subject_start"])
        reference = results[modes[0]]
        row = {
            "known_id": fact["known_id"], "tokens": fact["n_tokens"], "subject_start": fact["subject_start"],
            "work": work, "seconds": seconds, "others_cpu_s": others,
            "agreement": {m: agreement(results[m], reference) for m in modes if results[m] is not reference},
        }
        rows.append(row)
        print(f"| {fact['known_id']} | {fact['n_tokens']} | {fact['subject_start']} | {work} | "
              + " | ".join(f"{seconds[m]:.1f}" for m in modes) + " | "
              + " | ".join(f"{seconds[m] / work:.3f}" for m in modes) + f" | {others:.1f} | "
              + " | ".join("{:.4f}, {:.1e}".format(*row["agreement"][m]) for m in compared) + " |", flush=True)

    medians = {m: statistics.median(r["seconds"][m] for r in rows) for m in modes}
    print("\nmedian seconds per fact: " + ", ".join(f"{m} {medians[m]:.1f}" for m in modes))
    first = modes[0]
    for mode in modes[1:]:
        per_fact = [r["seconds"][first] / r["seconds"][mode] for r in rows]
        print(f"{first} / {mode}: ratio of medians {medians[first] / medians[mode]:.2f}x, "
              f"median of per-fact ratios {statistics.median(per_fact):.2f}x "
              f"(min {min(per_fact):.2f}x, max {max(per_fact):.2f}x)")
    for mode in modes:
        per_work = [r["seconds"][mode] / r["work"] for r in rows]
        print(f"{mode}: seconds per unit of work {min(per_work):.3f} .. {max(per_work):.3f} "
              f"(median {statistics.median(per_work):.3f})")
    for mode in modes:
        pairs = [r["agreement"][mode] for r in rows if mode in r["agreement"]]
        if pairs:
            print(f"{mode} vs {modes[0]}: mean r per trace "
                  f"min {min(p[0] for p in pairs):.4f}, max |difference| {max(p[1] for p in pairs):.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "medians": medians}, indent=1))


if __name__ == "__main__":
    main()
