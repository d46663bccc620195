"""Decode-time products of fp32 linear layers as batched products over row blocks.

At batch 1 a decode step is a chain of matrix-vector products: every weight is read once per
token, so speed is memory bandwidth. Measured on this project's CPUs (Zen 4, 2 cores, torch
2.13, 2026-11-30), ``F.linear`` of one fp32 row against a weight reaches ~11 GB/s whatever
the thread count: the vector product runs on one core with a kernel that does not saturate
even that core's bandwidth. The same product written as ``torch.bmm`` of the weight viewed as
8 blocks of rows against the input reaches 21 GB/s on one thread and 35-40 GB/s on two
(`bench/decode_bench.py` measures both in one run). For bf16 weights oneDNN's own kernel is
faster, and for many rows (prefill, scoring, tracing) the plain matrix product is, so only
small fp32 products without autograd take the blocked path.

That was one machine. On another of the same kind (an Intel Xeon, 2026-12-03) ``F.linear``
read 25 GB/s at one row and the blocked product 10 GB/s: which is faster is a property of the
CPU and the torch build, not of the model. So the row counts that take the blocked path are
an attribute of each layer (:attr:`BlockedLinear.blocked_rows`), set from a measurement on the
serving machine at start-up (:mod:`.product_choice`), not a constant.

The result is the same product summed in another order: it differs from ``F.linear`` by
float32 rounding (~1e-5 relative), which the tests bound. Parameters, their names and every
hook stay as they were: only the class of each ``nn.Linear`` changes, so an edit that swaps a
weight's data is seen at the next call, as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bf16_products import DecodeScope, PackedBf16, bf16_linear

BLOCKS = 8
# products of at most this many rows take the blocked path (decode batches); more rows
# (prompts, scoring, tracing) are compute-bound and faster as one matrix product
MAX_ROWS = 16


ALL_ROWS: frozenset[int] = frozenset(range(1, MAX_ROWS + 1))


class BlockedLinear(nn.Linear):
    """``nn.Linear`` whose small fp32 no-grad products run as 8 row-block products at once."""

    # the row counts (at most MAX_ROWS) that take the blocked path; set per layer by
    # use_blocked_linear, from product_choice's measurement when the server starts
    blocked_rows: frozenset[int] = ALL_ROWS
    # the row counts whose products are rounded to bf16 (bf16_products.py), inside the
    # engine's decode steps only (``decode_scope.active``); empty unless the operator opts in
    bf16_rows: frozenset[int] = frozenset()
    decode_scope: DecodeScope | None = None
    bf16_weight: PackedBf16 | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        out_features, in_features = weight.shape
        rows = x.numel() // in_features if in_features else 0
        if rows in self.bf16_rows and self.decode_scope is not None and self.decode_scope.active \
                and self.bf16_weight is not None and not torch.is_grad_enabled() \
                and weight.dtype == torch.float32 and x.dtype == torch.float32:
            return bf16_linear(self, x, self.bf16_weight)
        if (rows not in self.blocked_rows or torch.is_grad_enabled() or weight.dtype != torch.float32
                or x.dtype != torch.float32 or out_features % BLOCKS or not weight.is_contiguous()):
            return F.linear(x, weight, self.bias)
        columns = x.reshape(rows, in_features).t().unsqueeze(0).expand(BLOCKS, in_features, rows)
        out = torch.bmm(weight.view(BLOCKS, out_features // BLOCKS, in_features), columns)
        out = out.reshape(out_features, rows).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], out_features)


def use_blocked_linear(model: nn.Module, rows: frozenset[int] = ALL_ROWS) -> int:
    """Switch every plain ``nn.Linear`` of ``model`` to :class:`BlockedLinear`, taking the
    blocked path for products of ``rows`` rows (default: up to MAX_ROWS); returns how many.
    Subclasses of ``nn.Linear`` (quantised or patched layers) are left alone; layers already
    switched get the new ``rows``."""
    count = 0
    for module in model.modules():
        if type(module) in (nn.Linear, BlockedLinear):
            module.__class__ = BlockedLinear
            module.blocked_rows = frozenset(rows)
            count += 1
    return count


def use_bf16_products(model: nn.Module, rows: frozenset[int], scope: DecodeScope | None) -> int:
    """Let the :class:`BlockedLinear` layers of ``model`` round products of ``rows`` rows to
    bf16 while ``scope`` is active (empty ``rows``: never); returns how many layers."""
    count = 0
    for module in model.modules():
        if type(module) is BlockedLinear:
            module.bf16_rows, module.decode_scope = frozenset(rows), scope
            if rows and module.bf16_weight is None:  # a packed copy already made is kept (benchmarks toggle)
                module.bf16_weight = PackedBf16()
            count += 1
    return count


def use_plain_linear(model: nn.Module) -> int:
    """Undo :func:`use_blocked_linear` (benchmarks measure both in one run)."""
    count = 0
    for module in model.modules():
        if type(module) is BlockedLinear:
            module.__class__ = nn.Linear
            count += 1
    return count
