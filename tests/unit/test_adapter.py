import pytest
import torch

from editserve.editing.adapter import ArchitectureAdapter
from tests.tiny import ARCHITECTURES, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_adapter_finds_every_part(arch, tiny_tokenizer):
    model, _ = tiny_model(arch, tokenizer=tiny_tokenizer)
    adapter = ArchitectureAdapter.from_model(model)
    assert adapter.num_layers == 4 and adapter.hidden_size == 32
    for layer in range(adapter.num_layers):
        for name in (adapter.layer(layer), adapter.mlp(layer), adapter.mlp_out(layer), adapter.attn(layer)):
            model.get_submodule(name)
        weight = adapter.from_param_layout(model.get_parameter(adapter.mlp_out_weight_name(layer)))
        assert weight.shape[0] == 32 and weight.shape[1] > 32  # [hidden, intermediate]
    assert model.get_submodule(adapter.embed_name) is model.get_input_embeddings()
    assert model.get_submodule(adapter.lm_head_name) is model.get_output_embeddings()
    assert "norm" in type(model.get_submodule(adapter.final_norm_name)).__name__.lower()
    assert "norm" not in adapter.attn_template.rsplit(".", 1)[-1]


def test_adapter_rejects_out_of_range_layer(tiny_tokenizer):
    model, _ = tiny_model("llama", tokenizer=tiny_tokenizer)
    adapter = ArchitectureAdapter.from_model(model)
    with pytest.raises(IndexError, match="out of range"):
        adapter.mlp_out(4)
    with pytest.raises(IndexError):
        adapter.layer(-1)


def test_param_layout_round_trip_for_conv1d(tiny_tokenizer):
    model, _ = tiny_model("gpt2", tokenizer=tiny_tokenizer)
    adapter = ArchitectureAdapter.from_model(model)
    assert adapter.mlp_out_is_conv1d
    delta = torch.randn(32, 128)
    param = model.get_parameter(adapter.mlp_out_weight_name(0))
    assert adapter.to_param_layout(delta).shape == param.shape
