"""Context prefixes the model writes itself, so an edit holds whatever text precedes the prompt.

ROME (Meng et al. 2022, section 3.1) averages the key k* and optimises the value v* over the
rewrite prompt preceded by short random prefixes: the new association should be carried by
the subject, not by the exact start of the sequence. The prefixes here are a few tokens the
model samples after a handful of neutral seed words, with a fixed seed, so the same model
always gets the same templates. Each template holds one "{}" where the prompt goes; the first
is the empty context "{}" itself.

Nothing is cached here: :class:`editserve.editing.context.EditingContext` keeps the result.
"""

from __future__ import annotations

import torch

from .errors import PreconditionFailed

SEED_TEXTS = ("The", "Therefore", "In", "It", "When", "A", "However", "She", "This", "After")


def _sanitize(text: str) -> str:
    text = " ".join(text.replace("{", " ").replace("}", " ").split())
    return text


@torch.no_grad()
def _sample(model, tokenizer, seeds: list[str], length: int, generator: torch.Generator,
            top_k: int) -> list[str]:
    """``length`` sampled tokens after each seed (all seeds of one token length, one batch)."""
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer(s).input_ids for s in seeds], device=device)
    prompt_len = ids.shape[1]
    past = None
    step_input = ids
    for _ in range(length):
        out = model(input_ids=step_input, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1].float()
        if not bool(torch.isfinite(logits).all()):
            raise PreconditionFailed("the model produced non-finite logits while writing context prefixes")
        top = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        choice = torch.multinomial(torch.softmax(top.values, -1).cpu(), 1, generator=generator)
        step_input = top.indices.gather(1, choice.to(device))
        ids = torch.cat([ids, step_input], dim=1)
    texts = []
    for seed, row in zip(seeds, ids, strict=True):
        continuation = tokenizer.decode(row[prompt_len:].tolist(), skip_special_tokens=True)
        texts.append(_sanitize(seed + continuation))
    return texts


def generate_context_templates(model, tokenizer, count: int, length: int, seed: int = 0,
                               top_k: int = 5) -> list[str]:
    """``["{}", "<prefix 1>. {}", ...]``: the empty context and ``count`` self-written ones.

    Deterministic for a given model, count, length and seed (a private generator; the global
    RNG is left alone). Prefixes are sampled (top-k) rather than greedy so seeds repeated for
    a large ``count`` still give different texts.
    """
    templates = ["{}"]
    if count <= 0:
        return templates
    generator = torch.Generator().manual_seed(seed)
    seeds = [SEED_TEXTS[i % len(SEED_TEXTS)] for i in range(count)]
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(seeds):
        by_length.setdefault(len(tokenizer(s).input_ids), []).append(i)
    texts: list[str] = [""] * count
    for indices in by_length.values():
        for i, text in zip(indices, _sample(model, tokenizer, [seeds[i] for i in indices], length, generator, top_k),
                           strict=True):
            texts[i] = text
    for text in texts:
        end = "" if text.endswith((".", "!", "?")) else "."
        templates.append(f"{text}{end} {{}}")
    return templates
