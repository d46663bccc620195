"""Blocked small products: the same linear map as F.linear up to float32 rounding."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from editserve.server.backends.blocked_linear import (
    MAX_ROWS,
    BlockedLinear,
    use_blocked_linear,
    use_plain_linear,
)
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
