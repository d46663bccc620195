"""The engine's fast decode paths on the real model: what they may change, bounded."""

from __future__ import annotations

import pytest
import torch

from editserve.server.backends.base import Finished, GenerationParams, Tokens
from editserve.server.backends.blocked_linear import use_plain_linear
from editserve.server.backends.hf import HFBackend
from editserve.server.host import ModelHost
from editserve.server.models import load_model

pytestmark = pytest.mark.real

PROMPTS = ["The capital of France is", "Michael Jordan is a professional", "The mother tongue of Danielle Darrieux is",
           "Apple was founded by", "The Eiffel Tower is located in the city of", "Toyota's headquarters are in"]
TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
        "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally "
        "nicknamed the Iron Lady, it was constructed as the centrepiece of the 1889 World's Fair, and to crown the "
        "centennial anniversary of the French Revolution. Although initially criticised by some of France's "
        "leading artists and intellectuals for its design, it has since become a global cultural icon of France.")


def _engine_tokens(backend: HFBackend, ids: list[int], n: int) -> list[int]:
    out = []
    for event in backend.submit(ids, GenerationParams(max_new_tokens=n, ignore_eos=True)):
        if isinstance(event, Tokens):
            out += event.token_ids
        elif isinstance(event, Finished):
            return out
    raise AssertionError("no Finished event")


@pytest.mark.parametrize("products", ["blocked", "plain"])
def test_lean_steps_and_either_product_decode_the_same_greedy_tokens_as_plain_generate(products, editserve_cache):
    model, tokenizer, _ = load_model("smollm2-135m", cache_dir=editserve_cache)
    backend = HFBackend(ModelHost(model, tokenizer, name="smollm2-135m", dtype="fp32", device="cpu"), max_batch_size=8,
                        products=products)
    assert backend.lean is not None  # SmolLM2 is of the Llama layout: every decode step is a lean one
    backend.start()
    try:
        handles = [(tokenizer(p).input_ids, None) for p in PROMPTS]
        engine = [_engine_tokens(backend, ids, 16) for ids, _ in handles]
    finally:
        backend.stop()
    use_plain_linear(model)
    for (ids, _), tokens in zip(handles, engine, strict=True):
        plain = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(ids):].tolist()
        assert tokens == plain


def test_bf16_next_token_agrees_with_fp32_on_nearly_every_position(editserve_cache):
    """bf16 rounds the weights, so greedy text may part from fp32's after some tokens (the
    decode benchmark reports where); what it must keep is the model: teacher-forced over a
    real paragraph, the top next token of bf16 equals fp32's at >= 95 % of positions."""
    fp32, tokenizer, _ = load_model("smollm2-135m", cache_dir=editserve_cache)
    bf16, _, _ = load_model("smollm2-135m", dtype="bf16", cache_dir=editserve_cache)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        top32 = fp32(input_ids=ids).logits[0].argmax(-1)
        top16 = bf16(input_ids=ids).logits[0].float().argmax(-1)
    agreement = (top32 == top16).float().mean().item()
    assert agreement >= 0.95, agreement


def test_opted_in_bf16_products_keep_the_top_token_along_fp32s_greedy_path(editserve_cache):
    """``decode_bf16_min_rows``'s stated tolerance on the real model: a batch of six decoded for
    24 steps along fp32's own greedy tokens (teacher-forced, so one early difference does not
    change every later input); with the products rounded to bf16 the top token equals fp32's at
    >= 93 % of the steps and the logits stay within 5 % of their range."""
    from editserve.server.backends.bf16_products import DecodeScope, available
    from editserve.server.backends.lean_decode import lean_decoder_for
    from editserve.server.backends.product_choice import choose_products
    from tests.unit.test_lean_decode import _batch

    if not available():
        pytest.skip("torch built without oneDNN's packed linear")
    model, tokenizer, _ = load_model("smollm2-135m", cache_dir=editserve_cache)
    scope = DecodeScope()
    choose_products(model, "plain", bf16_min_rows=2, scope=scope)
    lean, why = lean_decoder_for(model)
    assert lean is not None, why
    runs = {}
    reference: list[list[int]] = []
    for active in (False, True):
        cache, width, mask, lengths, tokens = _batch(model, tokenizer, PROMPTS)
        seen = []
        with torch.no_grad():
            for step in range(24):
                mask = torch.cat([mask, torch.ones((len(PROMPTS), 1), dtype=mask.dtype)], 1)
                scope.active = active
                try:
                    logits = lean.step(torch.tensor([[t] for t in tokens]), torch.tensor([[n] for n in lengths]),
                                       cache.layers, mask)
                finally:
                    scope.active = False
                seen.append(logits)
                if not active:
                    reference.append(logits.argmax(-1).tolist())
                tokens = reference[step]  # both runs follow fp32's greedy path
                lengths = [n + 1 for n in lengths]
        runs[active] = torch.stack(seen)  # [steps, rows, vocab]
    exact, reduced = runs[False], runs[True]
    assert not torch.equal(exact, reduced)  # the bf16 path did run
    agreement = (exact.argmax(-1) == reduced.argmax(-1)).float().mean().item()
    assert agreement >= 0.93, agreement  # on an AMX Xeon (2026-12-03): 96.5 % per module, 97.9 % fused
    spread = (exact.amax(-1) - exact.amin(-1)).mean().item()
    assert (exact - reduced).abs().max().item() < 0.05 * spread
