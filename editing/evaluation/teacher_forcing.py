"""Score continuations of prompts by teacher forcing, computing logits only where needed.

For each (prompt, continuation) the continuation's tokens are fed after the prompt; the LM
head runs only at the positions that predict continuation tokens (the body runs once per
batch), which is what keeps a 262k-vocabulary model cheap to score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ContinuationScore:
    token_ids: list[int]
    token_logprobs: list[float]
    # the model's top token at each continuation position (for EasyEdit-style token accuracy)
    argmax_ids: list[int]

    @property
    def logprob(self) -> float:
        return sum(self.token_logprobs)

    @property
    def probability(self) -> float:
        """P(continuation | prompt): the product of the token probabilities."""
        return math.exp(self.logprob)

    @property
    def mean_probability(self) -> float:
        """exp(mean token log-prob): length-normalised, how the ROME evaluation compares targets."""
        return math.exp(self.logprob / len(self.token_logprobs))

    @property
    def token_accuracy(self) -> float:
        return sum(int(a == t) for a, t in zip(self.argmax_ids, self.token_ids, strict=True)) / len(self.token_ids)


def continuation_ids(tokenizer, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (with BOS where the model adds one) and of the continuation,
    with a separating space added when neither side has one ("is" + "Paris" -> "is Paris")."""
    if continuation and not continuation[0].isspace() and prompt and not prompt[-1].isspace():
        continuation = " " + continuation
    prompt_ids = tokenizer(prompt).input_ids
    cont_ids = tokenizer(continuation, add_special_tokens=False).input_ids
    return list(prompt_ids), list(cont_ids)


def _body_and_head(model):
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    head = model.get_output_embeddings()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return body, head, softcap


@torch.no_grad()
def score_continuations(model, tokenizer, prompts: list[str], continuations: list[str],
                        batch_size: int = 16) -> list[ContinuationScore]:
    """One ContinuationScore per (prompt, continuation) pair. Empty continuations raise.

    Pairs that share a prompt (an evaluation compares the new and the true object after the
    same prompt, twice per prompt) share its forward pass: each distinct prompt runs once,
    its attention keys/values are kept, and only the continuations' tokens (all but the
    last, whose successor nobody reads) run after it. The first continuation token is
    predicted from the prompt's last position, so single-token continuations cost nothing
    beyond the prompt. Prompts run in batches of similar length (left-padded, so every
    prompt ends in the same column and the continuations line up after it)."""
    if len(prompts) != len(continuations):
        raise ValueError("prompts and continuations differ in length")
    body, head, softcap = _body_and_head(model)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pairs = [continuation_ids(tokenizer, p, c) for p, c in zip(prompts, continuations, strict=True)]
    for (_p, c), text in zip(pairs, continuations, strict=True):
        if not c:
            raise ValueError(f"continuation {text!r} tokenizes to nothing")
    distinct: dict[tuple[int, ...], list[int]] = {}  # prompt ids -> the pairs that follow it
    for i, (p, _c) in enumerate(pairs):
        distinct.setdefault(tuple(p), []).append(i)
    order = sorted(distinct, key=len)
    out: list[ContinuationScore | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        users = [(row, i) for row, prompt in enumerate(batch) for i in distinct[prompt]]
        logits_at = _score_batch(body, batch, [pairs[i][1] for _row, i in users], [row for row, _i in users],
                                 pad, device)
        logits = head(logits_at).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        logprobs = torch.log_softmax(logits, -1)
        targets = torch.tensor([t for _row, i in users for t in pairs[i][1]], device=logprobs.device)
        picked = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        argmax = logprobs.argmax(-1).tolist()
        offset = 0
        for _row, i in users:
            c = pairs[i][1]
            out[i] = ContinuationScore(list(c), picked[offset : offset + len(c)], argmax[offset : offset + len(c)])
            offset += len(c)
    return out  # type: ignore[return-value]  # every index was filled


def _score_batch(body, prompts: list[tuple[int, ...]], conts: list[list[int]], owner: list[int], pad: int,
                 device) -> torch.Tensor:
    """Hidden states [sum of continuation lengths, d] at the positions that predict each
    continuation token, in order: continuation j of prompt ``owner[j]``."""
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    longest = max(len(c) for c in conts)
    cache = DynamicCache() if longest > 1 else None
    hidden = body(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                  use_cache=cache is not None).last_hidden_state
    rows = torch.tensor(owner, device=device)
    last = hidden[rows, -1]  # predicts each continuation's first token
    if cache is None:
        return last
    # the continuations' own tokens (all but the last) after their prompt's cached keys/values
    n = longest - 1
    cont_ids = torch.tensor([c[:-1] + [pad] * (n - len(c) + 1) for c in conts], device=device)
    cont_mask = torch.tensor([[1] * (len(c) - 1) + [0] * (n - len(c) + 1) for c in conts], device=device)
    full_mask = torch.cat([mask[rows], cont_mask], 1)
    cont_pos = positions[rows, -1:] + 1 + torch.arange(n, device=device)
    expanded = DynamicCache()
    for index, layer in enumerate(cache.layers):
        # fully padded prompt columns may hold NaN (a query that attends nothing): masked
        # later, but NaN * 0 is NaN
        expanded.update(torch.nan_to_num(layer.keys[rows]), torch.nan_to_num(layer.values[rows]), index)
    after = body(input_ids=cont_ids, attention_mask=full_mask, position_ids=cont_pos, past_key_values=expanded,
                 use_cache=True).last_hidden_state
    picked = []
    for j, c in enumerate(conts):
        picked.append(last[j : j + 1])
        if len(c) > 1:
            picked.append(after[j, : len(c) - 1])
    return torch.cat(picked)
