"""`editserve eval` on the real default model reproduces the first cases of docs/RESULTS.md.

The unedited probabilities are plain forwards, so they must match the published run closely on
any CPU; the edits' outcomes (ES, PS) are what the published run measured for these cases. The
post-edit probabilities themselves are not compared: early stopping may end the optimisation a
step earlier or later on another CPU's floating point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.real]

DATA = Path(__file__).resolve().parents[1] / "data" / "counterfact_first3.json"
# From smol_cf200.json (docs/RESULTS.md, 2026-11-23): case id -> (P(new), P(true)) before the edit.
PUBLISHED_PRE = {"18": (0.003373264571226267, 0.1497335913248862),
                 "34": (1.641736558743046e-05, 0.0007351640339095916),
                 "46": (1.914249591762213e-05, 0.0001766624543207568)}


def test_eval_reproduces_the_published_rows(tmp_path, editserve_cache):
    out = tmp_path / "cf3.json"
    done = subprocess.run(
        [sys.executable, "-m", "editserve.client.cli", "eval", "--model", "smollm2-135m", "--dataset", str(DATA),
         "--n", "3", "--threads", "2", "--out", str(out),
         "--no-pre-cache"],  # measured here, not read from an earlier run's cache
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "EDITSERVE_CACHE": str(editserve_cache)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Reverts checked (P(new) back to its pre-edit value): 3/3" in done.stdout
    records = {r["case_id"]: r for r in json.loads(out.read_text())["records"]}
    assert set(records) == set(PUBLISHED_PRE)
    for case_id, (p_new, p_true) in PUBLISHED_PRE.items():
        pre = records[case_id]["pre"]
        assert pre["p_new_rewrite"] == pytest.approx(p_new, rel=1e-3)
        assert pre["p_true_rewrite"] == pytest.approx(p_true, rel=1e-3)
        post = records[case_id]["post"]
        assert post["es"] == 1.0 and post["ps"] == 1.0  # as published for these three cases
        assert post["ns"] >= 0.7  # published 0.9 / 1.0 / 0.8
