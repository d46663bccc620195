"""A decode batch's KV cache in preallocated slabs, written in place.

transformers' ``DynamicCache`` appends a step's keys and values with ``torch.cat``, which
copies the whole cache of every layer at every step: for 16 sequences of 560 tokens on
SmolLM2-135M that is ~400 MB of copying per step, as much memory traffic as reading the
weights. Here each layer keeps a slab with room to spare; a step writes one column into it
and attention reads a view of the filled part, so a step costs O(new tokens), not O(cache).
When a slab is full it is reallocated with twice the room (amortised O(1) per token).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class SlabLayer(DynamicLayer):
    """One layer's keys and values in ``[batch, heads, capacity, dim]`` slabs; ``keys`` and
    ``values`` are views of the first ``length`` positions, as ``DynamicLayer`` exposes them."""

    def __init__(self, key_slab: torch.Tensor, value_slab: torch.Tensor, length: int) -> None:
        super().__init__()
        self._key_slab, self._value_slab, self._length = key_slab, value_slab, length
        self.device = key_slab.device
        self.is_initialized = True
        self._expose()

    def _expose(self) -> None:
        self.keys = self._key_slab[:, :, : self._length]
        self.values = self._value_slab[:, :, : self._length]

    @property
    def capacity(self) -> int:
        return self._key_slab.shape[2]

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.capacity)
        for name in ("_key_slab", "_value_slab"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], capacity, old.shape[3]))
            new[:, :, : self._length] = old[:, :, : self._length]
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._length + key_states.shape[2]
        if end > self.capacity:
            self._grow(end)
        self._key_slab[:, :, self._length : end] = key_states
        self._value_slab[:, :, self._length : end] = value_states
        self._length = end
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length


def left_padded_slab_cache(rows: list[list[tuple[torch.Tensor, torch.Tensor]]], lengths: list[int],
                           capacity: int) -> tuple[DynamicCache, int]:
    """(cache, width): each row's per-layer ``[1, heads, length, dim]`` keys and values copied
    right-aligned into slabs of ``capacity`` positions (at least the width); the padding on
    the left is zeros (masked out, but finite, so the softmax's zero weights stay zero)."""
    width = max(lengths)
    layers = []
    for layer_index in range(len(rows[0])):
        k0, v0 = rows[0][layer_index]
        slabs = []
        for sample in (k0, v0):
            slab = sample.new_empty((len(rows), sample.shape[1], max(capacity, width), sample.shape[3]))
            slab[:, :, :width].zero_()
            slabs.append(slab)
        for i, (row, length) in enumerate(zip(rows, lengths, strict=True)):
            keys, values = row[layer_index]
            slabs[0][i, :, width - length : width] = keys[0]
            slabs[1][i, :, width - length : width] = values[0]
        layers.append(SlabLayer(slabs[0], slabs[1], width))
    cache = DynamicCache()
    cache.layers = layers
    return cache, width
