"""ROME on tiny random models of every architecture: the edit works, the model is never written,
the artifact has the parameter's layout and rank one, and bad requests fail precisely."""

from __future__ import annotations

import threading

import pytest
import torch

from editserve.editing import values as V
from editserve.editing.artifacts import preview
from editserve.editing.context import EditingContext
from editserve.editing.contexts import generate_context_templates
from editserve.editing.errors import InvalidRequest, PreconditionFailed
from editserve.editing.facts import Fact
from editserve.editing.hooks import Trace, hooks_attached
from editserve.editing.hparams import RomeHyperParams, load_rome_hparams
from editserve.editing.keys import body_of, locate_subject, pad_id_of
from editserve.editing.rome import compute_rome
from editserve.editing.scoring import score
from tests.unit.rome_helpers import ARCHS, learnable_model, weights_digest

torch.set_num_threads(1)

# the tiny tokenizer knows " founded" as one token; "The language of {}" ends with the subject
FACT = Fact("The language of {}", "Danielle Darrieux", "founded", "French")
FACT_IS = Fact("The mother tongue of {} is", "Danielle Darrieux", "capital plays", "French")


def tiny_hparams(model, **overrides) -> RomeHyperParams:
    base = load_rome_hparams(model.config.model_type, model.config.num_hidden_layers
                             if hasattr(model.config, "num_hidden_layers") else None)
    settings = dict(layer=1, stats_tokens=2000, steps=40, context_count=3, context_length=5,
                    clamp_norm_factor=1e4, weight_decay=0.0)
    settings.update(overrides)
    return base.with_overrides(**settings)


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("rome-stats")


@pytest.mark.parametrize("arch", ARCHS)
def test_edit_raises_target_probability_without_touching_weights(arch, tiny_tokenizer, stats_dir):
    model, adapter = learnable_model(arch, tiny_tokenizer)
    ctx = EditingContext(model, tiny_tokenizer, adapter, stats_dir, progress=False)
    hparams = tiny_hparams(model)
    before_digest = weights_digest(model)
    before = score(model, tiny_tokenizer, [FACT.text], [FACT.target_new])[0].probability

    delta, diagnostics = compute_rome(ctx, [FACT], hparams)

    assert weights_digest(model) == before_digest
    assert hooks_attached(model) == 0
    with preview(model, delta):
        after = score(model, tiny_tokenizer, [FACT.text], [FACT.target_new])[0].probability
    assert after > 0.3 and after > 100 * before, (before, after, diagnostics)

    name = adapter.mlp_out_weight_name(hparams.layer)
    assert delta.parameter_names == [name]
    param = model.get_parameter(name)
    dense = delta.delta(name)
    assert dense.shape == param.shape and dense.dtype == torch.float32
    assert torch.linalg.matrix_rank(dense).item() == 1
    u, v = delta.factors[name]
    assert u.shape[1] == v.shape[1] == 1
    assert diagnostics["layer"] == hparams.layer and diagnostics["layers"] == [hparams.layer]
    assert diagnostics["steps"][0] <= hparams.steps and "total_s" in diagnostics["timings"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_multi_token_target_after_the_subject(arch, tiny_tokenizer, stats_dir):
    """The target follows " is", after the subject: the change must travel through attention."""
    model, adapter = learnable_model(arch, tiny_tokenizer)
    ctx = EditingContext(model, tiny_tokenizer, adapter, stats_dir, progress=False)
    before = score(model, tiny_tokenizer, [FACT_IS.text], [FACT_IS.target_new])[0]
    delta, _ = compute_rome(ctx, [FACT_IS], tiny_hparams(model))
    with preview(model, delta):
        after = score(model, tiny_tokenizer, [FACT_IS.text], [FACT_IS.target_new])[0]
    assert after.mean_logprob > before.mean_logprob + 2.0


@pytest.mark.parametrize("skip_lower", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_cached_prefix_runner_matches_full_forward(arch, skip_lower, tiny_tokenizer):
    """The speed tricks (prefix run once, suffix per step; with ``skip_lower`` each step starting
    at the edited layer from its cached input) give the logits of plain forwards."""
    model, adapter = learnable_model(arch, tiny_tokenizer)
    # the last template is longer than tiny Gemma-3's sliding window (16): layer types matter
    templates = ["{}", "The capital of France is Paris. {}", "Apple. {}",
                 "Michael Jordan plays the sport of basketball, and more. {}",
                 "Michael Jordan plays the sport of basketball. The capital of France is Paris, and more. {}"]
    prompts = [locate_subject(tiny_tokenizer, t, "{} is located in", "The Space Needle") for t in templates]
    targets = V.target_ids(tiny_tokenizer, prompts[0].text, "Seattle city")
    rows = [(p.ids + tuple(targets[:-1]), p.subject_last) for p in prompts]
    kl = locate_subject(tiny_tokenizer, "{}", "{} is a", "The Space Needle")
    rows.append((kl.ids, kl.subject_last))
    spec = V.FactRows(tuple(rows), tuple(targets), len(prompts))
    batch = V._build_batch([spec], [(0, r) for r in range(len(rows))], pad_id_of(tiny_tokenizer), "cpu")
    layer = 1  # Gemma-3 alternates sliding and full attention: starting at 1 shifts the pattern
    upper = V._upper_stack(model, adapter.mlp_out(layer)) if skip_lower else None
    if skip_lower:  # every architecture but GPT-2 (absolute positions added to inputs_embeds)
        assert (upper is None) == (arch == "gpt2")
        assert upper is None or (upper.start == layer and len(upper.body.layers) == adapter.num_layers - layer)
        assert len(body_of(model).layers if arch != "gpt2" else body_of(model).h) == adapter.num_layers
    runner = V._Runner(model, adapter.mlp_out(layer), batch, upper=upper)
    delta = torch.randn(adapter.hidden_size)
    logits, _ = runner.logits(delta.expand(len(rows), -1))

    head = model.get_output_embeddings()
    expected = []
    for i, (ids, s) in enumerate(rows):
        def add(out, _name, s=s):
            out = out.clone()
            out[:, s] += delta
            return out

        with Trace(model, adapter.mlp_out(layer), retain_output=False, edit_output=add):
            hidden = body_of(model)(input_ids=torch.tensor([ids])).last_hidden_state[0]
        for k in (batch.loss_rows == i).nonzero()[:, 0]:
            expected.append(head(hidden[s + batch.loss_cols[k]]))
    torch.testing.assert_close(logits, torch.stack(expected), atol=1e-4, rtol=1e-4)


def test_several_facts_compose_into_one_delta(tiny_tokenizer, stats_dir):
    model, adapter = learnable_model("llama", tiny_tokenizer)
    ctx = EditingContext(model, tiny_tokenizer, adapter, stats_dir, progress=False)
    second = Fact("The capital of {}", "Italy", "founded", "Rome")
    delta, diagnostics = compute_rome(ctx, [FACT, second], tiny_hparams(model))
    name = delta.parameter_names[0]
    assert delta.factors[name][0].shape[1] == 2 and len(diagnostics["steps"]) == 2
    with preview(model, delta):
        after = score(model, tiny_tokenizer, [FACT.text, second.text], ["founded", "founded"])
    assert all(s.probability > 0.3 for s in after)


def test_compute_runs_beside_generation_without_leaking(tiny_tokenizer, stats_dir):
    """Another thread's forward passes see the served weights while an edit is computed."""
    model, adapter = learnable_model("llama", tiny_tokenizer)
    ctx = EditingContext(model, tiny_tokenizer, adapter, stats_dir, progress=False)
    ids = torch.tensor([tiny_tokenizer(FACT.text).input_ids])
    with torch.no_grad():
        reference = model(ids).logits
    errors: list[BaseException] = []

    def edit():
        try:
            compute_rome(ctx, [FACT], tiny_hparams(model, steps=20))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=edit)
    worker.start()
    while worker.is_alive():
        with torch.no_grad():
            assert torch.equal(model(ids).logits, reference)
    worker.join()
    assert not errors and hooks_attached(model) == 0


def test_bad_requests_raise_precise_errors(tiny_tokenizer, stats_dir, tmp_path):
    model, adapter = learnable_model("llama", tiny_tokenizer)
    ctx = EditingContext(model, tiny_tokenizer, adapter, stats_dir, progress=False)
    hp = tiny_hparams(model, steps=2)
    with pytest.raises(InvalidRequest, match="exactly one"):
        compute_rome(ctx, [Fact("The language of", "X", "founded")], hp)
    with pytest.raises(InvalidRequest, match="exactly one"):
        compute_rome(ctx, [Fact("{} and {}", "X", "founded")], hp)
    with pytest.raises(InvalidRequest, match="out of range"):
        compute_rome(ctx, [FACT], hp.with_overrides(layer=99))
    with pytest.raises(InvalidRequest, match="target_new is empty"):
        compute_rome(ctx, [Fact("The language of {}", "X", "   ")], hp)
    with pytest.raises(InvalidRequest):
        compute_rome(ctx, [], hp)
    with pytest.raises(InvalidRequest, match="unknown rome option"):
        hp.with_overrides(momentum=3)
    with pytest.raises(InvalidRequest, match="steps"):
        hp.with_overrides(steps=-1)
    with pytest.raises(PreconditionFailed, match="does not exist"):
        compute_rome(ctx, [FACT], hp.with_overrides(stats_source=str(tmp_path / "missing")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PreconditionFailed, match="no .txt files"):
        compute_rome(ctx, [FACT], hp.with_overrides(stats_source=str(empty)))
    assert hooks_attached(model) == 0


def test_subject_token_location(tiny_tokenizer):
    with pytest.raises(InvalidRequest, match="empty"):
        locate_subject(tiny_tokenizer, "{}", "The language of {}", "")
    located = locate_subject(tiny_tokenizer, "Apple. {}", "The language of {} is", "Danielle Darrieux")
    text_through_subject = located.text[: located.text.index("Darrieux") + len("Darrieux")]
    assert located.subject_last == len(tiny_tokenizer(text_through_subject).input_ids) - 1


def test_diverged_optimisation_is_a_precondition_failure(tiny_tokenizer, stats_dir):
    model, adapter = learnable_model("llama", tiny_tokenizer)
    ctx = EditingContext(model, tiny_tokenizer, adapter, stats_dir, progress=False)
    ctx.second_moment(tiny_hparams(model).layer, "default", 2000)  # statistics and contexts
    ctx.context_templates(3, 5)                                     # from the sane model
    with torch.no_grad():
        model.get_submodule(adapter.final_norm_name).weight[0] = float("nan")
    with pytest.raises(PreconditionFailed, match="diverged"):
        compute_rome(ctx, [FACT], tiny_hparams(model))
    with pytest.raises(PreconditionFailed, match="non-finite"):
        generate_context_templates(model, tiny_tokenizer, count=2, length=3)


def test_hparams_files_and_overrides():
    llama = load_rome_hparams("llama")
    assert llama.version.startswith("rome-llama") and llama.tuned_num_layers == 30
    assert load_rome_hparams("gemma3_text").version.startswith("rome-gemma3")
    generic = load_rome_hparams("some_new_family", 12)
    assert generic.version.startswith("rome-default") and 0 <= generic.layer < 12
    assert load_rome_hparams("llama", 4).layer < 4
    changed = llama.with_overrides(learning_rate=0.1, steps=7, layer=3, stats_source="/data")
    assert (changed.lr, changed.steps, changed.layer, changed.stats_source) == (0.1, 7, 3, "/data")
    assert changed.for_depth(4).layer == 3  # an explicit layer is pinned
    with pytest.raises(InvalidRequest):
        llama.with_overrides(steps=2.5)
    assert llama.skip_lower_layers and not llama.with_overrides(skip_lower_layers="false").skip_lower_layers
    with pytest.raises(InvalidRequest, match="skip_lower_layers"):
        llama.with_overrides(skip_lower_layers="maybe")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_skipping_lower_layers_gives_the_same_edit(arch, tiny_tokenizer, stats_dir):
    """The upper-stack fast path changes speed only: same steps, same update (fp32 noise)."""
    model, adapter = learnable_model(arch, tiny_tokenizer)
    ctx = EditingContext(model, tiny_tokenizer, adapter, stats_dir, progress=False)
    fast, fast_diag = compute_rome(ctx, [FACT], tiny_hparams(model, steps=10))
    plain, plain_diag = compute_rome(ctx, [FACT], tiny_hparams(model, steps=10, skip_lower_layers=False))
    name = fast.parameter_names[0]
    assert fast_diag["steps"] == plain_diag["steps"]
    torch.testing.assert_close(fast.delta(name), plain.delta(name), atol=1e-4, rtol=1e-3)


def test_context_templates_are_deterministic(tiny_tokenizer):
    model, _ = learnable_model("gpt2", tiny_tokenizer)
    first = generate_context_templates(model, tiny_tokenizer, count=4, length=5, seed=1)
    assert first == generate_context_templates(model, tiny_tokenizer, count=4, length=5, seed=1)
    assert first[0] == "{}" and len(first) == 5
    assert all(t.count("{}") == 1 and t.endswith("{}") for t in first)
    assert generate_context_templates(model, tiny_tokenizer, count=0, length=5) == ["{}"]
