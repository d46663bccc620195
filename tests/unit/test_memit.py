"""MEMIT on tiny random models: many facts in one edit, spread over several layers, the model
never written, artifacts low-rank per layer, and every bad request refused before compute."""

from __future__ import annotations

import pytest
import torch

from editserve.editing.artifacts import preview
from editserve.editing.context import EditingContext
from editserve.editing.errors import InvalidRequest
from editserve.editing.facts import Fact
from editserve.editing.hooks import hooks_attached
from editserve.editing.hparams import MemitHyperParams
from editserve.editing.memit import compute_memit
from editserve.editing.scoring import score
from tests.unit.rome_helpers import ARCHS, learnable_model, weights_digest

torch.set_num_threads(1)

# single-token targets the tiny tokenizer knows
FACTS = [
    Fact("The language of {}", "Danielle Darrieux", "founded", "French"),
    Fact("The capital of {}", "Italy", "founded", "Rome"),
    Fact("The sport of {}", "Michael Jordan", "capital", "basketball"),
]


def tiny_memit(model, **overrides) -> MemitHyperParams:
    settings = dict(layers=(1, 2), stats_tokens=2000, steps=40, context_count=2, context_length=5,
                    clamp_norm_factor=1e4, weight_decay=0.0, mom2_update_weight=1.0)
    settings.update(overrides)
    return MemitHyperParams.load(model.config.model_type, 4).with_overrides(**settings)


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("memit-stats")


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_edit_raises_every_target_without_touching_weights(arch, tiny_tokenizer, stats_dir):
    model, adapter = learnable_model(arch, tiny_tokenizer, edit_layer=2)
    if adapter.post_mlp_norm_template:  # Gemma: make layer 1's MLP able to move the residual too
        with torch.no_grad():
            model.get_submodule(adapter.layer(1)).post_feedforward_layernorm.weight.add_(20.0)
    ctx = EditingContext(model, tiny_tokenizer, adapter, stats_dir, progress=False)
    digest = weights_digest(model)
    texts, targets = [f.text for f in FACTS], [f.target_new for f in FACTS]
    before = [s.probability for s in score(model, tiny_tokenizer, texts, targets)]

    delta, diagnostics = compute_memit(ctx, FACTS, tiny_memit(model))

    assert weights_digest(model) == digest and hooks_attached(model) == 0
    names = [adapter.mlp_out_weight_name(layer) for layer in (1, 2)]
    assert delta.parameter_names == sorted(names)
    for name in names:
        assert delta.delta(name).shape == model.get_parameter(name).shape
        u, v = delta.factors[name]
        assert u.shape[1] == v.shape[1] == len(FACTS)  # rank <= number of facts
    with preview(model, delta):
        after = [s.probability for s in score(model, tiny_tokenizer, texts, targets)]
    for b, a in zip(before, after, strict=True):
        assert a > 0.2 and a > 20 * b, (arch, before, after, diagnostics["per_layer"])
    assert diagnostics["layers"] == [1, 2] and len(diagnostics["facts"]) == len(FACTS)


@pytest.mark.parametrize("rows_per_bucket", [48, 2])
def test_batched_targets_match_one_at_a_time(rows_per_bucket, tiny_tokenizer, stats_dir, monkeypatch):
    """Batching facts shares forward passes (in one bucket, or in several by suffix length) but
    each fact keeps its own optimisation."""
    from editserve.editing import values
    from editserve.editing.values import compute_value_deltas

    monkeypatch.setattr(values, "ROWS_PER_BUCKET", rows_per_bucket)
    model, adapter = learnable_model("llama", tiny_tokenizer, edit_layer=2)
    ctx = EditingContext(model, tiny_tokenizer, adapter, stats_dir, progress=False)
    hp = tiny_memit(model, steps=8, early_stop_loss=0.0)
    templates = ctx.context_templates(hp.context_count, hp.context_length)
    module = adapter.layer(2)
    together = compute_value_deltas(model, tiny_tokenizer, module, adapter.hidden_size, FACTS, templates, hp,
                                    batch_facts=3)
    for i, fact in enumerate(FACTS):
        alone = compute_value_deltas(model, tiny_tokenizer, module, adapter.hidden_size, [fact], templates, hp)
        torch.testing.assert_close(together.deltas[i], alone.deltas[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(together.unedited[i], alone.unedited[0], atol=1e-4, rtol=1e-4)


def test_converged_facts_stop_while_others_go_on(tiny_tokenizer, stats_dir):
    from editserve.editing.values import compute_value_deltas

    model, adapter = learnable_model("llama", tiny_tokenizer, edit_layer=2)
    ctx = EditingContext(model, tiny_tokenizer, adapter, stats_dir, progress=False)
    templates = ctx.context_templates(1, 5)
    easy = Fact("The capital of {}", "Italy", "founded")
    hp = tiny_memit(model, steps=30, early_stop_loss=1.0, lr=0.02)
    result = compute_value_deltas(model, tiny_tokenizer, adapter.layer(2), adapter.hidden_size,
                                  [easy, FACTS[0], FACTS[2]], templates, hp, batch_facts=3)
    steps = [i["steps"] for i in result.info]
    assert all(i["final_nll"] < 1.0 for i in result.info), result.info
    assert max(steps) <= 30 and len(set(steps)) > 1, steps


def test_stop_at_top_ends_each_fact_once_its_target_is_the_top_token(tiny_tokenizer, stats_dir):
    """``stop_at_top`` (most-probable early stopping): a fact stops as soon as its target tokens
    are the top token at every context row, with fewer steps and a smaller change than
    optimising on to the NLL threshold."""
    from editserve.editing.values import compute_value_deltas

    model, adapter = learnable_model("llama", tiny_tokenizer, edit_layer=2)
    ctx = EditingContext(model, tiny_tokenizer, adapter, stats_dir, progress=False)
    templates = ctx.context_templates(1, 5)
    runs = {}
    for stop in (False, True):
        hp = tiny_memit(model, steps=60, early_stop_loss=0.01, lr=0.005, stop_at_top=stop)
        runs[stop] = compute_value_deltas(model, tiny_tokenizer, adapter.layer(2), adapter.hidden_size, FACTS,
                                          templates, hp, batch_facts=3)
    for early, full in zip(runs[True].info, runs[False].info, strict=True):
        assert early["positions_off_top"] == 0 and "positions_off_top" not in full
        assert early["steps"] < full["steps"], (early["steps"], full["steps"])
        assert early["delta_norm"] < full["delta_norm"]
        assert early["final_nll"] > full["final_nll"]  # it stopped before the NLL threshold


def test_bad_requests_change_nothing(tiny_tokenizer, stats_dir, tmp_path):
    model, adapter = learnable_model("llama", tiny_tokenizer)
    ctx = EditingContext(model, tiny_tokenizer, adapter, stats_dir, progress=False)
    hp = tiny_memit(model, steps=2)
    with pytest.raises(InvalidRequest, match="at least one fact"):
        compute_memit(ctx, [], hp)
    twice = [FACTS[0], Fact(FACTS[0].prompt, FACTS[0].subject, "Seattle")]
    with pytest.raises(InvalidRequest, match="two different targets"):
        compute_memit(ctx, twice, hp)
    with pytest.raises(InvalidRequest, match="out of range"):
        compute_memit(ctx, FACTS, hp.with_overrides(layers=[1, 9]))
    with pytest.raises(InvalidRequest, match="must be in"):
        hp.with_overrides(mom2_update_weight=float("nan"))
    with pytest.raises(InvalidRequest, match="must be in"):
        hp.with_overrides(steps=5000)
    with pytest.raises(InvalidRequest, match="repeat"):
        hp.with_overrides(layers=[1, 1])
    with pytest.raises(InvalidRequest, match="unknown memit option"):
        hp.with_overrides(layer=3)
    assert hooks_attached(model) == 0


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_narrowed_runner_reuses_the_prefix_exactly(arch, tiny_tokenizer):
    """Facts leaving the batch keep the others' cached prefix: same logits as a fresh runner."""
    from editserve.editing import values as V
    from editserve.editing.keys import pad_id_of

    model, adapter = learnable_model(arch, tiny_tokenizer)
    templates = ["{}", "The capital of France is Paris. {}", "Apple. {}"]
    specs = [V.fact_rows(tiny_tokenizer, f, templates, "{} is a") for f in FACTS]
    pad = pad_id_of(tiny_tokenizer)
    entries = [(f, r) for f, spec in enumerate(specs) for r in range(len(spec.rows))]
    full = V._Runner(model, adapter.layer(2), V._build_batch(specs, entries, pad, "cpu"))
    rows = [row for row, (f, _r) in enumerate(entries) if f in (0, 2)]
    batch = V._build_batch(specs, [entries[row] for row in rows], pad, "cpu")
    delta = torch.randn(len(rows), adapter.hidden_size)
    narrowed, _ = full.narrowed(batch, rows).logits(delta)
    fresh, _ = V._Runner(model, adapter.layer(2), batch).logits(delta)
    torch.testing.assert_close(narrowed, fresh, atol=1e-4, rtol=1e-4)


def test_rows_are_bucketed_by_suffix_length(tiny_tokenizer):
    """Every row lands in exactly one bucket, and buckets are ordered by suffix length."""
    from editserve.editing import values as V

    templates = ["{}", "The capital of France is Paris. {}", "Apple. {}"]
    specs = [V.fact_rows(tiny_tokenizer, f, templates, "{} is a") for f in FACTS * 20]
    buckets = V._buckets(specs, list(range(len(specs))))
    flat = [e for b in buckets for e in b]
    assert sorted(flat) == sorted((f, r) for f, s in enumerate(specs) for r in range(len(s.rows)))
    assert len(buckets) > 1 and all(len(b) >= V.ROWS_PER_BUCKET for b in buckets[:-1])
    longest = [max(specs[f].suffix_length(r) for f, r in b) for b in buckets]
    shortest = [min(specs[f].suffix_length(r) for f, r in b) for b in buckets]
    assert all(longest[i] <= shortest[i + 1] for i in range(len(buckets) - 1))


def _normed(scale: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return scale * m / m.pow(2).mean(-1, keepdim=True).sqrt()


def test_post_norm_projection_survives_zero_and_tiny_scales():
    """Gemma-3's post-FFN norm has channels whose scale is exactly zero: the change written
    through it must stay finite, reach a target the norm can produce, and come closer to one
    it cannot."""
    from editserve.editing.memit import _project_onto_norm_outputs

    gen = torch.Generator().manual_seed(0)
    d, n = 64, 5
    scale = torch.rand(d, generator=gen) * 3 + 0.5
    scale[3], scale[10], scale[20] = 0.0, 1e-9, 0.01
    m = torch.randn(n, d, generator=gen) * 4
    dead = scale.abs() <= 1e-6 * scale.abs().max()
    # A reachable target: u agrees with m's normalised value on dead channels, rms(u) = 1.
    u_true = torch.randn(n, d, generator=gen)
    m_unit = m / m.pow(2).mean(-1, keepdim=True).sqrt()
    live_energy = 1 - m_unit[:, dead].pow(2).sum(-1, keepdim=True) / d
    u_true[:, dead] = 0
    u_true = u_true / (u_true.pow(2).sum(-1, keepdim=True) / d / live_energy).sqrt()
    u_true[:, dead] = m_unit[:, dead]
    reachable = scale * u_true
    delta = _project_onto_norm_outputs(scale, m, reachable)
    assert torch.isfinite(delta).all()
    torch.testing.assert_close(_normed(scale, m + delta), reachable, rtol=1e-3, atol=1e-3)
    # An unreachable target (a wish for the dead channel too): finite, and closer than m was.
    wished = _normed(scale, m) + torch.randn(n, d, generator=gen) * 5
    delta = _project_onto_norm_outputs(scale, m, wished)
    assert torch.isfinite(delta).all()
    before = (_normed(scale, m) - wished).norm(dim=-1)
    after = (_normed(scale, m + delta) - wished).norm(dim=-1)
    assert (after < before).all()
