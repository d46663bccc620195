"""Prompt KV reuse across requests: a shared system prompt is computed once.

Services that call Generate usually send the same long preamble (instructions, a few-shot
block) ahead of a short question. A causal model's keys and values at position ``i`` depend
only on tokens ``0..i``, so the KV of any earlier prompt is valid for the part a new prompt
has in common with it, as long as the weights have not changed since. The engine therefore
keeps the KV of recent prefills here, keyed by their token ids, and a new prefill only runs
the tokens past the longest common prefix.

Why entries are whole prompts rather than fixed-size blocks (as vLLM's paged cache does):
the HF engine holds each prompt's KV as one contiguous tensor per layer, and a slice of it
is a free view, so a prompt stored whole serves every shorter common prefix without copies.

Correctness rests on the revision: every edit, revert or runtime-layer change bumps the
host's revision, and an entry computed at another revision is never used (the cache is
emptied the first time a lookup sees a new revision). Lookups and stores happen under the
host's read lock, with the forward pass that uses them, so the revision cannot change in
between.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np
import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]

# A hit shorter than this saves less than the bookkeeping costs; prompts shorter than it are
# not stored.
MIN_REUSE_TOKENS = 8
# Bound on the number of entries (each lookup compares the prompt with every entry).
MAX_ENTRIES = 256


@dataclass
class _Entry:
    ids: np.ndarray
    kv: KV
    nbytes: int


@dataclass(frozen=True)
class PrefixHit:
    """``tokens`` leading prompt tokens whose keys and values are ``kv`` (views, never written)."""

    tokens: int
    kv: KV


class PrefixCache:
    """LRU of prompt KV caches bounded in bytes, valid for one weights revision at a time."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._entries: collections.OrderedDict[bytes, _Entry] = collections.OrderedDict()
        self._bytes = 0
        self._revision: int | None = None

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def _at(self, revision: int) -> None:
        if revision != self._revision:
            self._entries.clear()
            self._bytes = 0
            self._revision = revision

    def lookup(self, prompt_ids: list[int], revision: int) -> PrefixHit | None:
        """The longest reusable prefix of ``prompt_ids``, leaving at least its last token to
        run (the engine needs that token's logits)."""
        if not self.enabled:
            return None
        self._at(revision)
        limit = len(prompt_ids) - 1
        if limit < MIN_REUSE_TOKENS or not self._entries:
            return None
        query = np.asarray(prompt_ids, dtype=np.int64)
        best_key, best = None, 0
        for key, entry in self._entries.items():
            n = min(limit, len(entry.ids))
            if n <= best or entry.ids[0] != query[0]:
                continue
            differ = np.flatnonzero(entry.ids[:n] != query[:n])
            common = int(differ[0]) if differ.size else n
            if common > best:
                best_key, best = key, common
        if best < MIN_REUSE_TOKENS or best_key is None:
            return None
        self._entries.move_to_end(best_key)
        kv = self._entries[best_key].kv
        return PrefixHit(tokens=best, kv=[(k[:, :, :best], v[:, :, :best]) for k, v in kv])

    def store(self, prompt_ids: list[int], kv: KV, revision: int) -> None:
        """Keep a prefill's KV (``[1, heads, len(prompt_ids), dim]`` per layer). The tensors
        are held, not copied: the engine never writes into a prefill's cache afterwards."""
        if not self.enabled or len(prompt_ids) < MIN_REUSE_TOKENS:
            return
        if any(k.shape[0] != 1 or k.shape[2] != len(prompt_ids) for k, _ in kv):
            return  # not one whole prompt (e.g. a sliding-window layer kept only its window)
        self._at(revision)
        ids = np.asarray(prompt_ids, dtype=np.int64)
        key = ids.tobytes()
        nbytes = sum(k.nbytes + v.nbytes for k, v in kv)
        if nbytes > self.capacity_bytes:
            return
        for other in [k for k, e in self._entries.items() if len(e.ids) <= len(ids)
                      and np.array_equal(e.ids, ids[: len(e.ids)])]:
            self._bytes -= self._entries.pop(other).nbytes  # the new entry serves all it served
        self._entries[key] = _Entry(ids=ids, kv=kv, nbytes=nbytes)
        self._bytes += nbytes
        while self._bytes > self.capacity_bytes or len(self._entries) > MAX_ENTRIES:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes
