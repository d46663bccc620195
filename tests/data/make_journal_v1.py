"""Write the committed v1 journal fixture (tests/data/journal_v1/) with the *old* journal code.

Why: the v1 -> v2 migration must be tested against a file the v1 code really wrote, not one
the new code imitates. This script therefore needs a checkout of commit 787b115 (the last
commit with journal schema 1 and header-less artifacts), e.g.::

    git worktree add /tmp/v1tree 787b115
    .venv/bin/python tests/data/make_journal_v1.py /tmp/v1tree tests/data/journal_v1
    git worktree remove /tmp/v1tree

It loads that commit's ``editing/artifacts.py`` and ``server/journal.py`` by path under their
package names (the installed ``editserve`` mapping points at the current tree) and uses them
to write three edits: "a" (active), "b" (reverted), "c" (active). The tensors are exact
arithmetic (no random generator), so tests restate them independently of torch's RNG; see
``fixture_delta``. The WAL is checkpointed so ``journal.sqlite3`` alone holds everything.
"""

from __future__ import annotations

import importlib.util
import sqlite3
import sys
from pathlib import Path
from types import ModuleType

import torch

FINGERPRINT = "f1f1f1f1f1f1f1f1"  # the model fingerprint stored in the fixture's meta table
DOWN0 = "model.layers.0.mlp.down_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"


def fixture_tensors(seed: int) -> dict[str, torch.Tensor]:
    """The tensors of edit number ``seed``: factors [8,2] x [4,2] on layer 0, and for seed 2 a
    dense [8,4] change on layer 1. Values are multiples of 1/8, exact in fp32."""
    out = {
        f"u::{DOWN0}": (torch.arange(16, dtype=torch.float32).reshape(8, 2) - 8 + seed) / 8,
        f"v::{DOWN0}": (torch.arange(8, dtype=torch.float32).reshape(4, 2) * (seed + 1) - 3) / 8,
    }
    if seed == 2:
        out[f"dense::{DOWN1}"] = (torch.arange(32, dtype=torch.float32).reshape(8, 4) - 16) / 8
    return out


def fixture_delta(artifacts: ModuleType, seed: int):
    tensors = fixture_tensors(seed)
    dense = {k.partition("::")[2]: v for k, v in tensors.items() if k.startswith("dense::")}
    return artifacts.WeightDelta(factors={DOWN0: (tensors[f"u::{DOWN0}"], tensors[f"v::{DOWN0}"])}, dense=dense)


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(old_tree: Path, out: Path) -> None:
    import editserve.editing  # noqa: F401  (parent package, so the old module's relative imports resolve)
    import editserve.server  # noqa: F401

    artifacts = _load("editserve.editing.artifacts", old_tree / "editing" / "artifacts.py")
    journal_module = _load("editserve.server.journal", old_tree / "server" / "journal.py")
    if journal_module.SCHEMA_VERSION != 1 or hasattr(artifacts, "save_artifact"):
        raise SystemExit(f"{old_tree} is not the v1 code (commit 787b115)")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty")
    journal = journal_module.Journal(out, FINGERPRINT)
    for seed, edit_id in enumerate(("a", "b", "c")):
        delta = fixture_delta(artifacts, seed)
        name, sha = journal.write_artifact(edit_id, delta)
        journal.record_apply(
            edit_id=edit_id, method="rome",
            facts=[{"prompt": "{} is located in", "subject": f"S{seed}", "target_new": f"T{seed}"}],
            options={"layer": seed}, layers=[0] if seed < 2 else [0, 1], parameters=delta.parameter_names,
            delta_norm=delta.norm(), compute_seconds=0.5 + seed, description=f"fixture edit {edit_id}",
            artifact=name, sha256=sha,
        )
    journal.record_revert("b")
    journal.close()
    db = sqlite3.connect(out / "journal.sqlite3")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()  # the last connection to close deletes the (now empty) -wal and -shm files
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(("-wal", "-shm"))]
    if leftovers:
        raise SystemExit(f"WAL files left behind: {leftovers}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: make_journal_v1.py OLD_TREE OUT_DIR")
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
