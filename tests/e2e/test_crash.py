"""SIGKILL at random points of edits and reverts (short version of bench/crash_bench.py).

Replaces the old single-kill test, which compared the restarted server with a replay of the
same journal by the same code: here the restarted server's digest is compared with an
event-by-event replay in this process and, where the revision was acknowledged, with the digest
the killed server itself served (tests/proofs/crash.py; docs/RELIABILITY.md, "Crash").
"""

from __future__ import annotations

import pytest

from tests.proofs.crash import CrashCampaign

pytestmark = pytest.mark.e2e

KILL_POINTS = 5


def test_sigkill_at_random_points_loses_and_half_applies_nothing(tiny_model_dir, tmp_path):
    campaign = CrashCampaign(tiny_model_dir, tmp_path, seed=15)
    try:
        results = [campaign.run_round() for _ in range(KILL_POINTS)]
    finally:
        campaign.close()
    for i, result in enumerate(results):
        assert result.violations == [], (i, result)
    assert sum(r.acknowledged for r in results) >= KILL_POINTS  # the kills landed amid real operations
    assert campaign.revision == results[-1].revision > 0
    assert any(r.compared_with_live for r in results)  # at least one restart matched the served digest
