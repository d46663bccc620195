"""Turn one row of next-token logits into a token, per request options."""

from __future__ import annotations

import torch

from .backends.base import GenerationParams


def sample_token(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None) -> int:
    """Greedy when temperature is 0; else temperature, top-k, then top-p (nucleus) sampling."""
    if params.temperature <= 0.0:
        return int(torch.argmax(logits))
    scores = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if 0.0 < params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        # drop tokens once the mass *before* them already reaches top_p (keep at least one)
        drop = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= params.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise ValueError(f"sampling distribution is not finite at temperature {params.temperature}")
    return int(torch.multinomial(probs, 1, generator=generator))
