"""Consolidation: N accumulated single-fact ROME edits replaced by one joint MEMIT solve.

    .venv/bin/python bench/consolidation_bench.py --model smollm2-135m --n 30 \
        --data ../shared/data/counterfact/counterfact_500_rich.json

In-process, through the server's own edit manager and journal (server/eval_target.py): the
first N CounterFact cases are edited one after the other with ROME (shipped defaults), then
consolidated with MEMIT (shipped defaults) in one revision. ES / PS / NS (teacher-forced,
CounterFact definitions, docs/METRICS.md) over the N cases and drift (mean KL and top-1
agreement on the drift probes against the unedited model) are measured on the unedited model,
after the N edits, and after the consolidation; then the consolidation is reverted and the
weights digest must equal the one before it (checked). The baseline of every ratio is the
state after the N sequential edits, measured in the same run.

``--from-state DIR`` takes the N edits from a finished ``editserve eval --sequential
--state-dir DIR`` run instead of computing them: the edits that were active when its last edit
was applied (a run reverts them when it ends; their artifacts stay), moved in by a bundle, as
one server hands edits to another. So a 1,000-edit run's state is consolidated without
recomputing its 1,000 edits (``--data`` must name the run's dataset; the facts are checked).

    .venv/bin/python bench/consolidation_bench.py --n 1000 --from-state ~/runs/memit_keys1000_state \
        --data ../shared/data/counterfact/counterfact_rich_union.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(target, cases) -> dict:
    """Mean ES, PS, NS (percent) over the cases, teacher-forced (CounterFact definitions)."""
    from editserve.editing.evaluation.metrics import rome_case_metrics

    records = []
    for case in cases:
        fact = case.fact
        groups = [[fact.text], list(case.paraphrase_prompts), list(case.neighborhood_prompts)]
        pairs = [(p, t) for group in groups for p in group for t in (fact.target_new, fact.target_true)]
        scores = [s.mean_probability for s in target.score(pairs)]
        probs = [(scores[i], scores[i + 1]) for i in range(0, len(scores), 2)]
        n_para = len(groups[1])
        records.append(rome_case_metrics(probs[0], probs[1:1 + n_para], probs[1 + n_para:]))
    return {key: 100 * statistics.fmean(r[key] for r in records if r.get(key) is not None)
            for key in ("es", "ps", "ns")}


def run_bundle(state_dir: Path, target, cases) -> bytes:
    """A bundle of the edits a finished sequential run held after its last edit: those applied
    and not reverted before that moment (a resumed run's recomputed edit replaces the one it
    reverted), the first ``len(cases)`` of them, checked against ``cases`` fact by fact."""
    from editserve.server.bundle import BundledEdit, write_bundle
    from editserve.server.journal import Journal

    journal = Journal(state_dir, target.host.fingerprint())
    try:
        records = journal.list(include_reverted=True)
        last = max(r.applied_revision for r in records)
        alive = [r for r in records if not r.reverted_revision or r.reverted_revision > last][:len(cases)]
        subjects = [f["subject"] for r in alive for f in r.facts]
        if subjects != [c.fact.subject for c in cases]:
            raise SystemExit(f"{state_dir}: its {len(subjects)} facts are not the first {len(cases)} cases of --data")
        edits = [BundledEdit(r.edit_id, r.method, r.kind, r.facts, r.options, r.layers, r.parameters, r.delta_norm,
                             r.compute_seconds, r.description, r.sha256, journal.artifact_bytes(r)) for r in alive]
    finally:
        journal.close()
    return write_bundle(target.host.name, target.host.fingerprint(), 0, edits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/counterfact/counterfact_500_rich.json")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--from-state", type=Path, default=None,
                        help="take the edits from this finished sequential eval run's state directory")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 beside another run)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from editserve.editing.evaluation.datasets import load_cases
    from editserve.editing.evaluation.metrics import distribution_drift
    from editserve.server.eval_target import InProcessTarget

    cases, _skipped = load_cases(args.data, limit=args.n)
    target = InProcessTarget(args.model, method="rome")
    reference = target.probe_logits()

    def state(label: str) -> dict:
        kl, top1 = distribution_drift(reference, target.probe_logits())
        row = {"state": label, **measure(target, cases), "drift_kl": kl, "drift_top1": 100 * top1}
        print(f"{label:28s} ES {row['es']:5.1f}  PS {row['ps']:5.1f}  NS {row['ns']:5.1f}  "
              f"KL {kl:.4f}  top-1 {100 * top1:5.1f}", flush=True)
        return row

    rows = [state("unedited")]
    started = time.perf_counter()
    if args.from_state:
        moved = target.manager.import_bundle(run_bundle(args.from_state, target, cases))
        label = f"after {len(moved.edits)} edits of {args.from_state.name}"
    else:
        for case in cases:
            target.edit([case.fact])
        label = f"after {len(cases)} ROME edits"
    sequential_s = time.perf_counter() - started
    rows.append(state(label))
    before = target.host.weights_digest()
    outcome = target.manager.consolidate([], {})
    rows.append(state("after consolidation"))
    target.manager.revert(outcome.edit_id)
    exact = target.host.weights_digest() == before
    how = "moving them in" if args.from_state else "sequential edits"
    print(f"{how} {sequential_s:.0f} s ({sequential_s / len(cases):.1f} s each); consolidation "
          f"{outcome.compute_seconds:.0f} s; revert of the consolidation bit-exact: {exact}")
    after, base = rows[2], rows[1]
    ratios = {f"{k}_after_over_before": after[k] / base[k] if base[k] else None
              for k in ("es", "ps", "ns", "drift_kl", "drift_top1")}
    print("consolidated / sequential:", ", ".join(f"{k.split('_after')[0]} {v:.3f}" for k, v in ratios.items()
                                                   if v is not None))
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "n": len(cases), "rows": rows, "ratios": ratios,
                                        "sequential_seconds": sequential_s,
                                        "consolidation_seconds": outcome.compute_seconds,
                                        "revert_exact": exact, "date": time.strftime("%Y-%m-%d %H:%M")}, indent=1))
    target.close()
    if not exact:
        sys.exit("the consolidation's revert was not bit-exact")


if __name__ == "__main__":
    main()
