"""Finished chunks of a long value optimisation, kept on disk so a run can be resumed.

A MEMIT edit of 10,000 facts spends hours in its target optimisation on a CPU (chunks of
``batch_facts`` facts, each independent of the others). A process that is stopped - a
session that ends, a machine that is reclaimed, a deliberate split into sittings - loses
nothing but the chunk it was in when the work is checkpointed: each finished chunk is
written atomically as one safetensors file, and a rerun with the same directory loads every
fact it already has and optimises only the rest.

Each fact is keyed by a digest of everything its result depends on: the fact itself, the
module the change is added to, the context templates, the optimisation's hyperparameters
(all but ``batch_facts``: a fact's delta gets exactly its own gradient, so which chunk it
shared does not change it beyond float rounding) and what the caller names as the model.
A stale file (other hyperparameters, another model) is therefore ignored, never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .facts import Fact

_META_KEYS = "keys"
_META_INFO = "info"
_UNKEYED = ("batch_facts", "skip_lower_layers")  # hyperparameters that do not change a fact's result


@dataclass(frozen=True)
class StoredValue:
    """One fact's finished optimisation: its delta, the unedited output and diagnostics."""

    delta: torch.Tensor
    unedited: torch.Tensor
    info: dict


class ValueCheckpoint:
    """A directory of finished chunks (``chunk-<digest>.safetensors``).

    ``model`` names the weights the values were computed on (the caller's choice: a model
    name plus revision, or a journal fingerprint); it enters every fact's key.
    """

    def __init__(self, directory: Path | str, model: str) -> None:
        self.directory = Path(directory)
        self.model = model
        self.directory.mkdir(parents=True, exist_ok=True)

    def fact_key(self, fact: Fact, module_name: str, templates: list[str], hparams) -> str:
        """The digest that identifies ``fact``'s result under these settings."""
        settings = {k: v for k, v in hparams.as_dict().items() if k not in _UNKEYED}
        material = json.dumps({
            "model": self.model, "module": module_name, "templates": list(templates), "hparams": settings,
            "fact": [fact.prompt, fact.subject, fact.target_new],
        }, sort_keys=True, default=str)
        return hashlib.sha256(material.encode()).hexdigest()

    def load(self) -> dict[str, StoredValue]:
        """Every fact finished so far, by key. A file that cannot be read (writes are
        atomic, so only outside damage makes one) is skipped: its facts are recomputed."""
        found: dict[str, StoredValue] = {}
        for path in sorted(self.directory.glob("chunk-*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as handle:
                    meta = handle.metadata() or {}
                    keys = json.loads(meta[_META_KEYS])
                    infos = json.loads(meta[_META_INFO])
                    deltas, unedited = handle.get_tensor("deltas"), handle.get_tensor("unedited")
            except (OSError, KeyError, ValueError, RuntimeError):
                continue
            if not (len(keys) == len(infos) == deltas.shape[0] == unedited.shape[0]):
                continue
            for i, key in enumerate(keys):
                found[key] = StoredValue(deltas[i].clone(), unedited[i].clone(), infos[i])
        return found

    def save(self, keys: list[str], deltas: torch.Tensor, unedited: torch.Tensor, infos: list[dict]) -> Path:
        """Write one finished chunk atomically (temporary file, fsync, rename)."""
        name = hashlib.sha256("".join(keys).encode()).hexdigest()[:24]
        path = self.directory / f"chunk-{name}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({"deltas": deltas.detach().float().contiguous(), "unedited": unedited.detach().float().contiguous()},
                  str(tmp), metadata={_META_KEYS: json.dumps(keys), _META_INFO: json.dumps(infos, default=float)})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return path
