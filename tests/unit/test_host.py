import itertools

import pytest
import torch

from editserve.editing.artifacts import WeightDelta
from editserve.server.host import ModelHost
from tests.tiny import tiny_model


def _host(arch, tok):
    model, tok = tiny_model(arch, tokenizer=tok)
    return ModelHost(model, tok, name="tiny", dtype="fp32", device="cpu")


def _delta(host, layer, seed):
    g = torch.Generator().manual_seed(seed)
    name = host.adapter.mlp_out_weight_name(layer)
    p = host.model.get_parameter(name)
    return WeightDelta(factors={name: (torch.randn(p.shape[0], 1, generator=g) * 0.1,
                                       torch.randn(p.shape[1], 1, generator=g) * 0.1)})


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_revert_in_any_order_restores_bit_identical_weights(order, tiny_tokenizer):
    host = _host("llama", tiny_tokenizer)
    pristine = host.weights_digest()
    # two edits share a tensor (layer 1), one touches another (layer 2)
    deltas = [_delta(host, 1, 0), _delta(host, 1, 1), _delta(host, 2, 2)]
    digests = [pristine]
    for i, d in enumerate(deltas):
        host.apply(f"e{i}", d, revision=i + 1)
        digests.append(host.weights_digest())
    assert len(set(digests)) == 4
    revision = 3
    remaining = set(range(3))
    for i in order:
        revision += 1
        host.revert(f"e{i}", revision)
        remaining.discard(i)
        # the live weights equal a fresh host with only the remaining edits applied
        fresh = _host("llama", tiny_tokenizer)
        fresh.load_state([(f"e{j}", deltas[j]) for j in sorted(remaining)], revision)
        assert host.weights_digest() == fresh.weights_digest()
    assert host.weights_digest() == pristine
    assert host.revision == 6


def test_bf16_revert_is_exact(tiny_tokenizer):
    host = _host("gpt2", tiny_tokenizer)
    host.model.to(torch.bfloat16)
    before = host.weights_digest()
    host.apply("a", _delta(host, 0, 3), 1)
    host.apply("b", _delta(host, 0, 4), 2)
    host.revert("a", 3)
    host.revert("b", 4)
    assert host.weights_digest() == before


def test_bad_delta_is_rejected_before_anything_changes(tiny_tokenizer):
    host = _host("llama", tiny_tokenizer)
    before = host.weights_digest()
    name = host.adapter.mlp_out_weight_name(0)
    with pytest.raises(ValueError, match="shape"):
        host.apply("x", WeightDelta(dense={name: torch.zeros(3, 3)}), 1)
    with pytest.raises(ValueError, match="NaN"):
        p = host.model.get_parameter(name)
        host.apply("x", WeightDelta(dense={name: torch.full_like(p, float("nan"))}), 1)
    with pytest.raises(ValueError, match="unknown parameter"):
        host.apply("x", WeightDelta(dense={"nope.weight": torch.zeros(1)}), 1)
    assert host.weights_digest() == before and host.revision == 0
    with pytest.raises(KeyError):
        host.revert("never", 1)


def test_fingerprint_ignores_edits(tiny_tokenizer):
    host = _host("llama", tiny_tokenizer)
    fp = host.fingerprint()
    host.apply("a", _delta(host, 0, 0), 1)
    assert host.fingerprint() == fp


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_apply_swaps_storage_and_never_writes_the_old_one(arch, tiny_tokenizer):
    # Why: commits swap tensors in (an O(1) pause); the base storage becomes the pristine copy,
    # so nothing may ever write into it, and the model must run on the new values.
    host = _host(arch, tiny_tokenizer)
    name = host.adapter.mlp_out_weight_name(1)
    param = host.model.get_parameter(name)
    seen = param.detach()
    original = seen.clone()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = host.model(ids).logits
    host.apply("a", _delta(host, 1, 5), 1)
    assert torch.equal(seen, original)
    assert host.model.get_parameter(name) is param  # same Parameter object (hooks, tying)
    assert not torch.equal(param.detach(), original)
    with torch.no_grad():
        assert not torch.allclose(host.model(ids).logits, before)
    host.revert("a", 2)
    assert torch.equal(param.detach(), original)
    with torch.no_grad():
        assert torch.equal(host.model(ids).logits, before)


def test_the_hf_host_is_both_faces_of_the_served_model(tiny_tokenizer):
    """The HF backend serves from the analysis module itself: one object is both protocols."""
    from editserve.server.state import AnalysisView, ServedState

    host = _host("llama", tiny_tokenizer)
    assert isinstance(host, AnalysisView) and isinstance(host, ServedState)
    assert host.capabilities == frozenset({"weight_delta", "runtime_layer", "ffn_neurons", "routing"})
