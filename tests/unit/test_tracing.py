"""Causal tracing on tiny random models of every architecture.

The batched tracer must give the numbers of the straightforward one (one whole forward pass
per restoration, in bench/trace_naive.py), and the numbers must mean what they say: restoring
a state that carries everything gives the clean probability, restoring nothing the corrupted.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.trace_naive import causal_trace_naive
from editserve.editing.adapter import ArchitectureAdapter
from editserve.editing.errors import InvalidRequest
from editserve.editing.hooks import hooks_attached
from editserve.editing.tracing import causal_trace, embedding_noise_scale
from tests.tiny import ARCHITECTURES, tiny_model

torch.set_num_threads(1)

PROMPT = "The Space Needle is located in the city of"  # 23 tokens here: longer than gemma3's window
SHORT = "The Space Needle is in"  # 12 tokens
SUBJECT = "Space Needle"
FAST = dict(samples=2, window=3, noise_scale=0.5, seed=0)


def _close(a, b, rtol=1e-4):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-9)


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    out = {}
    for arch in ARCHITECTURES:
        model, tok = tiny_model(arch, tokenizer=tiny_tokenizer)
        out[arch] = (model, tok, ArchitectureAdapter.from_model(model))
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_tracer_equals_straightforward(models, arch):
    model, tok, adapter = models[arch]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # gemma3's sliding window (16) is shorter than PROMPT: the cached prefixes take the other path
    prompt = PROMPT if arch == "gemma3" else SHORT
    fast = causal_trace(model, tok, adapter, prompt, SUBJECT, **FAST)
    slow = causal_trace_naive(model, tok, adapter, prompt, SUBJECT, **FAST)
    assert fast.tokens == slow.tokens and fast.subject_range == slow.subject_range == (1, 10)
    assert fast.answer_token_ids == slow.answer_token_ids
    _close(fast.clean_prob, slow.clean_prob)
    _close(fast.corrupted_prob, slow.corrupted_prob)
    for kind in ("hidden", "mlp", "attn"):
        assert fast.grids[kind].shape == (len(fast.tokens), adapter.num_layers)
        _close(fast.grids[kind], slow.grids[kind])
    assert hooks_attached(model) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "weights changed"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_many_small_chunks_equal_straightforward(models, arch, monkeypatch):
    """Restorations split over many chunks (as a long prompt is) give the same grids."""
    from editserve.editing import tracing

    monkeypatch.setattr(tracing, "_CHUNK_TOKENS", 8)  # one or two restorations per chunk
    model, tok, adapter = models[arch]
    prompt = PROMPT if arch == "gemma3" else SHORT
    fast = causal_trace(model, tok, adapter, prompt, SUBJECT, **FAST)
    slow = causal_trace_naive(model, tok, adapter, prompt, SUBJECT, **FAST)
    for kind in ("hidden", "mlp", "attn"):
        _close(fast.grids[kind], slow.grids[kind])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bf16_precision_stays_close_to_the_exact_grids(models, arch):
    """precision="bf16" is not exact, but its grids must keep the exact method's shape: every
    grid correlates with the straightforward fp32 one (r >= 0.98), no cell is off by more than
    a quarter of that grid's range, and the model (fp32 weights, no hooks) is untouched."""
    model, tok, adapter = models[arch]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = PROMPT if arch == "gemma3" else SHORT
    kwargs = dict(samples=2, window=3, noise_scale=2.0, seed=0)
    fast = causal_trace(model, tok, adapter, prompt, SUBJECT, precision="bf16", **kwargs)
    exact = causal_trace(model, tok, adapter, prompt, SUBJECT, **kwargs)
    slow = causal_trace_naive(model, tok, adapter, prompt, SUBJECT, **kwargs)
    assert fast.precision == "bf16" and exact.precision == "model"
    _close(fast.clean_prob, slow.clean_prob, 2e-2)
    _close(fast.corrupted_prob, slow.corrupted_prob, 2e-2)
    start = fast.subject_range[0]
    for kind in ("hidden", "mlp", "attn"):
        ours, reference = fast.grids[kind][start:].ravel(), slow.grids[kind][start:].ravel()
        assert np.corrcoef(ours, reference)[0, 1] >= 0.98, kind
        assert np.abs(ours - reference).max() <= 0.25 * np.ptp(reference), kind
    # bf16 really was used: its grids are not the exact ones
    assert any(not np.array_equal(fast.grids[k], exact.grids[k]) for k in fast.grids)
    assert hooks_attached(model) == 0
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in model.state_dict().items())


@pytest.mark.parametrize("window", [1, 2, 4])
def test_every_window_equals_straightforward(models, window):
    """Windows clipped at the first layer share computation; window 4 restores all layers."""
    model, tok, adapter = models["llama"]
    kwargs = dict(FAST, window=window, kinds=("mlp", "attn"))
    fast = causal_trace(model, tok, adapter, "The capital of France is", "capital", **kwargs)
    slow = causal_trace_naive(model, tok, adapter, "The capital of France is", "capital", **kwargs)
    for kind in ("mlp", "attn"):
        _close(fast.grids[kind], slow.grids[kind])


def test_restoring_the_state_that_carries_everything_gives_clean(models):
    model, tok, adapter = models["llama"]
    result = causal_trace(model, tok, adapter, PROMPT, SUBJECT, samples=4, window=1, noise_scale=2.0)
    last_layer = result.grids["hidden"][:, -1]
    # a random model's output barely depends on its input: the noise moves it by ~0.3%
    assert abs(result.clean_prob - result.corrupted_prob) > 2e-3 * result.clean_prob
    _close(last_layer[-1], result.clean_prob, 1e-5)  # the last token's final state decides the output
    _close(last_layer[:-1], np.full(len(last_layer) - 1, result.corrupted_prob), 1e-5)  # the others cannot
    # before the subject nothing is corrupted: restoring there restores nothing
    _close(result.grids["mlp"][0], np.full(adapter.num_layers, result.corrupted_prob), 1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_subject_as_last_token_is_restored_by_its_hidden_state_at_any_layer(models, arch):
    """Only the last token is corrupted: restoring its state at any layer restores everything."""
    model, tok, adapter = models[arch]
    assert tok.tokenize(" of")[-1] == tok.tokenize("The capital of")[-1]  # " of" is one token
    result = causal_trace(
        model, tok, adapter, "The capital of", "of", samples=3, window=2, noise_scale=2.0, kinds=("hidden",)
    )
    assert result.subject_range == (len(result.tokens) - 1, len(result.tokens))
    _close(result.grids["hidden"][-1], np.full(adapter.num_layers, result.clean_prob))
    _close(result.grids["hidden"][:-1], np.full_like(result.grids["hidden"][:-1], result.corrupted_prob))


def test_tiny_noise_changes_nothing(models):
    model, tok, adapter = models["qwen2"]
    result = causal_trace(model, tok, adapter, PROMPT, SUBJECT, samples=2, window=2, noise_scale=1e-6)
    _close(result.corrupted_prob, result.clean_prob)
    for grid in result.grids.values():
        np.testing.assert_allclose(grid, result.clean_prob, rtol=1e-3)


def test_same_seed_same_grids_other_seed_other_noise(models):
    model, tok, adapter = models["gpt_neox"]
    kwargs = dict(samples=3, window=2, noise_scale=1.0, kinds=("hidden", "attn"))
    a = causal_trace(model, tok, adapter, PROMPT, SUBJECT, seed=7, **kwargs)
    b = causal_trace(model, tok, adapter, PROMPT, SUBJECT, seed=7, **kwargs)
    c = causal_trace(model, tok, adapter, PROMPT, SUBJECT, seed=8, **kwargs)
    assert set(a.grids) == {"hidden", "attn"}
    for kind in a.grids:
        assert np.array_equal(a.grids[kind], b.grids[kind])
    assert a.corrupted_prob == b.corrupted_prob != c.corrupted_prob


def test_answer_is_scored_by_its_first_token_after_a_space(models):
    model, tok, adapter = models["llama"]
    kwargs = dict(samples=1, window=1, noise_scale=1.0, kinds=("hidden",))
    top = causal_trace(model, tok, adapter, "The capital of France is", "France", **kwargs)
    logits = model(tok("The capital of France is", return_tensors="pt").input_ids).logits[0, -1]
    assert top.answer_token_ids == [int(logits.argmax())]
    _close(top.clean_prob, float(torch.softmax(logits, -1).max()))
    plain = causal_trace(model, tok, adapter, "The capital of France is", "France", answer="Paris", **kwargs)
    spaced = causal_trace(
        model, tok, adapter, "The capital of France is", "France", answer=" Paris", **kwargs
    )
    assert plain.answer_token_ids == spaced.answer_token_ids == tok(" Paris").input_ids
    assert plain.answer_token_id == tok(" Paris").input_ids[0]
    assert plain.clean_prob == spaced.clean_prob


def test_bos_token_is_not_part_of_the_subject(models, tiny_tokenizer):
    from tokenizers import processors

    from tests.tiny import tiny_tokenizer as make

    tok = make()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<eos> $A", special_tokens=[("<eos>", tok.convert_tokens_to_ids("<eos>"))]
    )
    model, _, adapter = models["gemma3"]
    fast = causal_trace(model, tok, adapter, SHORT, "The Space", answer="Seattle", **FAST)
    slow = causal_trace_naive(model, tok, adapter, SHORT, "The Space", answer="Seattle", **FAST)
    assert fast.tokens[0] == "<eos>" and fast.subject_range == (1, 6)
    assert fast.answer_token_ids == tok(" Seattle", add_special_tokens=False).input_ids
    for kind in fast.grids:
        _close(fast.grids[kind], slow.grids[kind])


def test_noise_scale_is_three_sigma_of_what_the_layers_receive(models):
    model, _, adapter = models["llama"]
    weight = model.get_input_embeddings().weight
    assert embedding_noise_scale(model, adapter) == pytest.approx(3 * float(weight.std()), rel=1e-4)
    gemma, _, gemma_adapter = models["gemma3"]  # Gemma scales its embeddings by sqrt(hidden)
    weight = gemma.get_input_embeddings().weight
    expected = 3 * float(weight.std()) * gemma.config.hidden_size**0.5
    assert embedding_noise_scale(gemma, gemma_adapter) == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt="   "), "prompt is empty"),
        (dict(subject="Eiffel Tower"), "not found in prompt"),
        (dict(subject=""), "subject is empty"),
        (dict(max_prompt_tokens=5), "longer than max_prompt_tokens=5"),
        (dict(samples=0), "samples must be in [1, 64]"),
        (dict(samples=65), "samples must be in [1, 64]"),
        (dict(window=0), "window must be in [1, 4]"),
        (dict(window=5), "window must be in [1, 4]"),
        (dict(answer="  "), "answer is empty"),
        (dict(kinds=("residual",)), "unknown kinds"),
        (dict(kinds=()), "kinds is empty"),
        (dict(noise_scale=-1.0), "noise_scale must be a positive number"),
        (dict(precision="fp8"), "precision must be one of"),
        (dict(precision=""), "precision must be one of"),
        (dict(precision=None), "precision must be one of"),
    ],
)
def test_bad_requests_say_what_is_wrong(models, change, message):
    model, tok, adapter = models["llama"]
    request = dict(prompt=PROMPT, subject=SUBJECT, samples=2, window=2, noise_scale=1.0) | change
    prompt, subject = request.pop("prompt"), request.pop("subject")
    with pytest.raises(InvalidRequest) as err:
        causal_trace(model, tok, adapter, prompt, subject, **request)
    assert message in str(err.value)
    assert hooks_attached(model) == 0


def test_a_failure_midway_leaves_no_hook(models):
    model, tok, adapter = models["gpt2"]
    calls = {"n": 0}

    def explode(module, args, output):
        calls["n"] += 1
        if calls["n"] == 20:  # well inside the restored runs
            raise RuntimeError("boom")

    handle = model.get_submodule(adapter.layer(2)).register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            causal_trace(model, tok, adapter, PROMPT, SUBJECT, **FAST)
    finally:
        handle.remove()
    assert hooks_attached(model) == 0


def test_result_is_plain_data(models, tmp_path):
    model, tok, adapter = models["llama"]
    result = causal_trace(model, tok, adapter, "The capital of France is", "France", **FAST)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["tokens"] == result.tokens and len(data["grids"]["mlp"]) == len(result.tokens)
    assert result.indirect_effects("mlp").shape == result.grids["mlp"].shape
    pytest.importorskip("matplotlib")
    from editserve.client.trace_plot import plot_trace

    path = plot_trace(data, tmp_path / "trace.png")
    assert path.stat().st_size > 10_000


def test_bf16_copy_keeps_the_models_hooks(models):
    """A runtime edit rides on a forward hook of the served model (T-Patcher neurons): the bf16
    copy must run it too, or the trace would describe another model."""
    model, tok, adapter = models["llama"]
    mlp = model.get_submodule(adapter.mlp(1))
    kwargs = dict(samples=2, window=2, noise_scale=2.0, seed=0)
    plain = causal_trace(model, tok, adapter, SHORT, SUBJECT, precision="bf16", **kwargs)
    handle = mlp.register_forward_hook(lambda module, args, output: output * 3.0)
    try:
        fast = causal_trace(model, tok, adapter, SHORT, SUBJECT, precision="bf16", **kwargs)
        slow = causal_trace_naive(model, tok, adapter, SHORT, SUBJECT, **kwargs)
    finally:
        handle.remove()
    assert abs(slow.clean_prob - plain.clean_prob) > 20 * abs(fast.clean_prob - slow.clean_prob)
    for kind in ("hidden", "mlp", "attn"):
        ours, reference = fast.grids[kind][1:].ravel(), slow.grids[kind][1:].ravel()
        assert np.corrcoef(ours, reference)[0, 1] >= 0.98, kind
    assert hooks_attached(model) == 0
