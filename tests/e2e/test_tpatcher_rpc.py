"""T-Patcher over a real socket on a tiny random Llama: the neurons are a runtime layer (no base
parameter changes), the served state's digest moves and comes back bit-exactly on revert, the
patch replays after a restart, a dry run scores without hosting, bad options change nothing."""

from __future__ import annotations

import pytest

from editserve.client import Fact, InvalidArgument

pytestmark = pytest.mark.e2e

TINY = {"method": "t_patcher", "layer": 3, "steps": 60, "learning_rate": 0.05, "context_count": 2,
        "context_length": 5, "memory_rows": 16, "clamp_norm_factor": 1e4, "weight_decay": 0.0}
FACTS = [Fact("The language of {}", "Danielle Darrieux", "founded"), Fact("The capital of {}", "Italy", "founded")]


def test_neurons_are_hosted_reverted_and_replayed(tiny_servers):
    first = tiny_servers()
    with first.client() as client:
        pristine = client.model_info(include_weights_digest=True).weights_digest
        dry = client.edit(FACTS, dry_run=True, **TINY)
        assert not dry.applied and client.model_info(include_weights_digest=True).weights_digest == pristine
        for report in dry.facts:
            assert report.rewrite.p_new_after > 1.5 * report.rewrite.p_new_before, report  # near-uniform random logits

        result = client.edit(FACTS, **TINY)
        assert result.applied
        info = client.get_edit(result.edit_id)
        assert info.method == "t_patcher" and info.layers == [3] and info.parameters == []
        patched = client.model_info(include_weights_digest=True).weights_digest
        assert patched != pristine
        scores = client.score([(f.prompt.format(f.subject), f.target_new) for f in FACTS])
        for report, live in zip(result.facts, scores, strict=True):
            assert live.probability == pytest.approx(report.rewrite.p_new_after, rel=1e-3)
    first.stop()
    with tiny_servers().client() as client:
        assert client.model_info(include_weights_digest=True).weights_digest == patched  # replayed
        client.revert(result.edit_id)
        assert client.model_info(include_weights_digest=True).weights_digest == pristine


@pytest.mark.parametrize("options, message", [
    ({"layer": 9}, "out of range"),
    ({"memory_margin": 2.0}, "memory_margin must be in"),
    ({"learning_rate": float("nan")}, "learning_rate must be in"),
    ({"neurons_per_fact": 0}, "neurons_per_fact must be in"),
    ({"fire_at": "everywhere"}, "fire_at must be one of"),
    ({"clamp_norm_factor": float("inf")}, "clamp_norm_factor must be in"),
    ({"kl_factor": -1.0}, "kl_factor must be in"),
    ({"weight_decay": float("nan")}, "weight_decay must be in"),
    ({"key_steps": 0}, "key_steps must be in"),
    ({"key_steps": 1_000_000}, "key_steps must be in"),
])
def test_bad_options_change_nothing(tiny_servers, options, message):
    with tiny_servers().client() as client:
        pristine = client.model_info(include_weights_digest=True).weights_digest
        with pytest.raises(InvalidArgument, match=message):
            client.edit(FACTS, **{**TINY, **options})
        assert client.model_info(include_weights_digest=True).weights_digest == pristine
        assert client.list_edits() == []
