"""Trace over gRPC on a tiny model: shapes, reproducibility, bad input, and no side effects."""

from __future__ import annotations

import grpc
import pytest

from editserve.client import InvalidArgument
from tests.server_process import start_server

pytestmark = pytest.mark.e2e

PROMPT = "The Space Needle is located in the city of"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trace")
    proc = start_server(str(tiny_model_dir), root / "state", root / "logs", timeout=120)
    yield proc
    proc.stop()


def test_trace_grids_are_complete_and_reproducible(server):
    with server.client() as client:
        before = client.generate(PROMPT, max_new_tokens=5, ignore_eos=True)
        first = client.trace(PROMPT, "Space Needle", samples=3, window=2, seed=5)
        second = client.trace(PROMPT, "Space Needle", samples=3, window=2, seed=5)
        after = client.generate(PROMPT, max_new_tokens=5, ignore_eos=True)
    assert first.grids == second.grids  # same seed, same noise, same numbers
    assert set(first.grids) == {"hidden", "mlp", "attn"}
    for grid in first.grids.values():
        assert len(grid) == len(first.tokens) and all(len(row) == 4 for row in grid)
        assert all(0.0 <= p <= 1.0 for row in grid for p in row)
    assert 0 <= first.subject_start < first.subject_end <= len(first.tokens)
    assert "Space" in "".join(first.tokens[first.subject_start:first.subject_end])
    assert first.samples == 3 and first.window == 2 and first.noise_scale > 0
    # the trace's hooks never touched generation, before or after
    assert before.text == after.text and before.revision == after.revision == first.revision


def test_trace_kinds_and_answer(server):
    with server.client() as client:
        only_mlp = client.trace(PROMPT, "Space Needle", samples=2, kinds=["mlp"], answer="Seattle")
    assert set(only_mlp.grids) == {"mlp"} and "Seattle".startswith(only_mlp.answer.strip()[:3])


@pytest.mark.parametrize(
    "prompt, subject, options, message",
    [
        (PROMPT, "Eiffel Tower", {}, "subject"),
        ("", "x", {}, "prompt"),
        ("word " * 80, "word", {}, "64"),
        (PROMPT, "Space Needle", {"samples": 1000}, "samples"),
        (PROMPT, "Space Needle", {"window": 99}, "window"),
    ],
)
def test_bad_trace_requests(server, prompt, subject, options, message):
    with server.client() as client, pytest.raises(InvalidArgument, match=message):
        client.trace(prompt, subject, **options)


def test_trace_in_bf16_says_so_and_stays_close_to_exact(server):
    with server.client() as client:
        before = client.generate(PROMPT, max_new_tokens=5, ignore_eos=True)
        exact = client.trace(PROMPT, "Space Needle", samples=2, window=2, seed=3)
        fast = client.trace(PROMPT, "Space Needle", samples=2, window=2, seed=3, precision="bf16")
        after = client.generate(PROMPT, max_new_tokens=5, ignore_eos=True)
    assert exact.precision == "model" and fast.precision == "bf16"
    assert fast.tokens == exact.tokens and set(fast.grids) == set(exact.grids)
    assert abs(fast.clean_prob - exact.clean_prob) <= 0.02 * exact.clean_prob
    for kind, grid in fast.grids.items():
        assert len(grid) == len(exact.grids[kind])
        assert all(abs(a - b) <= 0.02 * b for row, ref in zip(grid, exact.grids[kind], strict=True)
                   for a, b in zip(row, ref, strict=True))
    assert before.text == after.text  # the bf16 copy never touched the served weights


@pytest.mark.parametrize("precision", [3, 99, 2**31 - 1, -1])
def test_a_precision_outside_the_enum_is_invalid_argument(server, precision):
    """A raw request (no client-side check) with an enum number the server does not know."""
    from editserve.client._pb import editing_pb2, editing_pb2_grpc

    request = editing_pb2.TraceRequest(prompt=PROMPT, subject="Space Needle", samples=1, window=1)
    request.precision = precision  # open enum: any int32 travels
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as error:
        editing_pb2_grpc.EditingStub(channel).Trace(request, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "precision" in error.value.details()


def test_the_client_refuses_an_unknown_precision():
    from editserve.client import convert

    with pytest.raises(ValueError, match="precision"):
        convert.trace_request(PROMPT, "Space Needle", precision="fp8")
