"""bf16 decode products (opt-in): rounded only inside an engine's decode step, only for the row
counts chosen, never under autograd or on another thread; a swapped weight is repacked; the
engine's logits stay within the documented tolerance of fp32."""

import threading

import pytest
import torch
import torch.nn.functional as F

from editserve.server.backends import bf16_products
from editserve.server.backends.bf16_products import DecodeScope
from editserve.server.backends.blocked_linear import use_bf16_products, use_blocked_linear
from editserve.server.backends.product_choice import choose_products
from tests.tiny import tiny_model

pytestmark = pytest.mark.skipif(not bf16_products.available(), reason="torch built without oneDNN's packed linear")


def _layer(tiny_tokenizer, rows=frozenset({4})):
    model, _tok = tiny_model("llama", tokenizer=tiny_tokenizer)
    scope = DecodeScope()
    use_blocked_linear(model, frozenset())
    use_bf16_products(model, rows, scope)
    return model, model.model.layers[0].mlp.down_proj, scope


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def test_products_are_rounded_only_in_an_active_scope_for_their_row_counts(tiny_tokenizer):
    _model, layer, scope = _layer(tiny_tokenizer)
    x = torch.randn(4, layer.in_features)
    exact = F.linear(x, layer.weight)
    assert torch.equal(layer(x), exact)  # scope inactive: fp32
    scope.active = True
    reduced = layer(x)
    assert not torch.equal(reduced, exact) and _rel(reduced, exact) < 2e-2  # bf16, within its rounding
    assert torch.equal(layer(x[:3]), F.linear(x[:3], layer.weight))  # 3 rows: not chosen
    seen = {}
    worker = threading.Thread(target=lambda: seen.update(out=layer(x)))  # the scope is this thread's only
    worker.start()
    worker.join()
    assert torch.equal(seen["out"], exact)
    with torch.enable_grad():
        assert torch.equal(layer(x), exact)
    assert reduced.dtype == torch.float32 and reduced.shape == exact.shape


@torch.no_grad()
def test_a_swapped_weight_is_packed_again(tiny_tokenizer):
    _model, layer, scope = _layer(tiny_tokenizer)
    x = torch.randn(4, layer.in_features)
    scope.active = True
    before = layer(x)
    layer.weight.data = layer.weight.data * -2.0  # as the host commits an edit: a new storage
    after = layer(x)
    expected = F.linear(x, layer.weight)
    assert _rel(after, expected) < 2e-2 and _rel(before, expected) > 1.0


@torch.no_grad()
def test_the_engines_choice_and_the_step_tolerance(tiny_tokenizer):
    """``bf16_min_rows`` with a fixed mode takes bf16 from that row count on; a lean decode
    step of 4 rows then stays within bf16's rounding of the fp32 step, and 3 rows are exact."""
    from editserve.server.backends.lean_decode import lean_decoder_for
    from tests.unit.test_lean_decode import _batch

    model, tok = tiny_model("llama", tokenizer=tiny_tokenizer)
    scope = DecodeScope()
    choice = choose_products(model, "plain", bf16_min_rows=4, scope=scope)
    assert choice.bf16_rows == frozenset(range(4, 17)) and "bf16 for rows 4,5," in choice.describe()
    lean, why = lean_decoder_for(model)
    assert lean is not None, why
    prompts = ["The capital of France is", "Hi", "Apple was founded by", "The mother tongue of"]
    steps = {}
    for rows in (3, 4):
        for active in (False, True):
            cache, width, mask, lengths, tokens = _batch(model, tok, prompts[:rows])
            scope.active = active
            try:
                steps[rows, active] = lean.step(torch.tensor([[t] for t in tokens]), torch.tensor([[n] for n in lengths]),
                                                cache.layers, torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype)], 1))
            finally:
                scope.active = False
    assert torch.equal(steps[3, True], steps[3, False])
    assert not torch.equal(steps[4, True], steps[4, False])
    scale = float(steps[4, False].abs().max())
    torch.testing.assert_close(steps[4, True], steps[4, False], rtol=0, atol=5e-2 * scale)


@torch.no_grad()
def test_a_copied_model_keeps_fp32_and_packs_its_own(tiny_tokenizer):
    """A deep copy (the bf16 trace copies the served model) is exact fp32 even while the
    engine's scope is active, and shares no packed copy with the original."""
    import copy

    model, layer, scope = _layer(tiny_tokenizer)
    x = torch.randn(4, layer.in_features)
    scope.active = True
    layer(x)  # packs the original's copy
    twin = copy.deepcopy(model).model.layers[0].mlp.down_proj
    assert torch.equal(twin(x), F.linear(x, twin.weight))
    assert twin.decode_scope is not scope and twin.bf16_weight is not layer.bf16_weight


def test_bad_row_counts_are_refused(tiny_tokenizer):
    model, _tok = tiny_model("llama", tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match=r"least row count must be in \[0, 16\]"):
        choose_products(model, "plain", bf16_min_rows=17, scope=DecodeScope())


def _one_step(lean, model, tok, prompts, scope, active):
    from tests.unit.test_lean_decode import _batch

    cache, _width, mask, lengths, tokens = _batch(model, tok, prompts)
    scope.active = active
    try:
        return lean.step(torch.tensor([[t] for t in tokens]), torch.tensor([[n] for n in lengths]), cache.layers,
                         torch.cat([mask, torch.ones((len(prompts), 1), dtype=mask.dtype)], 1))
    finally:
        scope.active = False


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q, k and v carry biases
@torch.no_grad()
def test_the_fused_bf16_layers_match_fp32_follow_an_edit_and_yield_to_hooks(arch, tiny_tokenizer):
    """A bf16 step fuses each layer's products (4 instead of 7) when no hook needs the
    modules: its logits stay within bf16's rounding of the fp32 step and of the per-module
    bf16 step a hook forces; a weight swapped as an edit commits it is packed again."""
    from editserve.server.backends.lean_decode import lean_decoder_for

    model, tok = tiny_model(arch, tokenizer=tiny_tokenizer)
    scope = DecodeScope()
    choose_products(model, "plain", bf16_min_rows=4, scope=scope)
    lean, why = lean_decoder_for(model)
    assert lean is not None, why
    prompts = ["The capital of France is", "Hi", "Apple was founded by", "The mother tongue of"]
    exact = _one_step(lean, model, tok, prompts, scope, False)
    scope.active = True
    assert lean._bf16_step(4) and not lean._bf16_step(3)
    scope.active = False
    fused = _one_step(lean, model, tok, prompts, scope, True)
    scale = float(exact.abs().max())
    assert not torch.equal(fused, exact)
    torch.testing.assert_close(fused, exact, rtol=0, atol=5e-2 * scale)
    down = model.model.layers[0].mlp.down_proj
    hook = down.register_forward_hook(lambda _m, _i, out: None)  # a hook the fused layer would skip
    scope.active = True
    assert not lean._bf16_step(4)
    scope.active = False
    per_module = _one_step(lean, model, tok, prompts, scope, True)
    hook.remove()
    torch.testing.assert_close(fused, per_module, rtol=0, atol=2e-2 * scale)
    down.weight.data = torch.randn_like(down.weight) * 0.5  # as the host commits an edit: a new storage
    exact_after = _one_step(lean, model, tok, prompts, scope, False)
    fused_after = _one_step(lean, model, tok, prompts, scope, True)
    moved = float((exact_after - exact).abs().max())
    assert moved > 0.5 * scale  # the swap changes the step far beyond bf16's rounding
    assert float((fused_after - exact_after).abs().max()) < 0.1 * moved
