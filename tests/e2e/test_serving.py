"""End to end: `editserve serve` in a subprocess on a tiny local model directory, real gRPC
over a socket, the real client, and /metrics scraped over HTTP."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from editserve.client import (
    AsyncEditserveClient,
    Fact,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from tests.server_process import start_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    proc = start_server(str(tiny_model_dir), root / "state", root / "logs", "--max-concurrent-requests", "3",
                        timeout=120)
    yield proc
    assert proc.stop() == 0, proc.log()


def test_health_reflection_and_model_info(server):
    with server.client() as client:
        assert client.health() == "SERVING"
        info = client.model_info()
        assert info.model_type == "llama" and info.num_layers == 4 and info.revision == 0
    channel = grpc.insecure_channel(server.target)
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("editserve.v1.Inference", "editserve.v1.Editing"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"editserve.v1.Inference", "editserve.v1.Editing", "grpc.health.v1.Health"} <= services
    channel.close()


def test_generate_and_stream_agree(server):
    with server.client() as client:
        unary = client.generate("The capital of France is", max_new_tokens=12, ignore_eos=True,
                                return_token_ids=True, return_logprobs=True)
        assert unary.finish_reason == "length" and unary.generated_tokens == 12
        assert len(unary.token_ids) == 12 and len(unary.logprobs) == 12 and all(lp <= 0 for lp in unary.logprobs)
        chunks = list(client.stream("The capital of France is", max_new_tokens=12, ignore_eos=True,
                                    return_token_ids=True))
    assert chunks[0].prompt_tokens and chunks[0].prompt_tokens > 0
    assert chunks[-1].finish_reason == "length" and chunks[-1].generated_tokens == 12
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == unary.token_ids


def test_score_matches_generate_logprobs(server):
    with server.client() as client:
        generated = client.generate("The capital of France is", max_new_tokens=5, ignore_eos=True,
                                    return_token_ids=True, return_logprobs=True)
        [score] = client.score([("The capital of France is", generated.text)])
        # greedy tokens are the argmax at every position, and their log-probs agree
        if score.token_ids == generated.token_ids:
            assert score.argmax_ids == generated.token_ids
            assert score.token_logprobs == pytest.approx(generated.logprobs, abs=1e-3)
        assert score.logprob <= 0 and score.revision == 0
        with pytest.raises(InvalidArgument, match="continuation is empty"):
            client.score([("x", " ")])
        with pytest.raises(InvalidArgument, match="limit of 256"):
            client.score([("x", "y")] * 257)


def test_token_id_prompt_and_chat_without_template(server):
    with server.client() as client:
        by_ids = client.generate([5, 6, 7], max_new_tokens=4, ignore_eos=True)
        assert by_ids.prompt_tokens == 3
        with pytest.raises(InvalidArgument, match="chat template"):
            client.generate([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "prompt, options, message",
    [
        ("", {}, "empty"),
        ("hello", {"max_new_tokens": 100_000}, "max_new_tokens_limit"),
        ("hello", {"temperature": -1.0}, "temperature"),
        ("hello", {"top_p": 1.5}, "top_p"),
        ([10**7], {}, "vocabulary"),
        ("word " * 2100, {}, "max_prompt_tokens=2048"),
    ],
)
def test_bad_generate_requests_get_invalid_argument(server, prompt, options, message):
    with server.client() as client, pytest.raises(InvalidArgument, match=message):
        client.generate(prompt, **options)


def test_bad_stream_request_gets_invalid_argument(server):
    with server.client() as client, pytest.raises(InvalidArgument, match="top_p"):
        list(client.stream("hello", top_p=2.0))


@pytest.mark.parametrize("options, message", [
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 1e-40}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": float("nan")}, "top_p"),
    ({"stop": ["x"] * 17}, "at most 16"),
])
def test_hostile_sampling_options_fail_alone(server, options, message):
    """Issue 15's report: a NaN temperature used to answer INTERNAL and fail a concurrent,
    valid request too. Now it is INVALID_ARGUMENT naming the field, and the neighbour runs."""
    with server.client() as client:
        neighbour = client.stream("The capital of France is", max_new_tokens=16, ignore_eos=True)
        with pytest.raises(InvalidArgument, match=message):
            client.generate("hello", max_new_tokens=4, **options)
        chunks = list(neighbour)
        assert chunks[-1].finish_reason == "length" and chunks[-1].generated_tokens == 16


def test_edit_control_plane_errors(server):
    with server.client() as client:
        with pytest.raises(NotFound):
            client.revert("no-such-edit")
        with pytest.raises(NotFound):
            client.get_edit("no-such-edit")
        with pytest.raises(InvalidArgument, match="exactly one"):
            client.edit(Fact("no placeholder", "x", "y"))
        assert client.list_edits() == []


def test_cancel_and_deadline_stop_generation(server):
    with server.client() as client:
        before = server.metric("editserve_requests_total", rpc="GenerateStream", code="CANCELLED")
        stream = client.stream("The capital of France is", max_new_tokens=1000, ignore_eos=True)
        received = 0
        for _chunk in stream:
            received += 1
            if received == 3:
                stream.cancel()
        assert received < 50
        with pytest.raises(Exception) as info:
            client.generate("The capital of France is", max_new_tokens=1000, ignore_eos=True, timeout=0.3)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if (server.metric("editserve_requests_total", rpc="GenerateStream", code="CANCELLED") > before
                    and server.metric("editserve_requests_in_flight", rpc="Generate") == 0):
                break
            time.sleep(0.1)
        assert server.metric("editserve_requests_total", rpc="GenerateStream", code="CANCELLED") > before
        assert server.metric("editserve_requests_in_flight", rpc="Generate") == 0


def test_concurrency_limit_is_resource_exhausted(server):
    with server.client() as client:
        streams = [client.stream("hello", max_new_tokens=500, ignore_eos=True) for _ in range(3)]
        iterators = [iter(s) for s in streams]
        for it in iterators:
            next(it)  # each holds a slot now
        with pytest.raises(ResourceExhausted, match="max_concurrent_requests=3"):
            client.generate("hello", max_new_tokens=2)
        for s in streams:
            s.cancel()


def _generate_at_once(server, clients: int, max_new_tokens: int) -> list:
    """The same greedy prompt from ``clients`` concurrent clients (the engine batches them)."""
    results = []

    def call():
        with server.client() as client:
            results.append(client.generate("Michael Jordan plays", max_new_tokens=max_new_tokens, ignore_eos=True))

    threads = [threading.Thread(target=call) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_clients_are_batched_and_counted(server):
    server.wait_idle()
    before_tokens = server.metric("editserve_generated_tokens_total")
    before_ok = server.metric("editserve_requests_total", rpc="Generate", code="OK")
    results = _generate_at_once(server, 3, max_new_tokens=10)
    assert len(results) == 3 and len({r.text for r in results}) == 1  # greedy: identical answers
    assert server.metric("editserve_generated_tokens_total") - before_tokens == 30
    assert server.metric("editserve_requests_total", rpc="Generate", code="OK") - before_ok == 3
    text = server.metrics()
    assert server.metric("editserve_drift_probes") == 60
    assert server.metric("editserve_drift_top1_agreement") == 1.0  # no edits: nothing drifted
    for name in ("editserve_time_to_first_token_seconds_bucket", "editserve_inter_token_latency_seconds_bucket",
                 "editserve_request_duration_seconds_bucket", "editserve_prompt_tokens_total",
                 "editserve_model_info", "editserve_batch_size_bucket"):
        assert name in text
    # the tiny model has the Llama layout: the server decodes with the lean step
    assert 'decode="lean step, blocked products for rows ' in text


def test_a_shared_prompt_start_is_reused_and_counted(server):
    server.wait_idle()
    preamble = "Answer in one short sentence, and say so when you do not know the answer. Question:"
    with server.client() as client:
        first = client.generate(preamble + " Where is the Eiffel Tower?", max_new_tokens=6, ignore_eos=True)
        hits = server.metric("editserve_prefix_cache_hits_total")
        reused = server.metric("editserve_prefix_cache_reused_tokens_total")
        second = client.generate(preamble + " Where is the Eiffel Tower?", max_new_tokens=6, ignore_eos=True)
        assert second.text == first.text
        assert server.metric("editserve_prefix_cache_hits_total") == hits + 1
        assert server.metric("editserve_prefix_cache_reused_tokens_total") - reused == second.prompt_tokens - 1


def test_async_client(server):
    import asyncio

    async def run():
        async with AsyncEditserveClient(server.target) as client:
            assert await client.health() == "SERVING"
            result = await client.generate("Hi", max_new_tokens=5, ignore_eos=True)
            chunks = [c async for c in client.stream("Hi", max_new_tokens=5, ignore_eos=True)]
            return result, chunks

    result, chunks = asyncio.run(run())
    assert result.generated_tokens == 5
    assert "".join(c.text for c in chunks) == result.text


def test_opted_in_bf16_products_serve_batches_and_say_so(tiny_model_dir, tmp_path):
    """``--decode-bf16-min-rows 2`` (with fixed products, so no timing decides): a batch of
    three concurrent requests decodes through the bf16 path, every request gets its tokens,
    rows of the same prompt agree, and the model info metric names the path."""
    proc = start_server(str(tiny_model_dir), tmp_path / "state", tmp_path / "logs", "--decode-products", "plain",
                        "--decode-bf16-min-rows", "2", timeout=120)
    try:
        results = _generate_at_once(proc, 3, max_new_tokens=40)
        assert len(results) == 3 and all(r.generated_tokens == 40 for r in results)
        assert len({r.text for r in results}) == 1
        assert 'bf16 products for rows 2,3,4,5,6,7,8,9,10,11,12,13,14,15,16"' in proc.metrics()
        # steps of more than one row ran (the only ones bf16 takes)
        assert proc.metric("editserve_batch_size_sum") > proc.metric("editserve_batch_size_count")
    finally:
        proc.stop()
