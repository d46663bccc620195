"""The real default model, edited and traced over gRPC as an operator would."""

from __future__ import annotations

import pytest

from editserve.client import Fact
from tests.server_process import start_server

pytestmark = [pytest.mark.real, pytest.mark.e2e]

PROMPT = "The mother tongue of Danielle Darrieux is"


@pytest.fixture(scope="module")
def server(tmp_path_factory, editserve_cache):
    root = tmp_path_factory.mktemp("real-edit")
    proc = start_server("smollm2-135m", root / "state", root / "logs", "--cache-dir", str(editserve_cache),
                        "--threads", "2")
    yield proc
    assert proc.stop() == 0, proc.log()


def test_edit_changes_generation_and_revert_restores_it(server):
    with server.client() as client:
        pristine = client.model_info(include_weights_digest=True).weights_digest
        before = client.generate(PROMPT, max_new_tokens=6)
        fact = Fact("The mother tongue of {} is", "Danielle Darrieux", "English", "French",
                    paraphrase_prompts=("Danielle Darrieux, a native speaker of",),
                    neighborhood_prompts=("The mother tongue of Léon Blum is",))
        result = client.edit(fact)
        rewrite = result.facts[0].rewrite
        assert rewrite.p_new_after > 0.5 > rewrite.p_new_before
        assert rewrite.p_new_after > rewrite.p_true_after
        after = client.generate(PROMPT, max_new_tokens=6)
        assert "English" in after.text and after.revision == result.revision
        # side effects are visible as drift metrics within a moment of the apply
        import time

        # (wait for the measurement of the edit's revision: the start-up one reads ~0, not 0)
        deadline = time.monotonic() + 30
        while client.model_info().drift_revision != result.revision and time.monotonic() < deadline:
            time.sleep(0.2)
        info = client.model_info()
        assert info.drift_revision == result.revision and info.drift_kl > 1e-4
        while server.metric("editserve_drift_kl_divergence") < 1e-4 and time.monotonic() < deadline:
            time.sleep(0.05)  # the gauge is set just after the measurement is recorded
        assert server.metric("editserve_drift_kl_divergence") > 1e-4
        client.revert(result.edit_id)
        assert client.generate(PROMPT, max_new_tokens=6).text == before.text
        assert client.model_info(include_weights_digest=True).weights_digest == pristine


def test_trace_finds_the_subject(server):
    with server.client() as client:
        trace = client.trace("The Space Needle is located in the city of", "The Space Needle", samples=3,
                             answer="Seattle")
    assert trace.answer.strip() == "Seattle"
    assert trace.clean_prob > trace.corrupted_prob
    assert set(trace.grids) == {"hidden", "mlp", "attn"}
    hidden = trace.grids["hidden"]
    assert len(hidden) == len(trace.tokens) and len(hidden[0]) == 30
    # restoring the residual stream at the last subject token, early on, recovers most of the answer
    last_subject = trace.subject_end - 1
    assert max(hidden[last_subject][:10]) > trace.corrupted_prob + 0.5 * (trace.clean_prob - trace.corrupted_prob)


def test_memit_writes_a_batch_that_generation_follows(server):
    """Four capitals in one MEMIT edit: generation says the new ones, a close neighbour (another
    capital) keeps its own, and the revert restores the weights bit for bit."""
    edits = {"France": ("Rome", "Paris"), "Japan": ("Cairo", "Tokyo"), "Spain": ("Lisbon", "Madrid"),
             "Norway": ("Stockholm", "Oslo")}
    facts = [Fact("The capital of {} is", country, new, true) for country, (new, true) in edits.items()]
    with server.client() as client:
        pristine = client.model_info(include_weights_digest=True).weights_digest
        neighbour_before = client.generate("The capital of Germany is", max_new_tokens=4).text
        result = client.edit(facts, method="memit")
        assert result.edit.layers == [3, 4, 5, 6, 7] and len(result.facts) == 4
        for report in result.facts:
            assert report.rewrite.p_new_after > report.rewrite.p_true_after, report
        for country, (new, _true) in edits.items():
            assert new in client.generate(f"The capital of {country} is", max_new_tokens=4).text
        assert "Berlin" in neighbour_before
        assert client.generate("The capital of Germany is", max_new_tokens=4).text == neighbour_before
        client.revert(result.edit_id)
        assert client.model_info(include_weights_digest=True).weights_digest == pristine
