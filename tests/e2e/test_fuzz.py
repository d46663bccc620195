"""Fuzzing every declared RPC of a live tiny server (short version of bench/fuzz_bench.py).

Hostile requests (tests/proofs/messages.py) go over a real socket one at a time while a valid
GenerateStream runs beside them; the first broken invariant fails the test and Hypothesis
shrinks it to the smallest request that still breaks it. docs/RELIABILITY.md ("Fuzzing")
lists the invariants and the long run's figures.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from tests.proofs.fuzz import (
    BackgroundStream,
    FuzzSession,
    declared_rpcs,
    request_strategy,
    start_fuzz_server,
)

pytestmark = pytest.mark.e2e

EXAMPLES = 300


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir, tmp_path_factory):
    server = start_fuzz_server(str(tiny_model_dir), tmp_path_factory.mktemp("fuzz"))
    yield server
    assert server.stop() == 0, server.log()[-5000:]


def test_every_rpc_is_declared_and_fuzzed():
    """The fuzzer reads the RPC list from the protos: nothing declared can be left out."""
    names = {rpc.name for rpc in declared_rpcs()}
    assert names == {"Generate", "GenerateStream", "GetModelInfo", "Score",
                     "Edit", "Revert", "ListEdits", "GetEdit", "Trace"}


def test_hostile_requests_break_no_invariant(fuzz_server):
    session = FuzzSession(fuzz_server)
    stream = BackgroundStream(fuzz_server.target)
    stream.start()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              print_blob=True)
    @given(request_strategy())
    def check(request):
        rpc, kind, payload, credential = request
        problems = session.run_one(rpc, kind, payload, credential)
        assert not problems, (problems, fuzz_server.log()[-3000:])

    try:
        check()
    finally:
        stream.stop()
        session.close()
    print(session.report())
    assert session.requests >= EXAMPLES
    # every RPC was exercised, and most requests got past authentication to the handlers
    assert {name for name, _ in session.counts} == {rpc.name for rpc in declared_rpcs()}
    assert sum(v for (_, code), v in session.counts.items() if code in ("OK", "INVALID_ARGUMENT")) > EXAMPLES // 3
    assert stream.errors == [], stream.errors[:5]
    assert len(stream.completed) >= 3 and stream.longest_gap() < 30, (len(stream.completed), stream.longest_gap())
    assert fuzz_server.proc.poll() is None
