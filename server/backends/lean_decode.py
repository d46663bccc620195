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

With the opt-in bf16 decode products (``decode_bf16_min_rows``, :mod:`.bf16_products`), a
step whose row count takes them computes each layer's products fused, against packed bf16
copies: q, k and v as one product, the gate with its SiLU and the up projection with the
product of the two as oneDNN post-operations, so a layer makes 4 products instead of 7 and
casts between fp32 and bf16 once per product (at 16 rows on this project's Xeon: ~37 -> ~31
ms a step, docs/BENCHMARKS.md). It applies only while no hook sits on a projection or MLP
it fuses; otherwise the layer's modules run, each rounding its own product to bf16.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import bf16_products
from .bf16_products import PackedBf16

log = logging.getLogger(__name__)

# model_type values whose decoder layer is exactly: x += attn(norm1(x)); x += mlp(norm2(x))
LLAMA_LAYOUT = frozenset({"llama", "mistral", "qwen2"})


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class _FusedBf16Layer:
    """One decoder layer's products as 4 fused bf16 products against packed copies (made on
    first use, remade when an edit changes a weight)."""

    __slots__ = ("attention", "mlp", "qkv", "o", "gate", "up", "down", "modules", "qkv_bias")

    def __init__(self, layer: nn.Module) -> None:
        self.attention, self.mlp = layer.self_attn, layer.mlp
        self.qkv, self.o, self.gate, self.up, self.down = (PackedBf16() for _ in range(5))
        projections = (self.attention.q_proj, self.attention.k_proj, self.attention.v_proj)
        # the modules whose forward the fused layer skips: a hook on any of them must run
        self.modules = (*projections, self.attention.o_proj, self.mlp, self.mlp.gate_proj, self.mlp.up_proj,
                        self.mlp.down_proj, self.mlp.act_fn)
        self.qkv_bias = any(m.bias is not None for m in projections)

    def usable(self) -> bool:
        return not any(_hooked(m) for m in self.modules)

    def attention_inputs(self, h: torch.Tensor, rows: int) -> torch.Tensor:
        """q, k and v of ``h`` ([B, H] bf16) side by side, fp32 [B, (heads + 2 kv heads) * dim]."""
        a = self.attention
        weights = (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)
        out = _product(h, self.qkv.of_stacked(weights, rows)).float()
        if self.qkv_bias:
            biases = [m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                      for m in (a.q_proj, a.k_proj, a.v_proj)]
            out = out + torch.cat(biases)
        return out

    def attention_output(self, out: torch.Tensor, rows: int) -> torch.Tensor:
        return _product(out.to(torch.bfloat16), self.o.of(self.attention.o_proj.weight, rows)).float()

    def mlp_output(self, h: torch.Tensor, rows: int) -> torch.Tensor:
        """down(silu(gate(h)) * up(h)) for ``h`` [B, H] bf16: SiLU and the product are
        oneDNN post-operations of the gate and up products."""
        m = self.mlp
        gate = torch.ops.mkldnn._linear_pointwise(h, self.gate.of(m.gate_proj.weight, rows), None, "swish", [], "")
        both = torch.ops.mkldnn._linear_pointwise.binary(h, gate, self.up.of(m.up_proj.weight, rows), None, "mul")
        return _product(both, self.down.of(m.down_proj.weight, rows)).float()


def _product(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


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
        # the fused bf16 layers (module docstring), where the layout allows them
        self._fused = [_FusedBf16Layer(layer) for layer in self.layers] if _fusable(model) else []

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

    def _bf16_step(self, rows: int) -> bool:
        """Whether this step's layers take the fused bf16 products: the row count is one the
        operator's opt-in chose, the engine's decode scope is active (the projections carry
        both, use_bf16_products), and no fused module carries a hook."""
        if not self._fused:
            return False
        projection = self._fused[0].attention.q_proj
        scope = getattr(projection, "decode_scope", None)
        return (rows in getattr(projection, "bf16_rows", ()) and scope is not None and scope.active
                and projection.weight.dtype == torch.float32 and all(f.usable() for f in self._fused))

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
        if self._bf16_step(rows):
            for layer, fused, cache in zip(self.layers, self._fused, cache_layers, strict=True):
                x = self._fused_layer(layer, fused, x, cos, sin, cache, bias)
            return self.model.lm_head(self._norm(x, self.backbone.norm))[:, -1]
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

    def _fused_layer(self, layer: nn.Module, fused: _FusedBf16Layer, x: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, cache, bias: torch.Tensor | None) -> torch.Tensor:
        """One decoder layer with fused bf16 products; ``x`` [B, 1, H] fp32 and the result too.
        q and k are rotated together (one set of operations for both)."""
        rows = x.shape[0]
        h = self._norm(x, layer.input_layernorm).view(rows, self.hidden).to(torch.bfloat16)
        qkv = fused.attention_inputs(h, rows)
        rotated = self._rotate(qkv[:, : (self.heads + self.kv_heads) * self.head_dim]
                               .view(rows, self.heads + self.kv_heads, 1, self.head_dim), cos, sin)
        values = qkv[:, (self.heads + self.kv_heads) * self.head_dim :].view(rows, self.kv_heads, 1, self.head_dim)
        keys, values = cache.update(rotated[:, self.heads :], values)
        out = F.scaled_dot_product_attention(rotated[:, : self.heads], keys, values, attn_mask=bias,
                                             scale=self.scaling, enable_gqa=self.kv_heads != self.heads)
        x = x + fused.attention_output(out.reshape(rows, self.heads * self.head_dim), rows).view(rows, 1, self.hidden)
        h = self._norm(x, layer.post_attention_layernorm).view(rows, self.hidden).to(torch.bfloat16)
        return x + fused.mlp_output(h, rows).view(rows, 1, self.hidden)


def _fusable(model: nn.Module) -> bool:
    """Whether the fused bf16 layer computes this model's layers: a SiLU-gated MLP without
    biases, an unbiased output projection, and a torch build with oneDNN's packed products."""
    config = model.config
    layer = model.model.layers[0]
    mlp, attention = layer.mlp, layer.self_attn
    parts = all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")) and all(
        hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
    return (bf16_products.available() and parts and getattr(config, "hidden_act", "") in ("silu", "swish")
            and all(getattr(mlp, name).bias is None for name in ("gate_proj", "up_proj", "down_proj"))
            and attention.o_proj.bias is None)


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
