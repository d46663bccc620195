"""bf16 copies of fp32 weights for decode steps of many rows, prepacked for oneDNN.

At 16 rows a decode step is no longer bound by reading the weights but by the fp32 products
themselves: on this project's Intel Xeon (AMX-BF16, 2 cores, torch 2.13, 2026-12-03) the 211
products of a SmolLM2-135M step take ~49 ms in fp32 and ~18 ms as bf16 products against
weights packed once for oneDNN (``torch.ops.mkldnn._reorder_linear_weight``, the kernel that
uses AMX tiles where the CPU has them); bf16 through plain ``F.linear`` (weights repacked at
every call) only reaches ~28 ms. Accumulation stays fp32; inputs and weights are rounded to
bf16 (8 bits of mantissa), so logits move by ~1e-2 and a greedy continuation may take another
token where two were nearly tied: opt-in (``decode_bf16_min_rows``), engine decode steps only,
and the tolerance is documented and tested (docs/BENCHMARKS.md "Decode speed").

A layer's packed copy is remade when its weight changes: edits swap a parameter's storage (or
bump its version in place), and the copy remembers the storage it came from (kept alive, so
no new storage can reuse its address) and the version.
"""

from __future__ import annotations

import threading

import torch
from torch import nn


def available() -> bool:
    """Whether this torch build has oneDNN's packed linear (x86 CPU wheels do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedBf16:
    """The bf16, oneDNN-packed copy of one fp32 weight (or of several stacked along their
    output rows, for a fused product), remade when any of them changes."""

    __slots__ = ("_packed", "_sources", "_pointers", "_versions")

    def __init__(self) -> None:
        self._packed: torch.Tensor | None = None
        # the storages packed from, kept alive so that no new storage can take their address:
        # a weight whose data pointer and version are the ones recorded is the one packed
        # (comparing pointers, not storage objects: making a storage object per product cost
        # ~1 ms of a 31 ms 16-row step)
        self._sources: tuple[torch.UntypedStorage, ...] = ()
        self._pointers: tuple[int, ...] = ()
        self._versions: tuple[int, ...] = ()

    def of(self, weight: torch.Tensor, rows: int) -> torch.Tensor:
        return self.of_stacked((weight,), rows)

    def of_stacked(self, weights: tuple[torch.Tensor, ...], rows: int) -> torch.Tensor:
        """The packed copy of ``torch.cat(weights)`` (output rows stacked), packed for
        products of ``rows`` rows when it is (re)made."""
        if self._packed is not None and len(weights) == len(self._pointers):
            for w, pointer, version in zip(weights, self._pointers, self._versions, strict=True):  # 151 a step
                if w.data_ptr() != pointer or w._version != version:
                    break
            else:
                return self._packed
        stacked = weights[0].detach() if len(weights) == 1 else torch.cat([w.detach() for w in weights])
        self._packed = torch.ops.mkldnn._reorder_linear_weight(stacked.to(torch.bfloat16), rows)
        self._sources = tuple(w.untyped_storage() for w in weights)
        self._pointers = tuple(w.data_ptr() for w in weights)
        self._versions = tuple(w._version for w in weights)
        return self._packed

    def release(self) -> None:
        """Drop the copy (made again at the next use)."""
        self._packed, self._sources, self._pointers, self._versions = None, (), (), ()

    def __deepcopy__(self, memo: dict) -> PackedBf16:
        """A copied model (a bf16 trace copies the model) packs its own weights when it needs them."""
        return PackedBf16()


def bf16_linear(layer: nn.Linear, x: torch.Tensor, packed: PackedBf16) -> torch.Tensor:
    """``layer(x)`` with bf16 products against the packed copy; fp32 in, fp32 out."""
    rows = x.numel() // layer.in_features
    flat = x.reshape(rows, layer.in_features).to(torch.bfloat16)
    out = torch.ops.mkldnn._linear_pointwise(flat, packed.of(layer.weight, rows), None, "none", [], "").float()
    if layer.bias is not None:
        out = out + layer.bias
    return out.reshape(*x.shape[:-1], layer.out_features)


class DecodeScope(threading.local):
    """Set by the engine thread around its own decode steps: only there may products be
    rounded to bf16 (edits, scores and traces on other threads keep fp32 whatever their row
    count). One per engine, shared by its model's layers."""

    active = False

    def __deepcopy__(self, memo: dict) -> DecodeScope:
        """A copied model gets a scope of its own, never active: no engine decodes with it."""
        return DecodeScope()
