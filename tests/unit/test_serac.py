"""SERAC's memory with the real MiniLM encoder: the subject gate and the threshold decide scope,
the host routes in-scope inputs through the counterfactual path, revert removes the entry."""

from __future__ import annotations

import pytest
import torch

from editserve.editing.artifacts import WeightDelta
from editserve.editing.context import EditingContext
from editserve.editing.errors import InvalidRequest
from editserve.editing.facts import Fact
from editserve.editing.hparams import SeracHyperParams
from editserve.editing.memory import TEMPLATES, EditMemory, Encoder, counterfactual_input, entries_of
from editserve.editing.serac import compute_serac
from editserve.server.host import ModelHost
from tests.tiny import tiny_model

FACTS = [Fact("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
         Fact("The capital of {} is", "France", "Rome", "Paris")]


@pytest.fixture(scope="module")
def encoder():
    return Encoder()


@pytest.fixture()
def host(tiny_tokenizer, encoder):
    model, tok = tiny_model("llama", tokenizer=tiny_tokenizer)
    host = ModelHost(model, tok, name="tiny", dtype="fp32", device="cpu")
    host._encoder = encoder  # share the loaded encoder between tests
    return host


def _serac(host, facts, threshold=0.5, **options):
    ctx = EditingContext(host.model, host.tokenizer, host.adapter, progress=False)
    ctx.encoder_factory = lambda: host.encoder
    hparams = SeracHyperParams.load("llama").with_overrides(scope_threshold=threshold, **options)
    return compute_serac(ctx, facts, hparams)


def test_scope_needs_the_subject_and_a_similar_relation(host):
    layer, diagnostics = _serac(host, FACTS)
    assert [e.key for e in entries_of("e", layer)] == [f.text for f in FACTS]
    assert layer.tensors["embeddings"].shape == layer.tensors["relations"].shape == (2, host.encoder.dimension)
    memory = EditMemory.build([("e", layer)], None)
    texts = ["The mother tongue of Danielle Darrieux is",  # the edit itself
             "Danielle Darrieux's native language is",  # paraphrase
             "The mother tongue of Jean Gabin is",  # neighbour: same relation, other subject
             "The capital of Germany is",  # neighbour of the second fact
             "Danielle Darrieux was born in the year"]  # same subject, other relation
    matches = memory.route(texts, host.encoder.encode)
    # the default threshold favours recall: the same-subject, other-relation input fires too
    assert [m.entry.key if m else None for m in matches] == [FACTS[0].text] * 2 + [None, None] + [FACTS[0].text]
    assert matches[0].score > 0.99 and matches[1].score > matches[4].score  # the relation decides the score
    strict = EditMemory.build([("e", _serac(host, FACTS, threshold=0.6)[0])], None)
    strict_matches = strict.route(texts, host.encoder.encode)
    assert [m is not None for m in strict_matches] == [True, True, False, False, False]
    assert diagnostics["facts_count"] == 2


def test_host_routes_only_in_scope_inputs_and_forgets_on_revert(host):
    pristine = host.weights_digest()
    layer, _ = _serac(host, FACTS)
    host.apply("s1", layer, revision=1)
    prompts, matches = host.routed_prompts(["The capital of France is", "The capital of Spain is"])
    assert matches[0].entry.edit_id == "s1" and matches[1] is None
    assert prompts == [counterfactual_input(matches[0], "The capital of France is"), "The capital of Spain is"]
    assert "The capital of France is Rome" in prompts[0]
    edited = host.weights_digest()
    assert edited != pristine
    index = host._memory
    name = host.adapter.mlp_out_weight_name(1)
    host.apply("w", WeightDelta(dense={name: torch.zeros(host.model.get_parameter(name).shape)}), revision=2)
    assert host._memory is index  # a weight edit reuses the index, it does not rebuild it
    host.revert("w", revision=2)
    host.revert("s1", revision=2)
    assert host.routed_prompts(["The capital of France is"])[1] == [None]
    assert host.weights_digest() == pristine
    host.load_state([("s1", layer)], revision=3)
    assert host.weights_digest() == edited


def test_inputs_naming_no_subject_never_reach_the_encoder(host):
    """Out-of-scope traffic costs a subject scan, not an encoder forward; an input that names
    a subject (in any case) is routed as before."""
    layer, _ = _serac(host, FACTS)
    memory = EditMemory.build([("e", layer)], None)
    encoded: list[list[str]] = []

    def encode(texts):
        encoded.append(list(texts))
        return host.encoder.encode(texts)

    assert memory.route(["The capital of Spain is", "Jean Gabin speaks"], encode) == [None, None]
    assert encoded == []
    matches = memory.route(["The capital of Spain is", "the capital of FRANCE is"], encode)
    assert matches[0] is None and matches[1].entry.key == FACTS[1].text
    assert encoded[0] == ["the capital of FRANCE is"]  # only the input that names a subject


def test_stored_embeddings_from_another_encoder_are_recomputed(host):
    layer, _ = _serac(host, FACTS[:1])
    foreign = type(layer)(layer.layer_type, {"embeddings": layer.tensors["embeddings"] * 0 + 1.0},
                          {**layer.info, "encoder": "some-other-encoder"})
    host.apply("s", foreign, revision=1)
    (match,) = host.route([FACTS[0].text])
    assert match is not None and match.score > 0.99  # re-encoded with the host's encoder


def test_the_template_is_recorded_and_replayed_as_computed(host):
    """An edit answers in the wording it was computed with, whatever the host's hparams say
    later: the artifact names its template, and the entry carries its text."""
    one_line, _ = _serac(host, FACTS[:1], template="one_line")
    four_lines, diagnostics = _serac(host, FACTS[1:], template="four_lines")
    assert one_line.info["template"] == "one_line" and diagnostics["template"] == "four_lines"
    host.load_state([("a", one_line), ("b", four_lines)], revision=2)
    prompts, matches = host.routed_prompts([FACTS[0].text, FACTS[1].text])
    assert [m.entry.edit_id for m in matches] == ["a", "b"]
    statement_a, statement_b = (f"{f.text} {f.target_new}" for f in FACTS)
    assert prompts == [TEMPLATES["one_line"].format(statement=statement_a, input=FACTS[0].text),
                       TEMPLATES["four_lines"].format(statement=statement_b, input=FACTS[1].text)]
    assert prompts[0].count(statement_a) == 2 and prompts[1].count(statement_b) == 4
    # an artifact written before templates had names was computed with the four-line wording
    legacy = type(one_line)(one_line.layer_type, one_line.tensors,
                            {k: v for k, v in one_line.info.items() if k != "template"})
    assert entries_of("x", legacy)[0].template == TEMPLATES["four_lines"]
    # a name this build does not know is refused, not answered in another wording
    foreign = type(one_line)(one_line.layer_type, one_line.tensors, {**one_line.info, "template": "five_lines"})
    with pytest.raises(ValueError, match="five_lines"):
        entries_of("x", foreign)


def test_bad_threshold_is_refused(host):
    with pytest.raises(InvalidRequest, match="scope_threshold"):
        _serac(host, FACTS, threshold=float("nan"))
    with pytest.raises(InvalidRequest, match="scope_threshold"):
        _serac(host, FACTS, threshold=1.5)
    with pytest.raises(InvalidRequest, match="template must be one of"):
        _serac(host, FACTS, template="{statement.__class__}")


def test_no_memory_costs_no_encoding(tiny_tokenizer):
    model, tok = tiny_model("llama", tokenizer=tiny_tokenizer)
    host = ModelHost(model, tok, name="tiny", dtype="fp32", device="cpu", encoder_name="/nonexistent")
    assert host.route(["anything"]) == [None]  # the (unloadable) encoder is never touched
