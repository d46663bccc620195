"""Write the committed v2 journal fixture (tests/data/journal_v2/) with the *old* journal code.

Why: the v2 -> v3 migration (idempotency keys, quarantine) must be tested against a file the
v2 code really wrote, not one the new code imitates. This script therefore needs a checkout of
commit 6ac0cd5 (the last commit with journal schema 2), e.g.::

    git worktree add /tmp/v2tree 6ac0cd5
    .venv/bin/python tests/data/make_journal_v2.py /tmp/v2tree tests/data/journal_v2
    git worktree remove /tmp/v2tree

It loads that commit's ``editing/artifacts.py`` and ``server/journal.py`` by path under their
package names and writes three edits: "a" (a weight delta, active), "b" (a runtime layer of
FFN neurons, reverted), "c" (a weight delta, active). The tensors are exact arithmetic (see
``fixture_tensors``), so tests restate them without torch's RNG. The WAL is checkpointed so
``journal.sqlite3`` alone holds everything.
"""

from __future__ import annotations

import importlib.util
import sqlite3
import sys
from pathlib import Path
from types import ModuleType

import torch

FINGERPRINT = "f2f2f2f2f2f2f2f2"  # the model fingerprint stored in the fixture's meta table
DOWN0 = "model.layers.0.mlp.down_proj.weight"
MLP1 = "model.layers.1.mlp"


def fixture_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Edit ``seed``'s tensors: a, c: factors [8,2] x [4,2] of DOWN0; b: 2 neurons of width 4."""
    if seed == 1:
        return {"keys": (torch.arange(8, dtype=torch.float32).reshape(2, 4) - 4) / 8,
                "biases": torch.tensor([0.5, -0.25]),
                "values": (torch.arange(8, dtype=torch.float32).reshape(2, 4) - 2) / 4}
    return {"u": (torch.arange(16, dtype=torch.float32).reshape(8, 2) - 8 + seed) / 8,
            "v": (torch.arange(8, dtype=torch.float32).reshape(4, 2) * (seed + 1) - 3) / 8}


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
    if journal_module.SCHEMA_VERSION != 2:
        raise SystemExit(f"{old_tree} is not the v2 code (commit 6ac0cd5)")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty")
    journal = journal_module.Journal(out, FINGERPRINT)
    for seed, edit_id in enumerate(("a", "b", "c")):
        tensors = fixture_tensors(seed)
        if seed == 1:
            artifact = artifacts.RuntimeLayer("ffn_neurons", tensors, {"module": MLP1, "layer": 1})
            method, layers = "t_patcher", [1]
        else:
            artifact = artifacts.WeightDelta(factors={DOWN0: (tensors["u"], tensors["v"])})
            method, layers = "rome", [0]
        name, sha = journal.write_artifact(edit_id, artifact)
        journal.record_apply(
            edit_id=edit_id, method=method, kind=artifact.kind.value,
            facts=[{"prompt": "{} is located in", "subject": f"S{seed}", "target_new": f"T{seed}"}],
            options={"layer": layers[0]}, layers=layers, parameters=artifact.parameter_names,
            delta_norm=artifact.norm(), compute_seconds=0.5 + seed, description=f"fixture edit {edit_id}",
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
        raise SystemExit("usage: make_journal_v2.py OLD_TREE OUT_DIR")
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
