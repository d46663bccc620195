"""Split a sequential run's final measurement into the cases a later edit contradicts and the rest.

A set that edits one subject twice with different answers (MEND's zsRE split: the same question
in several wordings, each with its own sampled answer) cannot keep both in a sequential run:
the later edit supersedes the earlier. This reads an ``editserve eval --sequential --out FILE``
result and the same cases, and prints the final metrics of the superseded cases and of the
others, so a curve's loss can be told apart from the data's contradictions. No model is loaded.

    EDITSERVE_DATA=../shared/data .venv/bin/python bench/sequential_split.py --out ~/runs/tp_zsre100.json --dataset zsre --n 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METRICS = ("reliability", "es", "ps", "generalization", "locality", "gen_es", "gen_ps")


def superseded(cases) -> set[int]:
    """Indices of cases whose subject a later case edits to a different answer."""
    last: dict[str, str] = {}
    found = set()
    for i in reversed(range(len(cases))):
        subject, answer = cases[i].fact.subject.casefold(), cases[i].fact.target_new.strip().casefold()
        if subject in last and last[subject] != answer:
            found.add(i)
        last.setdefault(subject, answer)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the run's --out file")
    parser.add_argument("--dataset", required=True, help="as given to editserve eval (a name or a .json path)")
    parser.add_argument("--n", type=int, required=True)
    args = parser.parse_args()
    from editserve.client.cli import _dataset_path
    from editserve.editing.evaluation.datasets import load_cases

    cases, _ = load_cases(_dataset_path(args.dataset, os.environ.get("EDITSERVE_DATA")), limit=args.n)
    records = json.loads(args.out.read_text())["records"]
    if [r["case_id"] for r in records] != [c.case_id for c in cases]:
        raise SystemExit("the run's cases are not the first --n cases of --dataset")
    gone = superseded(cases)
    print(f"| cases | n | {' | '.join(METRICS)} |\n|---|---:|" + "---:|" * len(METRICS))
    for label, keep in (("not contradicted by a later edit", lambda i: i not in gone),
                        ("superseded by a later, different answer", lambda i: i in gone)):
        rows = [r["post"] for i, r in enumerate(records) if keep(i)]
        cells = []
        for key in METRICS:
            values = [row[key] for row in rows if row.get(key) is not None]
            cells.append(f"{100 * sum(values) / len(values):.1f}" if values else "-")
        print(f"| {label} | {len(rows)} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
