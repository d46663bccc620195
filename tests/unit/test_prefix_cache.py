"""Prompt KV reuse across requests: same tokens as a full prefill, never across an edit."""

import pytest
import torch

from editserve.editing.artifacts import WeightDelta
from editserve.server.backends.base import Failed, Finished, GenerationParams, Tokens
from editserve.server.backends.hf import EngineObserver, HFBackend
from editserve.server.host import ModelHost
from editserve.server.prefix_cache import MIN_REUSE_TOKENS, PrefixCache
from tests.tiny import ARCHITECTURES, tiny_model

PREAMBLE = ("You are a careful assistant. Answer with one short sentence, and say so when you do not "
            "know. Facts about places and people follow.")
QUESTIONS = [" The capital of France is", " The Space Needle is in the city of", " Danielle Darrieux spoke"]


class _Prefills(EngineObserver):
    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def on_prefill(self, prompt_tokens: int, reused_tokens: int) -> None:
        self.seen.append((prompt_tokens, reused_tokens))


def _tokens(handle) -> list[int]:
    out = []
    for event in handle:
        if isinstance(event, Tokens):
            out += event.token_ids
        elif isinstance(event, Failed):
            raise event.error
        elif isinstance(event, Finished):
            return out
    raise AssertionError("no Finished event")


def _reference(model, ids, n):
    return model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(ids):].tolist()


@pytest.fixture
def engine(tiny_tokenizer):
    made = []

    def make(arch="llama", capacity=64 << 20, start=True):
        model, tok = tiny_model(arch, tokenizer=tiny_tokenizer)
        observer = _Prefills()
        backend = HFBackend(ModelHost(model, tok, name="tiny", dtype="fp32", device="cpu"), observer=observer,
                            prefix_cache_bytes=capacity)
        if start:
            backend.start()
        made.append(backend)
        return backend, observer

    yield make
    for backend in made:
        backend.stop()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_shared_preamble_is_computed_once_and_outputs_equal_a_full_prefill(arch, engine):
    backend, observer = engine(arch)
    model, tok = backend.host.model, backend.host.tokenizer
    preamble = len(tok(PREAMBLE).input_ids)
    for question in QUESTIONS:
        ids = tok(PREAMBLE + question).input_ids
        assert _tokens(backend.submit(ids, GenerationParams(max_new_tokens=10, ignore_eos=True))) \
            == _reference(model, ids, 10)
    assert observer.seen[0][1] == 0
    for prompt_tokens, reused in observer.seen[1:]:
        # the preamble (give or take the token where it meets the question) comes from the cache
        assert preamble - 2 <= reused < prompt_tokens
    # the same prompt again reuses all but its last token
    ids = tok(PREAMBLE + QUESTIONS[0]).input_ids
    assert _tokens(backend.submit(ids, GenerationParams(max_new_tokens=10, ignore_eos=True))) \
        == _reference(model, ids, 10)
    assert observer.seen[-1] == (len(ids), len(ids) - 1)


def test_prompts_prefilled_together_are_cached_whole_for_later_requests(engine):
    """Two short prompts admitted at once share one padded prefill; each is stored in the
    cache as its own unpadded keys (a copy, not a slice of the shared pass), so a later prompt
    that extends one of them reuses all of it and still decodes what generate does."""
    backend, observer = engine(start=False)  # both submitted before the engine admits any
    model, tok = backend.host.model, backend.host.tokenizer
    short = [tok(q.strip()).input_ids for q in QUESTIONS[1:]]
    assert len(short[0]) != len(short[1]) and MIN_REUSE_TOKENS <= min(map(len, short)) <= max(map(len, short)) <= 64
    handles = [backend.submit(ids, GenerationParams(max_new_tokens=6, ignore_eos=True)) for ids in short]
    backend.start()
    assert [_tokens(h) for h in handles] == [_reference(model, ids, 6) for ids in short]
    assert observer.seen == [(len(short[0]), 0), (len(short[1]), 0)]
    stored = [entry.kv for entry in backend.prefix_cache._entries.values()]
    assert len(stored) == 2
    for kv, ids in zip(stored, short, strict=True):
        keys, _values = kv[0]
        assert keys.shape[0] == 1 and keys.shape[2] == len(ids) and keys.is_contiguous()
    longer = tok(QUESTIONS[2].strip() + " French, and her city was").input_ids
    assert longer[: len(short[1])] == short[1]
    assert _tokens(backend.submit(longer, GenerationParams(max_new_tokens=6, ignore_eos=True))) \
        == _reference(model, longer, 6)
    assert observer.seen[-1] == (len(longer), len(short[1]))


def test_an_edit_empties_the_cache_and_later_prompts_see_the_new_weights(engine):
    backend, observer = engine()
    host, tok = backend.host, backend.host.tokenizer
    ids = tok(PREAMBLE + QUESTIONS[0]).input_ids
    before = _tokens(backend.submit(ids, GenerationParams(max_new_tokens=10, ignore_eos=True)))
    name = host.adapter.mlp_out_weight_name(1)
    weight = host.model.get_parameter(name)
    g = torch.Generator().manual_seed(0)
    delta = WeightDelta(factors={name: (torch.randn(weight.shape[0], 1, generator=g) * 3,
                                        torch.randn(weight.shape[1], 1, generator=g) * 3)})
    host.apply("e1", delta, revision=1)
    after = _tokens(backend.submit(ids, GenerationParams(max_new_tokens=10, ignore_eos=True)))
    assert observer.seen[-1] == (len(ids), 0)  # nothing reused from revision 0
    assert after == _reference(host.model, ids, 10)
    assert after != before  # the edit changes this output, so stale KV would have shown
    host.revert("e1", revision=2)
    again = _tokens(backend.submit(ids, GenerationParams(max_new_tokens=10, ignore_eos=True)))
    assert observer.seen[-1] == (len(ids), 0)
    assert again == before


def test_capacity_zero_turns_it_off(engine, tiny_tokenizer):
    backend, observer = engine(capacity=0)
    ids = tiny_tokenizer(PREAMBLE + QUESTIONS[0]).input_ids
    for _ in range(2):
        _tokens(backend.submit(ids, GenerationParams(max_new_tokens=2, ignore_eos=True)))
    assert [reused for _, reused in observer.seen] == [0, 0]
    assert len(backend.prefix_cache) == 0


def _kv(length: int, value: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((1, 2, length, 4), value), torch.full((1, 2, length, 4), value)) for _ in range(3)]


def test_lru_eviction_by_bytes_and_longest_prefix_wins():
    per_token = 3 * 2 * (2 * 4 * 4)  # layers x (k, v) x heads*dim*4 bytes
    cache = PrefixCache(capacity_bytes=per_token * 50)
    a = list(range(100, 120))
    b = list(range(100, 110)) + list(range(500, 520))  # shares 10 tokens with a
    cache.store(a, _kv(20, 1.0), revision=0)
    cache.store(b, _kv(30, 2.0), revision=0)
    assert len(cache) == 2 and cache.nbytes == per_token * 50
    hit = cache.lookup(b[:25] + [7], revision=0)
    assert hit.tokens == 25 and float(hit.kv[0][0][0, 0, 0, 0]) == 2.0
    hit = cache.lookup(a + [7], revision=0)
    assert hit.tokens == 20 and hit.kv[0][0].shape[2] == 20
    cache.store(list(range(900, 910)), _kv(10), revision=0)  # over capacity: b is the least recently used
    assert cache.lookup(b + [7], revision=0).tokens == 10  # only a's first ten tokens are left
    # a prompt that extends a stored one replaces it
    cache.store(a + [1, 2, 3], _kv(23), revision=0)
    assert len(cache) == 2
    # too short to be worth it, and another revision, miss
    assert cache.lookup(a[: MIN_REUSE_TOKENS - 1] + [7], revision=0) is None
    assert cache.lookup(a + [7], revision=1) is None and len(cache) == 0
    with pytest.raises(ValueError):
        PrefixCache(-1)
