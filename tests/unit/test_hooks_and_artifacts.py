import threading

import pytest
import torch

from editserve.editing.adapter import ArchitectureAdapter
from editserve.editing.artifacts import WeightDelta, preview
from editserve.editing.hooks import Trace, TraceDict, hooks_attached
from tests.tiny import tiny_model


def _ids(tokenizer, text="The capital of France is"):
    return tokenizer(text, return_tensors="pt").input_ids


def test_trace_retains_and_removes_even_on_error(tiny_tokenizer):
    model, tok = tiny_model("llama", tokenizer=tiny_tokenizer)
    adapter = ArchitectureAdapter.from_model(model)
    with TraceDict(model, [adapter.mlp(0), adapter.layer(1)]) as traces:
        model(_ids(tok))
    assert traces[adapter.mlp(0)].output.shape[-1] == 32
    assert hooks_attached(model) == 0
    with pytest.raises(RuntimeError), Trace(model, adapter.mlp(0)):
        raise RuntimeError("boom")
    assert hooks_attached(model) == 0


def test_hooks_do_not_leak_into_other_threads(tiny_tokenizer):
    """An edit's optimisation hooks must not change a concurrent Generate's forward pass."""
    model, tok = tiny_model("llama", tokenizer=tiny_tokenizer)
    adapter = ArchitectureAdapter.from_model(model)
    ids = _ids(tok)
    clean = model(ids).logits
    seen = {}

    def other_thread():
        seen["logits"] = model(ids).logits

    with Trace(model, adapter.mlp(1), edit_output=lambda out, _n: out + 100.0):
        hooked = model(ids).logits
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert not torch.allclose(hooked, clean)
    torch.testing.assert_close(seen["logits"], clean)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_preview_equals_real_apply(arch, tiny_tokenizer):
    model, tok = tiny_model(arch, tokenizer=tiny_tokenizer)
    adapter = ArchitectureAdapter.from_model(model)
    name = adapter.mlp_out_weight_name(2)
    param = model.get_parameter(name)
    delta = WeightDelta(factors={name: (torch.randn(param.shape[0], 1), torch.randn(param.shape[1], 1))})
    ids = _ids(tok)
    with preview(model, delta):
        previewed = model(ids).logits
    assert hooks_attached(model) == 0
    param.data += delta.delta(name)
    torch.testing.assert_close(previewed, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_weight_delta_safetensors_round_trip(tmp_path):
    delta = WeightDelta(
        factors={"a.weight": (torch.randn(4, 1), torch.randn(6, 1))},
        dense={"b.weight": torch.randn(3, 3)},
    )
    delta.save(tmp_path / "d.safetensors")
    back = WeightDelta.load(tmp_path / "d.safetensors")
    assert back.parameter_names == ["a.weight", "b.weight"]
    for name in back.parameter_names:
        assert torch.equal(back.delta(name), delta.delta(name))
    assert abs(back.norm() - delta.norm()) < 1e-6
    assert not WeightDelta(dense={"x": torch.tensor([float("nan")])}).is_finite()
