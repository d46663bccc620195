"""Fuzzing every declared RPC of a live tiny server (short version of bench/fuzz_bench.py).

Hostile requests (tests/proofs/messages.py) go over a real socket one at a time while a valid
GenerateStream runs beside them; the first broken invariant fails the test and Hypothesis
shrinks it to the smallest request that still breaks it. docs/RELIABILITY.md ("Fuzzing")
lists the invariants and the long run's figures.
"""

from __future__ import annotations

import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings

from editserve.client._pb import editing_pb2 as epb
from editserve.client._pb import inference_pb2 as ipb
from tests.proofs.fuzz import (
    BackgroundStream,
    FuzzSession,
    declared_rpcs,
    metadata_for,
    request_strategy,
    start_fuzz_server,
)
from tests.proofs.messages import invalid_utf8

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
                     "Edit", "Revert", "ListEdits", "GetEdit", "Trace", "ExportEdits", "ImportEdits", "Consolidate"}


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


# --- regressions of what the fuzzer found (docs/RELIABILITY.md, "Fuzzing") ---------------

def test_undecodable_bytes_are_invalid_argument_after_auth(fuzz_server):
    """grpcio answered bytes that do not parse with INTERNAL ("Exception deserializing
    request!"); now INVALID_ARGUMENT, and a caller without a credential still hears
    UNAUTHENTICATED first."""
    session = FuzzSession(fuzz_server)
    try:
        for rpc in declared_rpcs():
            bad_utf8 = invalid_utf8(rpc.input)  # None: the message has no string field
            for payload in (b"\x00", b"\x08\x80", *([bad_utf8] if bad_utf8 else [])):  # bad tag, cut varint
                outcome = session.send(rpc, payload, "editor")
                assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (rpc.name, payload, outcome)
                assert "does not parse" in outcome.details
            assert session.send(rpc, b"\x00", "none").code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        session.close()


def test_oversized_score_items_and_facts_are_refused_at_once(fuzz_server):
    """A Score item or a fact of tens of thousands of tokens used to run for minutes (and
    allocate without bound) before answering; now refused before any model work."""
    session = FuzzSession(fuzz_server)
    rpcs = {rpc.name: rpc for rpc in declared_rpcs()}
    long_text = "ab " * 30_000
    fact = epb.Fact(prompt="The capital of {} is", subject="France", target_new="Rome")
    edits = {
        "prompt": epb.Fact(prompt="The capital of {} is" + long_text, subject="France", target_new="Rome"),
        "target_new": epb.Fact(prompt=fact.prompt, subject="France", target_new="Rome" + " x" * 300),
        "paraphrase_prompts": epb.Fact(prompt=fact.prompt, subject="France", target_new="Rome",
                                       paraphrase_prompts=["France's capital is"] * 65),
        "neighborhood_prompts[0]": epb.Fact(prompt=fact.prompt, subject="France", target_new="Rome",
                                            neighborhood_prompts=[long_text]),
    }
    try:
        started = time.monotonic()
        score = ipb.ScoreRequest(items=[ipb.ScoreItem(prompt="The capital of France is", continuation="Paris"),
                                        ipb.ScoreItem(prompt=long_text, continuation="Paris")])
        outcome = session.send(rpcs["Score"], score.SerializeToString(), "editor")
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT and "items[1]" in outcome.details, outcome
        medium = ipb.ScoreRequest(items=[ipb.ScoreItem(prompt="ab " * 1500, continuation="Paris")])
        outcome = session.send(rpcs["Score"], medium.SerializeToString(), "editor")
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT and "tokens" in outcome.details, outcome
        for field, bad in edits.items():
            request = epb.EditRequest(method=epb.EDIT_METHOD_FT_L, facts=[bad], ft=epb.FtOptions(layer=1, steps=2))
            outcome = session.send(rpcs["Edit"], request.SerializeToString(), "editor")
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT and f"facts[0].{field}" in outcome.details, outcome
        request = epb.EditRequest(method=epb.EDIT_METHOD_FT_L, facts=[fact], description="x" * 4097)
        outcome = session.send(rpcs["Edit"], request.SerializeToString(), "editor")
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT and "description" in outcome.details, outcome
        assert time.monotonic() - started < 10
        assert session.inference.GetModelInfo(ipb.GetModelInfoRequest(include_weights_digest=True),
                                              metadata=metadata_for("editor")).weights_digest == session.baseline_digest
    finally:
        session.close()
