"""Teacher-forced target scores equal a plain forward's, with the leading space and BOS handled,
and measure a previewed delta exactly as if it were applied."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from editserve.editing.artifacts import WeightDelta, preview
from editserve.editing.errors import InvalidRequest
from editserve.editing.scoring import score
from tests.tiny import tiny_model

torch.set_num_threads(1)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_matches_full_forward(arch, tiny_tokenizer):
    model, tok = tiny_model(arch, tokenizer=tiny_tokenizer)
    prompts = ["The capital of France is", "Apple was founded by "]
    targets = ["Paris", "Steve Jobs"]
    scores = score(model, tok, prompts, targets)
    for prompt, target, s in zip(prompts, targets, scores, strict=True):
        text_target = target if prompt.endswith(" ") else " " + target
        p_ids = tok(prompt).input_ids
        t_ids = tok(text_target, add_special_tokens=False).input_ids
        assert list(s.token_ids) == t_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p_ids + t_ids])).logits[0].float(), -1)
        expected = [logp[len(p_ids) - 1 + j, t].item() for j, t in enumerate(t_ids)]
        assert s.probability == pytest.approx(math.exp(sum(expected)), rel=1e-4)
        assert s.mean_logprob == pytest.approx(sum(expected) / len(expected), abs=1e-4)
        argmax = [logp[len(p_ids) - 1 + j].argmax().item() for j in range(len(t_ids))]
        assert list(s.token_matches) == [a == t for a, t in zip(argmax, t_ids, strict=True)]


def test_preview_scores_like_applied_weights(tiny_tokenizer):
    model, tok = tiny_model("llama", tokenizer=tiny_tokenizer)
    name = "model.layers.1.mlp.down_proj.weight"
    weight = model.get_parameter(name)
    delta = WeightDelta(factors={name: (torch.randn(weight.shape[0], 1), torch.randn(weight.shape[1], 1))})
    with preview(model, delta):
        previewed = score(model, tok, ["The capital of France is"], ["Paris"])[0]
    applied_model = copy.deepcopy(model)
    with torch.no_grad():
        applied_model.get_parameter(name).add_(delta.delta(name))
    applied = score(applied_model, tok, ["The capital of France is"], ["Paris"])[0]
    assert previewed.probability == pytest.approx(applied.probability, rel=1e-4)


def test_mismatched_lengths(tiny_tokenizer):
    model, tok = tiny_model("llama", tokenizer=tiny_tokenizer)
    with pytest.raises(InvalidRequest):
        score(model, tok, ["a", "b"], ["c"])
