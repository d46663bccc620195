"""The straightforward causal tracer: one whole forward pass per (kind, token, layer).

A reference for :func:`editserve.editing.tracing.causal_trace` (not part of the product): the
same inputs, the same noise, the same answer, computed the way the method is described. Every
restored run embeds the full prompt, adds the noise to the subject's embeddings with a hook
on the embedding module, writes the clean state back with a hook on the restored module(s),
runs every layer on every position and computes the LM head everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from editserve.editing.hooks import Trace, TraceDict
from editserve.editing.tracing import (
    KINDS,
    TraceResult,
    embedding_noise_scale,
    prepare_inputs,
    restore_window,
    subject_noise,
)


def causal_trace_naive(
    model,
    tokenizer,
    adapter,
    prompt: str,
    subject: str,
    *,
    answer: str | None = None,
    samples: int = 10,
    noise_scale: float | None = None,
    window: int = 10,
    seed: int = 0,
    kinds: Sequence[str] = KINDS,
    max_prompt_tokens: int = 64,
) -> TraceResult:
    kinds = tuple(dict.fromkeys(kinds))
    inputs = prepare_inputs(
        tokenizer,
        adapter,
        prompt,
        subject,
        answer=answer,
        samples=samples,
        window=window,
        kinds=kinds,
        noise_scale=noise_scale,
        max_prompt_tokens=max_prompt_tokens,
    )
    if noise_scale is None:
        noise_scale = embedding_noise_scale(model, adapter)
    n_layers = adapter.num_layers
    ids = torch.tensor([inputs.token_ids])
    n_tokens = ids.shape[1]
    s0, s1 = inputs.subject_range
    module_of = {"hidden": adapter.layer, "mlp": adapter.mlp, "attn": adapter.attn}

    with torch.no_grad():
        names = [module_of[k](layer) for k in kinds for layer in range(n_layers)]
        with TraceDict(model, names) as traces:
            probs = torch.softmax(model(ids).logits[0, -1].float(), dim=-1)
        clean = {name: traces[name].output[0].clone() for name in names}
        answer_ids = inputs.answer_token_ids or [int(probs.argmax())]
        answer_id = answer_ids[0]
        clean_prob = float(probs[answer_id])

        hidden = model.get_input_embeddings().weight.shape[1]
        noise = subject_noise(samples, s1 - s0, hidden, noise_scale, seed, torch.float32, ids.device)

        def add_noise(output, _name):
            output = output.clone()
            output[:, s0:s1] += noise.to(output.dtype)
            return output

        batch = ids.repeat(samples, 1)

        def answer_prob(restore: list[str], token: int) -> float:
            def put_back(output, name):
                output = output.clone()
                output[:, token] = clean[name][token]
                return output

            with (
                Trace(model, adapter.embed_name, retain_output=False, edit_output=add_noise),
                TraceDict(model, restore, retain_output=False, edit_output=put_back),
            ):
                logits = model(batch).logits[:, -1].float()
            return float(torch.softmax(logits, dim=-1)[:, answer_id].mean())

        corrupted_prob = answer_prob([], 0)
        grids = {}
        for kind in kinds:
            grid = np.zeros((n_tokens, n_layers), dtype=np.float32)
            for token in range(n_tokens):
                for layer in range(n_layers):
                    if kind == "hidden":
                        restore = [adapter.layer(layer)]
                    else:
                        restore = [module_of[kind](i) for i in restore_window(layer, window, n_layers)]
                    grid[token, layer] = answer_prob(restore, token)
            grids[kind] = grid

    return TraceResult(
        prompt=prompt,
        subject=subject,
        tokens=[tokenizer.decode([i]) for i in inputs.token_ids],
        token_ids=list(inputs.token_ids),
        subject_range=(s0, s1),
        answer=tokenizer.decode(answer_ids),
        answer_token_ids=list(answer_ids),
        clean_prob=clean_prob,
        corrupted_prob=corrupted_prob,
        noise_scale=float(noise_scale),
        samples=samples,
        window=window,
        seed=seed,
        num_layers=n_layers,
        kinds=kinds,
        grids=grids,
    )
