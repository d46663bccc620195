"""The fixed probe set for side effects (locality drift), and next-token distributions on it.

The same probes serve the server's drift metrics and the evaluation harness, so "what edits
did to unrelated prompts" means one thing everywhere.
"""

from __future__ import annotations

from importlib import resources

import torch


def load_probes() -> list[str]:
    text = resources.files("editserve.editing").joinpath("data/drift_probes.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@torch.no_grad()
def next_token_logits(model, tokenizer, prompts: list[str], batch_size: int = 16) -> torch.Tensor:
    """[len(prompts), vocab] logits of the token after each prompt (fp32, on CPU).

    Prompts are right-padded and the LM head runs only at each prompt's last real token,
    which matters for 262k-token vocabularies.
    """
    rows = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        encoded = [tokenizer(p).input_ids for p in chunk]
        width = max(len(e) for e in encoded)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([e + [pad] * (width - len(e)) for e in encoded], device=device)
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded], device=device)
        body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
        last = hidden[torch.arange(len(chunk)), torch.tensor([len(e) - 1 for e in encoded])]
        logits = model.get_output_embeddings()(last)
        softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        rows.append(logits.float().cpu())
    return torch.cat(rows)
