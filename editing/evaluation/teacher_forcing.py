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
    """One ContinuationScore per (prompt, continuation) pair. Empty continuations raise."""
    if len(prompts) != len(continuations):
        raise ValueError("prompts and continuations differ in length")
    body, head, softcap = _body_and_head(model)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pairs = [continuation_ids(tokenizer, p, c) for p, c in zip(prompts, continuations, strict=True)]
    for (_p, c), text in zip(pairs, continuations, strict=True):
        if not c:
            raise ValueError(f"continuation {text!r} tokenizes to nothing")
    # batches of similar length pad least (a long evaluation mixes 5- and 40-token prompts);
    # right padding never changes a row's own logits (causal attention), so order is free
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out: list[ContinuationScore | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        seqs = [pairs[i][0] + pairs[i][1] for i in batch]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
        rows, cols = [], []
        for row, i in enumerate(batch):
            p, c = pairs[i]
            rows += [row] * len(c)
            cols += list(range(len(p) - 1, len(p) + len(c) - 1))
        logits = head(hidden[torch.tensor(rows), torch.tensor(cols)]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        logprobs = torch.log_softmax(logits, -1)
        targets = torch.tensor([t for i in batch for t in pairs[i][1]])
        picked = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        argmax = logprobs.argmax(-1).tolist()
        offset = 0
        for i in batch:
            c = pairs[i][1]
            n = len(c)
            out[i] = ContinuationScore(list(c), picked[offset : offset + n], argmax[offset : offset + n])
            offset += n
    return out  # type: ignore[return-value]  # every index was filled
