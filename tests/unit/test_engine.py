"""The batching engine against transformers' own generate, plus stops, cancels and limits."""

import time

import pytest
import torch

from editserve.server.backends.base import (
    Failed,
    Finished,
    FinishReason,
    GenerationParams,
    LimitExceeded,
    Tokens,
)
from editserve.server.backends.hf import HFBackend
from editserve.server.host import ModelHost
from tests.tiny import ARCHITECTURES, tiny_model

PROMPTS = [
    "The capital of France is",
    "Apple was founded by Steve Jobs. Microsoft was founded by Bill Gates and the",
    "Hi",
    "The Space Needle is located in the city of Seattle, in Washington. The mother tongue",
]


def _collect(handle):
    tokens, finished = [], None
    for event in handle:
        if isinstance(event, Tokens):
            tokens += event.token_ids
        elif isinstance(event, Finished):
            finished = event
        elif isinstance(event, Failed):
            raise event.error
    return tokens, finished


@pytest.fixture
def engine_factory(tiny_tokenizer):
    started = []

    def make(arch="llama", start=True, **kw):
        model, tok = tiny_model(arch, tokenizer=tiny_tokenizer)
        host = ModelHost(model, tok, name="tiny", dtype="fp32", device="cpu")
        backend = HFBackend(host, **kw)
        if start:
            backend.start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        backend.stop()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_concurrent_batched_greedy_equals_generate(arch, engine_factory):
    backend = engine_factory(arch, max_batch_size=3)  # 4 prompts: one joins a running batch later
    model, tok = backend.host.model, backend.host.tokenizer
    handles = []
    for i, prompt in enumerate(PROMPTS):
        ids = tok(prompt).input_ids
        handles.append((ids, backend.submit(ids, GenerationParams(max_new_tokens=8 + 3 * i, ignore_eos=True))))
    for i, (ids, handle) in enumerate(handles):
        tokens, finished = _collect(handle)
        reference = model.generate(torch.tensor([ids]), max_new_tokens=8 + 3 * i, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert tokens == reference
        assert finished.reason == FinishReason.LENGTH and finished.generated_tokens == len(reference)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_requests_admitted_together_share_one_prefill_and_equal_generate(arch, engine_factory):
    """Short prompts admitted at once are prefilled in one left-padded pass (one model call
    with several rows and more than one position), a long one alone, and every request still
    decodes exactly what transformers' generate makes of its prompt alone, padding
    notwithstanding."""
    from editserve.server.backends.hf import PREFILL_TOGETHER_MAX_TOKENS

    backend = engine_factory(arch, start=False, max_batch_size=5)
    model, tok = backend.host.model, backend.host.tokenizer
    short = [tok(p).input_ids for p in PROMPTS]
    assert len({len(ids) for ids in short}) == len(short)  # every row padded differently
    long = tok(" ".join(PROMPTS * 3)).input_ids  # past the shared pass's bound: prefilled alone
    assert len(long) > PREFILL_TOGETHER_MAX_TOKENS
    prompts = [short[0], long, *short[1:]]
    calls = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: calls.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    handles = [backend.submit(ids, GenerationParams(max_new_tokens=10, ignore_eos=True)) for ids in prompts]
    backend.start()  # all five are pending: the engine admits them together
    results = [_collect(handle)[0] for handle in handles]
    hook.remove()
    prefills = [shape for shape in calls if shape[1] > 1]
    assert prefills == [(1, len(long)), (4, max(len(ids) for ids in short))]
    for ids, tokens in zip(prompts, results, strict=True):
        reference = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, len(ids):].tolist()
        assert tokens == reference


def test_stop_string_is_cut_and_never_streamed(engine_factory):
    backend = engine_factory()
    tok = backend.host.tokenizer
    ids = tok(PROMPTS[0]).input_ids
    full, _ = _collect(backend.submit(ids, GenerationParams(max_new_tokens=20, ignore_eos=True)))
    text = tok.decode(full, skip_special_tokens=True)
    stop = text[5:8]
    assert stop and stop in text
    streamed, finished = "", None
    for event in backend.submit(ids, GenerationParams(max_new_tokens=20, ignore_eos=True, stop=(stop,))):
        if isinstance(event, Tokens):
            streamed += event.text
        elif isinstance(event, Finished):
            streamed += event.text
            finished = event
    assert finished.reason == FinishReason.STOP and finished.stop_reason == stop
    assert streamed == text[: text.find(stop)]


def test_seeded_sampling_is_reproducible(engine_factory):
    backend = engine_factory()
    ids = backend.host.tokenizer(PROMPTS[1]).input_ids
    params = GenerationParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    first, _ = _collect(backend.submit(ids, params))
    second, _ = _collect(backend.submit(ids, params))
    assert first == second


def test_cancel_stops_generation_and_frees_the_slot(engine_factory):
    backend = engine_factory(max_batch_size=1)
    ids = backend.host.tokenizer(PROMPTS[0]).input_ids
    long = backend.submit(ids, GenerationParams(max_new_tokens=200, ignore_eos=True))
    waiting = backend.submit(ids, GenerationParams(max_new_tokens=3, ignore_eos=True))
    for event in long:
        if isinstance(event, Tokens):
            long.cancel()
        if isinstance(event, Finished):
            assert event.reason == FinishReason.CANCELLED
            assert event.generated_tokens < 200
    tokens, finished = _collect(waiting)
    assert finished.reason == FinishReason.LENGTH and len(tokens) == 3
    deadline = time.monotonic() + 5
    while backend.load and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backend.load == 0


def test_limits(engine_factory):
    backend = engine_factory(max_pending=1, max_batch_size=1)
    with pytest.raises(LimitExceeded, match="context"):
        backend.submit([1] * 10, GenerationParams(max_new_tokens=backend.max_positions))
    handles = []
    with pytest.raises(LimitExceeded, match="max_pending_requests") as info:
        for _ in range(10):
            handles.append(backend.submit([1, 2, 3], GenerationParams(max_new_tokens=50, ignore_eos=True)))
    assert info.value.exhausted
    for h in handles:
        h.cancel()


def test_a_failing_request_fails_alone(engine_factory):
    """A request whose sampling breaks (here a NaN temperature, which the servicer refuses
    before it gets this far) fails by itself; the request batched beside it completes."""
    backend = engine_factory(max_batch_size=2)
    tok = backend.host.tokenizer
    ids = tok(PROMPTS[0]).input_ids
    good = backend.submit(ids, GenerationParams(max_new_tokens=12, ignore_eos=True))
    bad = backend.submit(ids, GenerationParams(max_new_tokens=12, ignore_eos=True, temperature=float("nan")))
    with pytest.raises(ValueError, match="not finite"):
        _collect(bad)
    tokens, finished = _collect(good)
    assert finished.reason == FinishReason.LENGTH and len(tokens) == 12


def test_a_batch_that_outgrows_its_kv_slabs_still_equals_generate(engine_factory):
    from editserve.server.backends.hf import SLAB_HEADROOM

    backend = engine_factory("llama", max_batch_size=2)
    model, tok = backend.host.model, backend.host.tokenizer
    n = SLAB_HEADROOM + 40
    handles = [(ids, backend.submit(ids, GenerationParams(max_new_tokens=n, ignore_eos=True)))
               for ids in (tok(PROMPTS[0]).input_ids, tok(PROMPTS[1]).input_ids)]
    for ids, handle in handles:
        tokens, _ = _collect(handle)
        assert tokens == model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                                        pad_token_id=0)[0, len(ids):].tolist()


def test_an_idle_engine_thread_ends_and_the_next_request_starts_another(engine_factory, monkeypatch):
    """An idle engine's thread ends (its OpenMP team with it, server/fresh_thread.py); the next
    request is served by a new one, with the same tokens."""
    from editserve.server.backends import hf

    monkeypatch.setattr(hf, "IDLE_RELEASE_SECONDS", 0.5)
    backend = engine_factory()
    ids = backend.host.tokenizer(PROMPTS[0]).input_ids
    first, _ = _collect(backend.submit(ids, GenerationParams(max_new_tokens=6, ignore_eos=True)))
    thread = backend._thread
    assert thread is not None and thread.name == "editserve-engine"
    thread.join(5)
    assert not thread.is_alive() and backend._thread is None
    again, finished = _collect(backend.submit(ids, GenerationParams(max_new_tokens=6, ignore_eos=True)))
    assert again == first and finished.reason == FinishReason.LENGTH
    assert backend._thread is not thread
