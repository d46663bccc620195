"""T-Patcher on tiny random models: the neurons write the fact, stay silent on unrelated text,
never touch a base weight, and the host adds and removes them exactly."""

from __future__ import annotations

import pytest
import torch

from editserve.editing.artifacts import RuntimeLayer, WeightDelta, load_artifact, preview, save_artifact
from editserve.editing.context import EditingContext
from editserve.editing.errors import InvalidRequest
from editserve.editing.facts import Fact
from editserve.editing.hooks import hooks_attached
from editserve.editing.hparams import TPatcherHyperParams
from editserve.editing.neurons import LAYER_TYPE, bank_of, check_fits
from editserve.editing.scoring import score
from editserve.editing.tpatcher import compute_tpatcher, memory_inputs
from editserve.server.host import ModelHost
from tests.unit.rome_helpers import ARCHS, learnable_model, weights_digest

torch.set_num_threads(1)

FACTS = [
    Fact("The language of {}", "Danielle Darrieux", "founded", "French"),
    Fact("The capital of {}", "Italy", "founded", "Rome"),
]


def tiny_tpatcher(model, **overrides) -> TPatcherHyperParams:
    settings = dict(layer=3, steps=80, learning_rate=0.05, context_count=2, context_length=5, memory_rows=16,
                    clamp_norm_factor=1e4, weight_decay=0.0)
    settings.update(overrides)
    return TPatcherHyperParams.load(model.config.model_type, 4).with_overrides(**settings)


def _probabilities(model, tokenizer, facts):
    return [s.probability for s in score(model, tokenizer, [f.text for f in facts], [f.target_new for f in facts])]


@pytest.mark.parametrize("fire_at", ["last", "subject"])
@pytest.mark.parametrize("arch", ARCHS)
def test_neurons_write_the_facts_and_leave_the_weights(arch, fire_at, tiny_tokenizer, tmp_path):
    model, adapter = learnable_model(arch, tiny_tokenizer, edit_layer=3)  # Gemma: lets layer 3's FFN move the residual
    ctx = EditingContext(model, tiny_tokenizer, adapter, tmp_path, progress=False)
    digest = weights_digest(model)
    before = _probabilities(model, tiny_tokenizer, FACTS)

    layer, diagnostics = compute_tpatcher(ctx, FACTS, tiny_tpatcher(model, fire_at=fire_at))

    assert weights_digest(model) == digest and hooks_attached(model) == 0
    assert layer.layer_type == LAYER_TYPE and layer.info["module"] == adapter.mlp(3)
    bank = bank_of(layer)
    assert bank.size == len(FACTS) and bank.keys.shape[1] == adapter.hidden_size
    with preview(model, layer):
        after = _probabilities(model, tiny_tokenizer, FACTS)
    for b, a in zip(before, after, strict=True):
        assert a > 0.5 and a > 10 * b, (arch, before, after, diagnostics["facts"])
    # silent on the unrelated text it was trained against
    memory = memory_inputs(ctx, adapter.mlp(3), 16)
    assert (bank.activations(memory) > 0).float().mean() < 0.05
    assert diagnostics["layers"] == [3] and len(diagnostics["facts"]) == len(FACTS)


def test_host_adds_and_removes_neurons_exactly(tiny_tokenizer, tmp_path):
    model, adapter = learnable_model("llama", tiny_tokenizer)
    host = ModelHost(model, tiny_tokenizer, name="tiny", dtype="fp32", device="cpu")
    ctx = EditingContext(model, tiny_tokenizer, adapter, tmp_path, progress=False)
    pristine_digest = host.weights_digest()
    prompt = tiny_tokenizer(FACTS[0].text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        pristine_logits = model(prompt).logits

    patch, _ = compute_tpatcher(ctx, FACTS[:1], tiny_tpatcher(model))
    name = adapter.mlp_out_weight_name(1)
    weight_edit = WeightDelta(dense={name: torch.randn(model.get_parameter(name).shape) * 0.01})
    host.apply("w", weight_edit, revision=1)
    after_weight = host.weights_digest()
    host.apply("p", patch, revision=2)
    assert host.weights_digest() not in (pristine_digest, after_weight)
    assert _probabilities(model, tiny_tokenizer, FACTS[:1])[0] > 0.5  # served, not previewed

    host.revert("p", revision=3)
    assert host.weights_digest() == after_weight
    host.revert("w", revision=4)
    assert host.weights_digest() == pristine_digest
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, pristine_logits)

    # replay of the same active set gives the same served state as applying one by one
    host.apply("p", patch, revision=5)
    applied = host.weights_digest()
    replayed = ModelHost(learnable_model("llama", tiny_tokenizer)[0], tiny_tokenizer, name="tiny", dtype="fp32",
                         device="cpu")
    replayed.load_state([("p", patch)], revision=5)
    assert replayed.weights_digest() == applied


def test_artifact_round_trip_and_fit_checks(tiny_tokenizer, tmp_path):
    model, adapter = learnable_model("gpt2", tiny_tokenizer)
    ctx = EditingContext(model, tiny_tokenizer, adapter, tmp_path, progress=False)
    patch, _ = compute_tpatcher(ctx, FACTS[:1], tiny_tpatcher(model, steps=5))
    save_artifact(patch, tmp_path / "p.safetensors")
    loaded = load_artifact(tmp_path / "p.safetensors")
    assert isinstance(loaded, RuntimeLayer) and loaded.info == patch.info
    assert all(torch.equal(loaded.tensors[k], patch.tensors[k]) for k in patch.tensors)
    check_fits(model, loaded)
    narrow = RuntimeLayer(LAYER_TYPE, {k: v[:, :-1] if v.dim() == 2 else v for k, v in patch.tensors.items()},
                          dict(patch.info))
    with pytest.raises(ValueError, match="width"):
        check_fits(model, narrow)
    poisoned = RuntimeLayer(LAYER_TYPE, {**patch.tensors, "values": patch.tensors["values"] * float("nan")},
                            dict(patch.info))
    with pytest.raises(ValueError, match="NaN"):
        check_fits(model, poisoned)


@pytest.mark.parametrize("overrides, message", [
    ({"layer": 4}, "layer"),
    ({"steps": 0}, "steps"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"memory_margin": 1.0}, "memory_margin"),
    ({"neurons_per_fact": 100}, "neurons_per_fact"),
    ({"key_steps": 0}, "key_steps"),
    ({"key_steps": 5001}, "key_steps"),
])
def test_bad_options_are_refused_before_compute(overrides, message, tiny_tokenizer, tmp_path):
    model, adapter = learnable_model("llama", tiny_tokenizer)
    ctx = EditingContext(model, tiny_tokenizer, adapter, tmp_path, progress=False)
    with pytest.raises(InvalidRequest, match=message):
        compute_tpatcher(ctx, FACTS, tiny_tpatcher(model, **overrides))


def test_bank_reads_only_the_neurons_that_fire():
    from editserve.editing.neurons import NeuronBank

    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    biases = torch.full((6,), -100.0)
    biases[[1, 4]] = 0.0  # two neurons can fire; four never do
    bank = NeuronBank(keys, biases, values)
    x = torch.randn(2, 3, 8, generator=generator)
    dense = torch.relu(x @ keys.T + biases) @ values
    torch.testing.assert_close(bank.contribution(x), dense)
    torch.testing.assert_close(bank(x), dense)
    silent = NeuronBank(keys, torch.full((6,), -100.0), values)
    assert silent.contribution(x) is None
    assert torch.equal(silent(x), torch.zeros_like(x))
    # gradients reach exactly the values of neurons that fired
    trained = values.clone().requires_grad_(True)
    NeuronBank(keys, biases, trained)(x).sum().backward()
    assert trained.grad[[0, 2, 3, 5]].abs().sum() == 0 and trained.grad[[1, 4]].abs().sum() > 0


def test_subject_neuron_fires_on_the_subject_and_not_on_other_subjects(tiny_tokenizer, tmp_path):
    """fire_at=subject: the neuron fires at the subject's last token of the fact's prompt and
    is silent (ReLU zero) at every token of the same prompt about another subject, including
    subjects it never saw as negatives, and on every token of unrelated text."""
    from editserve.editing.keys import locate_subject
    from editserve.editing.tpatcher import _module_inputs, other_subjects

    model, adapter = learnable_model("llama", tiny_tokenizer, edit_layer=3)
    ctx = EditingContext(model, tiny_tokenizer, adapter, tmp_path, progress=False)
    fact = FACTS[0]
    layer, diagnostics = compute_tpatcher(ctx, [fact], tiny_tpatcher(model, fire_at="subject", negatives=8))
    bank, module = bank_of(layer), adapter.mlp(3)
    assert diagnostics["facts"][0]["edit_firing_rate"] == 1.0

    own = locate_subject(tiny_tokenizer, "{}", fact.prompt, fact.subject)
    x, _ = _module_inputs(ctx, module, [own.ids])
    assert float(bank.activations(x[0, own.subject_last])[0]) > 0

    others = [s for s in other_subjects() if s != fact.subject]  # 8 of these were negatives, the rest never seen
    rows = [tuple(tiny_tokenizer(fact.prompt.replace("{}", s)).input_ids) for s in others]
    x, mask = _module_inputs(ctx, module, rows)
    fired = (bank.activations(x[mask.bool()]) > 0).float().mean()
    assert fired < 0.02, f"fires on {float(fired):.1%} of other subjects' tokens"
    assert (bank.activations(memory_inputs(ctx, module, 16)) > 0).float().mean() < 0.02


def test_patched_prompts_lists_each_fact_once_for_its_module():
    from editserve.editing.neurons import patched_prompts

    tensors = {"keys": torch.zeros(1, 4), "biases": torch.zeros(1), "values": torch.zeros(1, 4)}
    first = RuntimeLayer(LAYER_TYPE, tensors, {"module": "m.3", "prompts": [["Italy", "The capital of Italy"]]})
    again = RuntimeLayer(LAYER_TYPE, tensors, {"module": "m.3", "prompts": [["Italy", "The capital of Italy"],
                                                                            ["Rome", "Rome is in"]]})
    elsewhere = RuntimeLayer(LAYER_TYPE, tensors, {"module": "m.5", "prompts": [["Paris", "Paris is in"]]})
    older = RuntimeLayer(LAYER_TYPE, tensors, {"module": "m.3"})  # made before prompts were recorded
    assert patched_prompts([first, elsewhere, older, again], "m.3") == [("Italy", "The capital of Italy"),
                                                                      ("Rome", "Rome is in")]
    assert patched_prompts([first], "m.5") == []


def test_a_new_neuron_learns_silence_on_the_facts_already_patched(tiny_tokenizer, tmp_path):
    """With ``avoid_patched`` every token of the active patches' prompts joins the negatives
    (except a fact about the same subject, whose inputs are the new fact's own), and the host
    lists exactly the active edits' prompts."""
    from editserve.editing.tpatcher import _module_inputs

    model, adapter = learnable_model("llama", tiny_tokenizer, edit_layer=3)
    host = ModelHost(model, tiny_tokenizer, name="tiny", dtype="fp32", device="cpu")
    ctx = EditingContext(model, tiny_tokenizer, adapter, tmp_path, progress=False)
    ctx.neuron_prompts = host.active_neuron_prompts  # as the server wires it
    module = adapter.mlp(3)
    first, _ = compute_tpatcher(ctx, FACTS[:1], tiny_tpatcher(model, fire_at="subject", negatives=8))
    assert first.info["prompts"] == [[FACTS[0].subject, FACTS[0].text]]
    host.apply("a", first, revision=1)
    assert host.active_neuron_prompts(module) == [(FACTS[0].subject, FACTS[0].text)]

    other = Fact("The sound of {}", "Marie Curie", "capital", "French")
    hp = tiny_tpatcher(model, fire_at="subject", negatives=8, steps=400)
    _, guarded = compute_tpatcher(ctx, [other], hp)
    _, unguarded = compute_tpatcher(ctx, [other], hp.with_overrides(avoid_patched=False))
    tokens = len(tiny_tokenizer(FACTS[0].text).input_ids)
    assert guarded["facts"][0]["patched_negatives"] == tokens
    assert unguarded["facts"][0]["patched_negatives"] == 0
    same_subject = Fact("The home of {}", FACTS[0].subject, "capital", "Paris")
    _, same = compute_tpatcher(ctx, [same_subject], hp)
    assert same["facts"][0]["patched_negatives"] == 0

    # A subject whose unguarded neuron fires on the first fact's prompt: the guard pushes its
    # activation there down, and it still fires on its own fact. (A tiny random model with a
    # character-level tokenizer cannot separate many inputs, so the fit lowers the firing
    # rather than silencing it; on SmolLM2 it silences it: docs/RUNTIME_EDITS.md.)
    x, mask = _module_inputs(ctx, module, [tuple(tiny_tokenizer(FACTS[0].text).input_ids)])
    on_first = x[mask.bool()]
    near = Fact("The sound of {}", "Daniel Craig", "capital", "French")
    loose, _ = compute_tpatcher(ctx, [near], hp.with_overrides(avoid_patched=False))
    tight, tight_info = compute_tpatcher(ctx, [near], hp)
    loose_max = float(bank_of(loose).activations(on_first).max())
    tight_max = float(bank_of(tight).activations(on_first).max())
    assert loose_max > 0 and tight_max < loose_max - 0.2, (loose_max, tight_max)
    assert tight_info["facts"][0]["edit_firing_rate"] == 1.0

    # facts of one edit avoid the ones before them in that edit too
    _, both = compute_tpatcher(ctx, [other, FACTS[1]], hp)
    assert both["facts"][1]["patched_negatives"] == tokens + len(tiny_tokenizer(other.text).input_ids)

    host.revert("a", revision=2)
    assert host.active_neuron_prompts(module) == []
