"""Shared helpers for the ROME unit tests: tiny random models made able to learn an edit."""

from __future__ import annotations

import hashlib

import torch

from editserve.editing.adapter import ArchitectureAdapter
from tests.tiny import tiny_model

ARCHS = ("llama", "gpt2", "gemma3", "gpt_neox", "qwen2")


def learnable_model(arch: str, tokenizer, seed: int = 0, edit_layer: int = 1):
    """A tiny random model whose logits are sharp enough for an edit to reach a high probability.

    Random init gives near-uniform logits (the LM head can move them by well under one nat),
    so the final norm is scaled up 50x; Gemma-3's post-feedforward norm caps what an MLP can
    add to the residual stream, so the edited layer's (``edit_layer``, the shipped hparams' layer at depth 4) is scaled up too.
    """
    model, tokenizer = tiny_model(arch, seed=seed, tokenizer=tokenizer)
    adapter = ArchitectureAdapter.from_model(model)
    norm = model.get_submodule(adapter.final_norm_name)
    with torch.no_grad():
        if adapter.model_type.startswith("gemma"):
            norm.weight.add_(49.0)  # Gemma's RMSNorm scales by (1 + weight)
            model.get_submodule(adapter.layer(edit_layer)).post_feedforward_layernorm.weight.add_(20.0)
        else:
            norm.weight.mul_(50.0)
    return model, adapter


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
