import math

import pytest
import torch

from editserve.editing.evaluation.teacher_forcing import continuation_ids, score_continuations
from tests.tiny import ARCHITECTURES, tiny_model


def _check_against_full_forward(model, tok, prompts, targets, scores) -> None:
    """Each score equals what one unbatched forward of prompt + target gives."""
    for prompt, target, score in zip(prompts, targets, scores, strict=True):
        p, c = continuation_ids(tok, prompt, target)
        logits = model(torch.tensor([p + c])).logits[0].log_softmax(-1)
        expected = [float(logits[len(p) - 1 + i, t]) for i, t in enumerate(c)]
        assert score.token_ids == c
        assert score.token_logprobs == pytest.approx(expected, abs=1e-4), (prompt, target)
        assert score.argmax_ids == [int(logits[len(p) - 1 + i].argmax()) for i in range(len(c))]
        assert score.probability == pytest.approx(math.exp(sum(expected)), rel=1e-3)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_scores_match_a_full_forward(arch, tiny_tokenizer):
    model, tok = tiny_model(arch, tokenizer=tiny_tokenizer)
    prompts = ["The capital of France is", "Michael Jordan plays the sport of", "Hi"]
    targets = ["Paris", " basketball today", "there"]
    _check_against_full_forward(model, tok, prompts, targets, score_continuations(model, tok, prompts, targets,
                                                                                  batch_size=2))


def test_space_is_added_between_prompt_and_target(tiny_tokenizer):
    _p, c = continuation_ids(tiny_tokenizer, "The capital of France is", "Paris")
    assert tiny_tokenizer.decode(c) == " Paris"
    _p, c = continuation_ids(tiny_tokenizer, "The capital of France is ", "Paris")
    assert tiny_tokenizer.decode(c) == "Paris"


def test_empty_continuation_is_rejected(tiny_tokenizer):
    model, tok = tiny_model("llama", tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        score_continuations(model, tok, ["x "], [""])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shared_prompts_and_long_prompts_match_a_full_forward(arch, tiny_tokenizer):
    """Pairs sharing a prompt share its forward; prompts of very different lengths (past
    Gemma's 16-token sliding window in the tiny config) are left-padded together."""
    model, tok = tiny_model(arch, tokenizer=tiny_tokenizer)
    long = "The capital of France is a city that many people like to visit in the spring and the capital of Italy is"
    prompts = [long, long, "Hi", "Hi", long, "The sport of"]
    targets = ["Paris", " basketball today and", "there", "x", "Rome", "basketball"]
    _check_against_full_forward(model, tok, prompts, targets, score_continuations(model, tok, prompts, targets,
                                                                                  batch_size=4))
