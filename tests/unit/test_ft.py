import pytest

from editserve.editing.adapter import ArchitectureAdapter
from editserve.editing.artifacts import preview
from editserve.editing.context import EditingContext
from editserve.editing.errors import InvalidRequest
from editserve.editing.evaluation.teacher_forcing import score_continuations
from editserve.editing.facts import Fact
from editserve.editing.ft import FtHyperParams, compute_ft
from editserve.editing.hooks import hooks_attached
from editserve.server.host import ModelHost
from tests.tiny import tiny_model

FACT = Fact("The mother tongue of {} is", "Danielle Darrieux", "English")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "gpt_neox", "qwen2"])
def test_ft_l_raises_the_target_within_its_constraint(arch, tiny_tokenizer):
    model, tok = tiny_model(arch, tokenizer=tiny_tokenizer)
    adapter = ArchitectureAdapter.from_model(model)
    host = ModelHost(model, tok, name="tiny", dtype="fp32", device="cpu")
    digest = host.weights_digest()
    hp = FtHyperParams(layer=1, steps=15, learning_rate=1e-2, norm_constraint=0.05)
    delta, diagnostics = compute_ft(EditingContext(model, tok, adapter), [FACT], hp)
    assert host.weights_digest() == digest and hooks_attached(model) == 0  # compute never writes
    name = adapter.mlp_out_weight_name(1)
    assert delta.parameter_names == [name]
    assert delta.delta(name).shape == model.get_parameter(name).shape
    assert float(delta.delta(name).abs().max()) <= 0.05 + 1e-7
    before = score_continuations(model, tok, [FACT.text], [FACT.target_new])[0].logprob
    with preview(model, delta):
        after = score_continuations(model, tok, [FACT.text], [FACT.target_new])[0].logprob
    assert after > before
    assert diagnostics["layers"] == [1]


def test_ft_l_rejects_bad_options(tiny_tokenizer):
    model, tok = tiny_model("llama", tokenizer=tiny_tokenizer)
    adapter = ArchitectureAdapter.from_model(model)
    with pytest.raises(InvalidRequest, match="out of range"):
        compute_ft(EditingContext(model, tok, adapter), [FACT], FtHyperParams(layer=9))
    with pytest.raises(InvalidRequest, match="unknown ft_l option"):
        FtHyperParams().with_overrides(lr=1)
