"""The lean decode step computes the full forward's logits, runs the hooks it must, and steps
aside when a hook sits where it does not look."""

import pytest
import torch
from transformers import DynamicCache

from editserve.server.backends.kv_slab import left_padded_slab_cache
from editserve.server.backends.lean_decode import lean_decoder_for
from tests.tiny import tiny_model

PROMPTS = ["The capital of France is", "Apple was founded by Steve Jobs and the"]


def _batch(model, tok, prompts=PROMPTS):
    """A left-padded batch cache of the prompts (as the engine builds it) and its mask."""
    rows, lengths, last = [], [], []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        rows.append([(layer.keys, layer.values) for layer in cache.layers])
        lengths.append(ids.shape[1])
        last.append(int(out.logits[0, -1].argmax()))
    cache, width = left_padded_slab_cache(rows, lengths, max(lengths) + 8)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, width - length:] = 1
    return cache, width, mask, lengths, last


def _decode(model, tok, steps, lean=None):
    """Greedy steps over a padded batch, by the full forward or the lean step; logits per step."""
    cache, width, mask, lengths, tokens = _batch(model, tok)
    logits_seen = []
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.tensor([[t] for t in tokens])
            positions = torch.tensor([[n] for n in lengths])
            mask = torch.cat([mask, torch.ones((len(tokens), 1), dtype=mask.dtype)], 1)
            if lean is None:
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                               cache_position=torch.tensor([width]), use_cache=True).logits[:, -1]
            else:
                logits = lean.step(ids, positions, cache.layers, mask)
            logits_seen.append(logits)
            tokens = logits.argmax(-1).tolist()
            lengths = [n + 1 for n in lengths]
            width += 1
    return torch.stack(logits_seen)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lean_step_gives_the_full_forwards_logits_on_a_padded_batch(arch, tiny_tokenizer):
    model, tok = tiny_model(arch, tokenizer=tiny_tokenizer)
    lean, why = lean_decoder_for(model)
    assert lean is not None, why
    full = _decode(model, tok, 6)
    fast = _decode(model, tok, 6, lean)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.argmax(-1), full.argmax(-1))


def test_hooks_on_the_mlp_run_and_hooks_elsewhere_hand_the_step_back(tiny_tokenizer):
    model, tok = tiny_model("llama", tokenizer=tiny_tokenizer)
    lean, _ = lean_decoder_for(model)
    plain = _decode(model, tok, 3, lean)
    shift = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    handle = model.get_submodule("model.layers.2.mlp").register_forward_hook(lambda _m, _i, out: out + shift)
    try:
        assert lean.usable()  # the MLP is called by the lean step, so its hook runs there
        hooked_full = _decode(model, tok, 3)
        hooked_fast = _decode(model, tok, 3, lean)
    finally:
        handle.remove()
    torch.testing.assert_close(hooked_fast, hooked_full, rtol=1e-5, atol=1e-5)
    assert (hooked_fast - plain).abs().max() > 1e-3  # the hook did change the output
    for name in ("model.layers.1", "model.layers.1.self_attn", "model.norm", "model.layers.0.input_layernorm"):
        handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, _i: None)
        try:
            assert not lean.usable(), name
        finally:
            handle.remove()
    assert lean.usable()


@pytest.mark.parametrize("arch", ["gemma3", "gpt2", "gpt_neox"])
def test_other_layouts_are_refused_with_the_reason(arch, tiny_tokenizer):
    model, _ = tiny_model(arch, tokenizer=tiny_tokenizer)
    lean, why = lean_decoder_for(model)
    assert lean is None
    assert arch in why and "Llama layout" in why


def test_a_sliding_window_shorter_than_the_context_is_refused(tiny_tokenizer):
    model, _ = tiny_model("qwen2", tokenizer=tiny_tokenizer)
    model.config.use_sliding_window, model.config.sliding_window = True, 64
    lean, why = lean_decoder_for(model)
    assert lean is None and "sliding window of 64" in why


def test_bf16_lean_step_follows_the_full_forward(tiny_tokenizer):
    """In bf16 the norms round as LlamaRMSNorm does, so the logits stay within bf16 rounding
    of the full forward's and greedy tokens agree."""
    model, tok = tiny_model("llama", tokenizer=tiny_tokenizer)
    model.to(torch.bfloat16)
    lean, _ = lean_decoder_for(model)
    full = _decode(model, tok, 4).float()
    fast = _decode(model, tok, 4, lean).float()
    torch.testing.assert_close(fast, full, rtol=2e-2, atol=2e-2)
    assert torch.equal(fast.argmax(-1), full.argmax(-1))
