"""Blocked small products: the same linear map as F.linear up to float32 rounding."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from editserve.server.backends.blocked_linear import (
    ALL_ROWS,
    MAX_ROWS,
    BlockedLinear,
    use_blocked_linear,
    use_plain_linear,
)
from editserve.server.backends.product_choice import MARGIN, MEASURED_ROWS, choose_products
from tests.tiny import tiny_model


@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 1, 64), (MAX_ROWS, 64), (2, 5, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_blocked_product_equals_f_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(64, 48, bias=bias)
    layer.__class__ = BlockedLinear
    x = torch.randn(*shape, generator=g)
    with torch.no_grad():
        out = layer(x)
        expected = F.linear(x, layer.weight, layer.bias)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_gradients_and_weight_swaps_take_the_plain_path_and_are_seen(tiny_tokenizer):
    model, _ = tiny_model("llama", tokenizer=tiny_tokenizer)
    assert use_blocked_linear(model) > 0
    layer = model.get_submodule("model.layers.1.mlp.down_proj")
    assert type(layer) is BlockedLinear
    x = torch.randn(1, 1, layer.in_features, requires_grad=True)
    layer(x).sum().backward()  # autograd: the plain product, gradients as usual
    assert x.grad is not None
    new = torch.randn_like(layer.weight)
    layer.weight.data = new  # what the host does when an edit lands
    with torch.no_grad():
        torch.testing.assert_close(layer(x.detach()), F.linear(x.detach(), new), rtol=1e-5, atol=1e-6)
    assert use_plain_linear(model) == use_blocked_linear(model)
    assert "model.layers.1.mlp.down_proj.weight" in dict(model.named_parameters())


def _layers(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("mode", ["plain", "blocked"])
def test_a_fixed_product_choice_reaches_every_layer(mode, tiny_tokenizer):
    model, _ = tiny_model("llama", tokenizer=tiny_tokenizer)
    choice = choose_products(model, mode)
    expected = ALL_ROWS if mode == "blocked" else frozenset()
    assert choice.blocked_rows == expected and not choice.timings
    assert all(type(m) is BlockedLinear and m.blocked_rows == expected for m in _layers(model))
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    x = torch.randn(1, 1, layer.in_features)
    with torch.no_grad():
        if mode == "plain":  # the library's own kernel: the very same bits
            assert torch.equal(layer(x), F.linear(x, layer.weight))
        else:
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-6)


def test_auto_choice_measures_each_batch_size_and_follows_its_timings(tiny_tokenizer):
    model, _ = tiny_model("llama", tokenizer=tiny_tokenizer)
    choice = choose_products(model, "auto")
    assert set(choice.timings) == set(MEASURED_ROWS) and choice.seconds > 0
    assert all(0 < p < 1 and 0 < b < 1 for p, b in choice.timings.values())
    for rows in range(1, MAX_ROWS + 1):
        bucket = min(m for m in MEASURED_ROWS if m >= rows)
        plain, blocked = choice.timings[bucket]
        assert (rows in choice.blocked_rows) == (blocked < MARGIN * plain)
    assert all(m.blocked_rows == choice.blocked_rows for m in _layers(model))
    assert "measured in" in choice.describe()


def test_an_unknown_product_choice_is_refused(tiny_tokenizer):
    model, _ = tiny_model("llama", tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="decode products must be one of"):
        choose_products(model, "fastest")
