"""Load on loopback (short version of bench/load_bench.py): 8 concurrent GenerateStream clients
and an edit every 4 s for 15 s on the tiny model; no errors, every stream whole, the server's
resident memory within 5 % of its post-warm-up baseline (docs/RELIABILITY.md, "Load")."""

from __future__ import annotations

import pytest

from tests.proofs.load import run_load

pytestmark = pytest.mark.e2e


def test_streams_and_edits_under_load(tiny_servers):
    server = tiny_servers("--no-prepare-statistics")
    result = run_load(server, streams=8, duration_s=15, max_new_tokens=16, edit_every_s=4, warmup_s=4)
    summary = result.summary()
    print(summary)
    assert result.errors == [], result.errors[:5]
    assert result.requests >= 8 and result.tokens == 16 * result.requests
    assert result.edits >= 3 and result.reverts == result.edits
    assert len(result.gaps) > 100
    assert result.rss_growth < 0.05, summary
    with server.client() as client:
        assert client.list_edits() == []
