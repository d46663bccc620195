"""The two faces of a served model, kept apart so a backend can run generation elsewhere.

- :class:`AnalysisView`: the model as the science sees it: an in-process Hugging Face module,
  tokenizer and architecture adapter. Edits are computed on it, traces and scores read it, the
  drift monitor measures it. It must hold the same weights as what is served (the edits are
  computed against the edited model), so a backend that serves from another process applies
  every artifact to both.
- :class:`ServedState`: what generation reads, per backend: the active artifacts committed at
  a revision, a digest of the served weights, and the capabilities that say which artifact
  kinds it can host (:attr:`editserve.editing.registry.MethodSpec.requires`).

The Hugging Face backend has one object for both (:class:`~editserve.server.host.ModelHost`:
generation runs on the analysis module itself, commits are storage swaps under its write
lock). The vLLM backend (:mod:`editserve.server.backends.vllm`) is an analysis view whose
commits are also sent to vLLM's workers (the composed tensors, reloaded by a worker extension
through ``collective_rpc``, then the prefix cache reset); it hosts weight deltas and SERAC
routing but not T-Patcher neurons (docs/ARCHITECTURE.md: vLLM backend).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

from editserve.editing.adapter import ArchitectureAdapter
from editserve.editing.artifacts import Artifact


@runtime_checkable
class AnalysisView(Protocol):
    model: nn.Module
    tokenizer: object
    adapter: ArchitectureAdapter


@runtime_checkable
class ServedState(Protocol):
    revision: int

    @property
    def capabilities(self) -> frozenset[str]: ...

    @property
    def active_edit_ids(self) -> list[str]: ...

    def check_delta(self, artifact: Artifact) -> None:
        """Raise ValueError unless the artifact fits; called before it is journaled."""

    def apply(self, edit_id: str, artifact: Artifact, revision: int) -> float:
        """Commit one more artifact at ``revision``; returns how long generation was held off."""

    def revert(self, edit_id: str, revision: int) -> float:
        """Remove one artifact exactly at ``revision``; returns the pause."""

    def load_state(self, edits: list[tuple[str, Artifact]], revision: int) -> None:
        """Replay a whole active set at start-up."""

    def weights_digest(self) -> str: ...
