"""Calibrate and measure SERAC's scope classifier (editing/memory.py) on held-out edit data.

All N edits of a calibration split are active at once (one memory of N entries, as a server
holding many edits would be). Queries:
- in scope: each edit's paraphrase (CounterFact rephrase / zsRE rephrase): must route to its
  own entry;
- neighbourhood: the split's locality prompt (same relation and object, other subject for
  CounterFact; an unrelated question for zsRE): must route nowhere;
- same subject, other relation: another edit's prompt template filled with this edit's subject
  (CounterFact only): must route nowhere (it is about the subject, not about the edited fact).

For each threshold, with and without the subject gate: recall (in scope routed to the right
entry), false-fire rate of each out-of-scope kind, and precision over all routed queries.

    python bench/serac_scope.py --data ../shared/data [--n 500]
"""

from __future__ import annotations

import argparse
import datetime
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPLITS = {"counterfact-train": "counterfact/counterfact-train.json", "zsre-train": "zsre/zsre_mend_train-1k.json"}
THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)


def queries_of(cases, rng: random.Random) -> list[tuple[str, str, int]]:
    """(text, kind, owner index or -1)."""
    out = []
    for i, case in enumerate(cases):
        for p in case.paraphrase_prompts:
            out.append((p.replace("{}", case.fact.subject), "in_scope", i))
        for p in case.neighborhood_prompts:
            out.append((p, "neighbourhood", -1))
        for probe in case.locality:
            out.append((probe.prompt, "neighbourhood", -1))
        other = cases[rng.randrange(len(cases))]
        if other.fact.prompt != case.fact.prompt and "{}" in other.fact.prompt:
            out.append((other.fact.prompt.replace("{}", case.fact.subject), "same_subject", -1))
    return out


def evaluate(name: str, cases, encoder) -> None:
    from editserve.editing.memory import EditMemory, MemoryEntry

    rng = random.Random(0)
    from editserve.editing.memory import _encode_keys

    keys = [c.fact.text for c in cases]
    started = time.perf_counter()
    embeddings, relations = _encode_keys(encoder, keys, [c.fact.subject for c in cases])
    queries = queries_of(cases, rng)
    encode_s = time.perf_counter() - started
    kinds = sorted({k for _q, k, _o in queries})
    print(f"\n## {name}: {len(cases)} edits active, {len(queries)} queries "
          f"({', '.join(f'{k} {sum(1 for q in queries if q[1] == k)}' for k in kinds)}); encoding {encode_s:.1f} s")
    print("| subject gate | threshold | recall (in scope, right edit) | " + " | ".join(
        f"fires on {k}" for k in kinds if k != "in_scope") + " | precision |")
    print("|---|---|---|" + "---|" * (len(kinds) - 1) + "---|")
    for gate in (True,):
        for threshold in THRESHOLDS:
            entries = [MemoryEntry(str(i), keys[i], c.fact.subject if gate else "", c.fact.target_new, threshold)
                       for i, c in enumerate(cases)]
            memory = EditMemory(entries, embeddings, relations)
            matches = memory.route([q for q, _k, _o in queries], encoder.encode)
            hits = {k: 0 for k in kinds}
            right = wrong = 0
            for (_q, kind, owner), m in zip(queries, matches, strict=True):
                if m is None:
                    continue
                hits[kind] += 1
                if kind == "in_scope" and int(m.entry.edit_id) == owner:
                    right += 1
                else:
                    wrong += 1
            count = {k: sum(1 for q in queries if q[1] == k) for k in kinds}
            precision = right / (right + wrong) if right + wrong else float("nan")
            cells = " | ".join(f"{100 * hits[k] / count[k]:.1f}" for k in kinds if k != "in_scope")
            print(f"| {'yes' if gate else 'no'} | {threshold:.2f} | {100 * right / count['in_scope']:.1f} | {cells} | "
                  f"{100 * precision:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the evaluation data directory (../shared/data)")
    parser.add_argument("--n", type=int, default=500)
    args = parser.parse_args()
    from editserve.editing.evaluation.datasets import load_cases
    from editserve.editing.memory import Encoder

    print(f"# {datetime.datetime.now().isoformat(timespec='minutes')} serac_scope --n {args.n}")
    encoder = Encoder()
    for name, relative in SPLITS.items():
        cases, _skipped = load_cases(Path(args.data) / relative, limit=args.n)
        evaluate(name, cases, encoder)


if __name__ == "__main__":
    main()
