"""How far accumulated weight edits have moved each edited matrix: ||sum of deltas|| / ||W||.

Reads a sequential eval run's state directory (journal + artifacts; read-only) and composes
the deltas of the edits that were active when its last edit was applied (a finished run has
reverted them since; their artifacts stay), printing the ratio per edited parameter after the
given numbers of edits. Lifelong editing papers (ENCORE, Gupta et al. 2025) tie sequential
MEMIT's collapse to this norm growing edit after edit; docs/LIFELONG.md has what it shows here.

    .venv/bin/python bench/edit_norms.py --state-dir ~/runs/memit_keys1000_state --marks 10,100,500,1000
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def alive_artifacts(state_dir: Path) -> list[Path]:
    """Artifacts of the edits active right after the run's last edit, in journal order."""
    db = sqlite3.connect(f"file:{state_dir / 'journal.sqlite3'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT artifact, applied_revision, reverted_revision FROM edits "
                          "ORDER BY applied_revision").fetchall()
    finally:
        db.close()
    last = max(applied for _name, applied, _reverted in rows)
    return [state_dir / "artifacts" / name for name, _applied, reverted in rows if not reverted or reverted > last]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--marks", default="10,100,500,1000")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from editserve.editing.artifacts import WeightDelta, load_artifact
    from editserve.server.models import default_cache_dir, load_model

    model, _tokenizer, _ = load_model(args.model, cache_dir=default_cache_dir())
    paths = alive_artifacts(args.state_dir)
    marks = {int(m) for m in args.marks.split(",")} | {len(paths)}
    total: dict[str, torch.Tensor] = {}
    print(f"{len(paths)} edits in {args.state_dir}; ||accumulated delta|| / ||W|| per edited parameter")
    for count, path in enumerate(paths, 1):
        artifact = load_artifact(path)
        if isinstance(artifact, WeightDelta):
            for name in artifact.parameter_names:
                total[name] = total.get(name, 0) + artifact.delta(name)
        if count in marks:
            cells = [f"{name.rsplit('.', 3)[0].split('.')[-1]}:{float(total[name].norm() / model.get_parameter(name).norm()):.3f}"
                     for name in sorted(total, key=lambda n: [int(x) if x.isdigit() else x for x in n.split(".")])]
            print(f"after {count:5d} edits  layer:ratio  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
