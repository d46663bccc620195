"""A lean decode step for Llama-layout models: the same arithmetic, a fraction of the Python.

At batch 1 a SmolLM2-135M decode step reads 540 MB of fp32 weights; the products that do it
take ~30 ms here, and transformers' forward added ~20 ms more of per-call work around them
(keyword plumbing, mask construction, output records, cache bookkeeping, ~1,000 small
operations per token; docs/BENCHMARKS.md "Decode speed"). This module runs one decode step
of a model whose decoder layers have the Llama layout (pre-norm RMSNorm, rotary q/k, grouped
query attention, gated MLP: Llama, SmolLM2, Mistral, Qwen2) directly over the engine's KV
slabs, calling the model's own modules for every product, so:

* weights are read from the live parameters at each step: an edit's storage swap is seen at
  the next step, as with the full forward;
* forward hooks on the projections and on the MLP (T-Patcher's neuron banks, the editing
  threads' thread-scoped previews) still run, because those modules are called, not
  re-implemented; a hook anywhere this step *skips* (a decoder layer, the attention block, a
  norm, the model) makes :meth:`LeanDecoder.usable` false and the engine takes the full
  forward for that step;
* anything else (Gemma's extra norms and soft-capping, sliding windows shorter than the
  context, non-default attention implementations) is refused at construction
  (:func:`lean_decoder_for` returns None with the reason) and served by the full forward.

The attention is ``scaled_dot_product_attention`` over the slab views, the norms
``torch.rms_norm``: the same operations summed in another order, so logits differ from the
full forward's by float rounding (tests bound it, and compare greedy tokens).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# model_type values whose decoder layer is exactly: x += attn(norm1(x)); x += mlp(norm2(x))
LLAMA_LAYOUT = frozenset({"llama", "mistral", "qwen2"})


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class LeanDecoder:
    """One decode step (one new token per row) of a Llama-layout causal LM."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        config = model.config
        self.backbone = model.model
        self.layers = list(self.backbone.layers)
        attention = self.layers[0].self_attn
        self.head_dim = int(attention.head_dim)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.scaling = float(attention.scaling)
        self.eps = float(config.rms_norm_eps)
        self.hidden = int(config.hidden_size)
        # modules whose forward the step replaces: a hook on any of them must still run
        self._skipped = [model, self.backbone, self.backbone.norm, self.backbone.rotary_emb,
                         *(m for layer in self.layers
                           for m in (layer, layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm))]

    def usable(self) -> bool:
        """False while a hook sits on a module this step does not call (the engine then runs
        the full forward); checked per step, since editing threads add and remove hooks."""
        return not (torch.nn.modules.module._global_forward_hooks
                    or torch.nn.modules.module._global_forward_pre_hooks
                    or any(_hooked(m) for m in self._skipped))

    def _norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused operation, the same bits as LlamaRMSNorm here (tested)
            return torch.rms_norm(x, (self.hidden,), norm.weight, self.eps)
        wide = x.float()  # LlamaRMSNorm's order for narrower types: normalise in fp32, round, scale
        return norm.weight * (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = self.head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def step(self, input_ids: torch.Tensor, positions: torch.Tensor, cache_layers: Iterable,
             mask: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, vocab] of the next token of each row.

        ``input_ids`` and ``positions`` are [B, 1]; ``cache_layers`` the batch cache's layers,
        whose ``update(keys, values)`` appends this step's column and returns the filled
        views [B, kv_heads, W, head_dim]; ``mask`` [B, W] (1 = real token, the new one
        included) or None when no row is padded."""
        rows = input_ids.shape[0]
        x = self.backbone.embed_tokens(input_ids)  # [B, 1, H]
        cos, sin = self.backbone.rotary_emb(x, positions)
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, 1, head_dim]
        bias = None
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
            bias.masked_fill_(mask == 0, torch.finfo(x.dtype).min)
            bias = bias[:, None, None, :]  # [B, 1, 1, W]
        for layer, cache in zip(self.layers, cache_layers, strict=True):
            attention = layer.self_attn
            h = self._norm(x, layer.input_layernorm)
            q = attention.q_proj(h).view(rows, 1, self.heads, self.head_dim).transpose(1, 2)
            k = attention.k_proj(h).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attention.v_proj(h).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            keys, values = cache.update(self._rotate(k, cos, sin), v)
            out = F.scaled_dot_product_attention(self._rotate(q, cos, sin), keys, values, attn_mask=bias,
                                                 scale=self.scaling, enable_gqa=self.kv_heads != self.heads)
            x = x + attention.o_proj(out.transpose(1, 2).reshape(rows, 1, self.heads * self.head_dim))
            x = x + layer.mlp(self._norm(x, layer.post_attention_layernorm))
        x = self._norm(x, self.backbone.norm)
        return self.model.lm_head(x)[:, -1]


def lean_decoder_for(model: nn.Module) -> tuple[LeanDecoder | None, str]:
    """(decoder, "") when the lean step computes this model's forward, else (None, why)."""
    config = model.config
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in LLAMA_LAYOUT:
        return None, f"model type {model_type!r} is not of the Llama layout ({', '.join(sorted(LLAMA_LAYOUT))})"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        return None, f"sliding window of {window} tokens"
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return None, f"attention implementation {config._attn_implementation!r}"
    if getattr(config, "pretraining_tp", 1) not in (1, None):
        return None, "tensor-parallel pretraining slices (pretraining_tp)"
    backbone = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if backbone is None or any(not hasattr(backbone, name) for name in needed) or not hasattr(model, "lm_head"):
        return None, "module layout differs from LlamaForCausalLM"
    layer = backbone.layers[0]
    parts = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
    if any(not hasattr(layer, name) for name in parts):
        return None, "decoder layer layout differs from LlamaDecoderLayer"
    return LeanDecoder(model), ""
