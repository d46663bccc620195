"""Null-space preservation (``preserve``, AlphaEdit-style) on tiny random models: the update
lies in the null space of the key statistics, earlier edits' keys keep their outputs, the
fact is still written, and the keys travel with the artifact to the host."""

from __future__ import annotations

import pytest
import torch

from editserve.editing.artifacts import WeightDelta, compact_keys, load_artifact, preview, save_artifact
from editserve.editing.context import EditingContext
from editserve.editing.facts import Fact
from editserve.editing.memit import compute_memit
from editserve.editing.rome import compute_rome
from editserve.editing.scoring import score
from tests.unit.rome_helpers import learnable_model
from tests.unit.test_memit import FACTS, tiny_memit
from tests.unit.test_rome import FACT, tiny_hparams

torch.set_num_threads(1)

SECOND = Fact("The capital of {}", "Italy", "founded", "Rome")
PRESERVE = dict(preserve=True, preserve_projection=True, null_space_threshold=0.2, preserve_ridge=1e-6)


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("preserve-stats")


def _setup(tiny_tokenizer, stats_dir):
    model, adapter = learnable_model("llama", tiny_tokenizer)
    return model, adapter, EditingContext(model, tiny_tokenizer, adapter, stats_dir, progress=False)


def test_null_space_is_a_projector_onto_the_small_eigenvalues(tiny_tokenizer, stats_dir):
    _model, _adapter, ctx = _setup(tiny_tokenizer, stats_dir)
    c = ctx.second_moment(1, "default", 2000).double()
    p = ctx.null_space(1, "default", 2000, 0.2)
    torch.testing.assert_close(p @ p, p, atol=1e-9, rtol=0)
    torch.testing.assert_close(p, p.T)
    values = torch.linalg.eigvalsh(c)
    small = int((values < 0.2 * values.max()).sum())
    assert 0 < small < c.shape[0] and round(float(p.trace())) == small
    # what the layer's usual keys put there: each kept direction under 0.2 of the largest
    assert float((p @ c).trace()) <= 0.2 * float(values.max()) * small
    assert float((p @ c @ p - c @ p).abs().max()) < 1e-9  # P commutes with C (its eigenvectors)


def test_preserving_rome_writes_the_fact_in_the_null_space_and_keeps_earlier_keys(tiny_tokenizer, stats_dir):
    model, adapter, ctx = _setup(tiny_tokenizer, stats_dir)
    name = adapter.mlp_out_weight_name(1)
    first, _ = compute_rome(ctx, [FACT], tiny_hparams(model, **PRESERVE))
    p = ctx.null_space(1, "default", 2000, PRESERVE["null_space_threshold"]).float()
    dense = first.delta(name)
    torch.testing.assert_close(dense @ p, dense, atol=1e-4 * float(dense.abs().max()), rtol=0)
    assert first.keys[name].shape == (dense.shape[1], 1)
    with preview(model, first):
        assert score(model, tiny_tokenizer, [FACT.text], [FACT.target_new])[0].probability > 0.3

    ctx.preserved_keys = lambda wanted: first.keys[wanted] if wanted == name else None
    second, diagnostics = compute_rome(ctx, [SECOND], tiny_hparams(model, **PRESERVE))
    assert diagnostics["preserved_keys"] == 1
    moved = second.delta(name) @ first.keys[name]  # the second edit's change at the first's key
    written = first.delta(name) @ first.keys[name]
    assert float(moved.norm()) < 1e-3 * float(written.norm())

    # without preserve the second edit does move the first one's key
    ctx.preserved_keys = lambda _wanted: None
    plain, _ = compute_rome(ctx, [SECOND], tiny_hparams(model))
    assert float((plain.delta(name) @ first.keys[name]).norm()) > 1e-2 * float(written.norm())


def test_preserving_memit_updates_lie_in_the_null_space(tiny_tokenizer, stats_dir):
    model, adapter = learnable_model("llama", tiny_tokenizer, edit_layer=2)
    ctx = EditingContext(model, tiny_tokenizer, adapter, stats_dir, progress=False)
    delta, _ = compute_memit(ctx, FACTS, tiny_memit(model, **PRESERVE))
    for layer in (1, 2):
        name = adapter.mlp_out_weight_name(layer)
        p = ctx.null_space(layer, "default", 2000, PRESERVE["null_space_threshold"]).float()
        dense = delta.delta(name)
        torch.testing.assert_close(dense @ p, dense, atol=1e-4 * float(dense.abs().max()), rtol=0)
        assert delta.keys[name].shape == (dense.shape[1], len(FACTS))
    texts, targets = [f.text for f in FACTS], [f.target_new for f in FACTS]
    before = [s.probability for s in score(model, tiny_tokenizer, texts, targets)]
    with preview(model, delta):
        after = [s.probability for s in score(model, tiny_tokenizer, texts, targets)]
    assert all(a > 5 * b for a, b in zip(after, before, strict=True)), (before, after)


def test_keys_round_trip_and_compact_to_the_same_gram(tmp_path):
    keys = torch.randn(8, 20)
    compact = compact_keys(keys)
    assert compact.shape == (8, 8)
    torch.testing.assert_close(compact @ compact.T, keys @ keys.T, atol=1e-4, rtol=1e-4)
    assert compact_keys(keys[:, :3]) is not None and compact_keys(keys[:, :3]).shape == (8, 3)
    delta = WeightDelta(factors={"w": (torch.randn(4, 2), torch.randn(8, 2))}, keys={"w": keys[:, :2]})
    save_artifact(delta, tmp_path / "a.safetensors")
    loaded = load_artifact(tmp_path / "a.safetensors")
    torch.testing.assert_close(loaded.keys["w"], keys[:, :2])
    torch.testing.assert_close(loaded.delta("w"), delta.delta("w"))


def test_host_gathers_the_active_edits_keys(tiny_tokenizer):
    from editserve.server.host import ModelHost
    from tests.tiny import tiny_model

    model, tok = tiny_model("llama", tokenizer=tiny_tokenizer)
    host = ModelHost(model, tok, name="tiny", dtype="fp32", device="cpu")
    name = host.adapter.mlp_out_weight_name(1)
    d_out, d_in = host.model.get_parameter(name).shape
    assert host.active_keys(name) is None
    deltas = [WeightDelta(factors={name: (torch.zeros(d_out, n), torch.zeros(d_in, n))},
                      keys={name: torch.randn(d_in, n)}) for n in (2, 3)]
    for i, delta in enumerate(deltas):
        host.apply(f"e{i}", delta, i + 1)
    torch.testing.assert_close(host.active_keys(name), torch.cat([d.keys[name] for d in deltas], 1))
    host.revert("e0", 3)
    torch.testing.assert_close(host.active_keys(name), deltas[1].keys[name])


def test_keys_only_preservation_bends_rome_away_from_earlier_keys(tiny_tokenizer, stats_dir):
    """``preserve_projection=false``: no null space, only the earlier edits' keys kept. With
    none active the update is plain ROME's; with one, its key hardly moves, and a larger
    lambda (the usual keys' weight) lets it move more."""
    model, adapter, ctx = _setup(tiny_tokenizer, stats_dir)
    name = adapter.mlp_out_weight_name(1)
    keys_only = dict(preserve=True, preserve_projection=False, mom2_update_weight=1e-3)
    ctx.preserved_keys = lambda _wanted: None
    plain, _ = compute_rome(ctx, [FACT], tiny_hparams(model))
    alone, _ = compute_rome(ctx, [FACT], tiny_hparams(model, **keys_only))
    torch.testing.assert_close(alone.delta(name), plain.delta(name), atol=1e-4 * float(plain.delta(name).abs().max()),
                               rtol=1e-3)

    ctx.preserved_keys = lambda wanted: plain.keys[wanted] if wanted == name else None
    written = plain.delta(name) @ plain.keys[name]
    moved = {}
    for weight in (1e-3, 1e3):
        second, diagnostics = compute_rome(ctx, [SECOND], tiny_hparams(model, **{**keys_only, "mom2_update_weight": weight}))
        assert diagnostics["preserved_keys"] == 1
        moved[weight] = float((second.delta(name) @ plain.keys[name]).norm()) / float(written.norm())
        with preview(model, second):
            assert score(model, tiny_tokenizer, [SECOND.text], [SECOND.target_new])[0].probability > 0.3
    ctx.preserved_keys = lambda _wanted: None
    unkept, _ = compute_rome(ctx, [SECOND], tiny_hparams(model))
    moved_plain = float((unkept.delta(name) @ plain.keys[name]).norm()) / float(written.norm())
    assert moved[1e-3] < 1e-3 < moved_plain and moved[1e-3] < moved[1e3], (moved, moved_plain)


def test_keys_only_preservation_in_memit_keeps_earlier_keys(tiny_tokenizer, stats_dir):
    model, adapter = learnable_model("llama", tiny_tokenizer, edit_layer=2)
    ctx = EditingContext(model, tiny_tokenizer, adapter, stats_dir, progress=False)
    first, _ = compute_memit(ctx, FACTS[:1], tiny_memit(model))
    names = [adapter.mlp_out_weight_name(layer) for layer in (1, 2)]
    ctx.preserved_keys = lambda wanted: first.keys[wanted] if wanted in names else None
    options = dict(preserve=True, preserve_projection=False, mom2_update_weight=1e-3)
    kept, _ = compute_memit(ctx, FACTS[1:], tiny_memit(model, **options))
    plain, _ = compute_memit(ctx, FACTS[1:], tiny_memit(model, preserve=False, mom2_update_weight=1e-3))
    for name in names:
        moved = float((kept.delta(name) @ first.keys[name]).norm())
        assert moved < 0.05 * float((plain.delta(name) @ first.keys[name]).norm())


def test_keys_only_memit_with_no_edit_active_is_plain_memit(tiny_tokenizer, stats_dir):
    """Why keys-only preservation can be MEMIT's Llama default (memit-llama-3): with no earlier
    edit's keys to keep, the solve is plain MEMIT's, bit for bit; and the shipped Llama options
    are that form (preserve on, no null-space projection)."""
    model, adapter = learnable_model("llama", tiny_tokenizer, edit_layer=2)
    ctx = EditingContext(model, tiny_tokenizer, adapter, stats_dir, progress=False)
    shipped = tiny_memit(model)
    assert shipped.preserve and not shipped.preserve_projection
    kept, diagnostics = compute_memit(ctx, FACTS[:2], shipped)
    plain, _ = compute_memit(ctx, FACTS[:2], tiny_memit(model, preserve=False))
    assert [layer["preserved_keys"] for layer in diagnostics["per_layer"]] == [0, 0]
    for layer in (1, 2):
        name = adapter.mlp_out_weight_name(layer)
        assert torch.equal(kept.delta(name), plain.delta(name)), name
