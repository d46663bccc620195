"""Edit-quality metrics with the papers' definitions (see docs/METRICS.md).

Pure functions over numbers the runner measured; every one is checked in the unit tests on
hand-made cases whose values are known.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only where logits are compared: `eval --server` runs without it
    import torch

Pair = tuple[float, float]  # (P(new), P(true)) after one prompt


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def rome_case_metrics(rewrite: Pair, paraphrases: Sequence[Pair], neighborhoods: Sequence[Pair]) -> dict:
    """ROME (Meng et al. 2022, CounterFact) per-case scores.

    ES: P(new) > P(true) on the rewrite prompt. PS: share of paraphrases with P(new) > P(true).
    NS: share of neighbourhood prompts with P(true) > P(new). EM/PM: mean P(new) - P(true);
    NM: mean P(true) - P(new). None where the case has no such prompts.
    """
    return {
        "es": float(rewrite[0] > rewrite[1]),
        "em": rewrite[0] - rewrite[1],
        "ps": _mean([float(n > t) for n, t in paraphrases]),
        "pm": _mean([n - t for n, t in paraphrases]),
        "ns": _mean([float(t > n) for n, t in neighborhoods]),
        "nm": _mean([t - n for n, t in neighborhoods]),
    }


def harmonic_mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    if any(v <= 0 for v in present):
        return 0.0
    return len(present) / sum(1.0 / v for v in present)


def token_accuracy(predicted: Sequence[int], target: Sequence[int]) -> float:
    """EasyEdit's reliability/generalisation/portability: the share of target tokens that are
    the model's argmax under teacher forcing (predicted[i] is the argmax before target[i])."""
    if not target:
        raise ValueError("empty target")
    return sum(int(p == t) for p, t in zip(predicted, target, strict=True)) / len(target)


def unchanged_share(before: Sequence[int], after: Sequence[int]) -> float:
    """EasyEdit's locality: share of the locality prompt's argmax tokens the edit left unchanged."""
    if not before:
        raise ValueError("empty locality prediction")
    return sum(int(a == b) for a, b in zip(before, after, strict=True)) / len(before)


_WORD = re.compile(r"\w+|[^\w\s]")
_NOT_WORD = re.compile(r"[^\w]+")
_ARTICLES = ("a", "an", "the")


def normalise_answer(text: str) -> str:
    """Lower case, punctuation as spaces, one space between words, no leading article: the
    normalisation answer-matching evaluations (SQuAD's, and generation-based editing
    evaluations after it) apply before comparing strings."""
    words = _NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).split()
    while words and words[0] in _ARTICLES:
        words = words[1:]
    return " ".join(words)


def generated_answer(text: str) -> str:
    """What a free generation answers: its first line, normalised. The model is asked
    nothing; it continues "The capital of France is", so its answer is what comes first."""
    return normalise_answer(text.strip().split("\n", 1)[0])


def says(generated: str, answer: str) -> bool:
    """Whether ``generated`` (a continuation) opens with ``answer``, word for word after
    normalisation: " Paris, the capital..." says "Paris"; " a city in France" does not."""
    said, wanted = generated_answer(generated), normalise_answer(answer)
    return bool(wanted) and (said == wanted or said.startswith(wanted + " "))


def first_clause(text: str) -> str:
    """The normalised first clause of a continuation (up to , . ; : ! ? or a line end): what
    two generations are compared by when neither has a reference answer (zsRE locality)."""
    return normalise_answer(re.split(r"[\n.,;:!?]", text.strip(), maxsplit=1)[0])


def ngram_entropy(texts: Sequence[str], ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's generation entropy (fluency, GE): for each text the weighted mean of the
    bi- and tri-gram frequency entropies (bits), averaged over texts. Repetitive text scores
    low; the weights favour tri-grams as in the ROME evaluation."""
    scores = []
    for text in texts:
        tokens = _WORD.findall(text.lower())
        entropies = []
        for n in ns:
            grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
            total = sum(grams.values())
            entropies.append(-sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0)
        scores.append(sum(w * e for w, e in zip(weights, entropies, strict=True)) / len(ns))
    return sum(scores) / len(scores) if scores else 0.0


def distribution_drift(reference_logits: torch.Tensor, edited_logits: torch.Tensor) -> tuple[float, float]:
    """(mean KL(reference || edited) in nats, top-1 agreement) over rows of next-token logits.

    Each row's KL is clamped at 0: it cannot be negative, but float32 sums over a vocabulary
    of identical-up-to-rounding distributions come out at -1e-9 or so, which a dashboard
    would show as a (meaningless) negative drift."""
    import torch

    ref = torch.log_softmax(reference_logits.float(), -1)
    new = torch.log_softmax(edited_logits.float(), -1)
    kl = (ref.exp() * (ref - new)).sum(-1).clamp_min(0.0)
    agree = (ref.argmax(-1) == new.argmax(-1)).float()
    return float(kl.mean()), float(agree.mean())


def summarize(records: Sequence[dict], keys: Sequence[str]) -> dict[str, float | None]:
    """Mean of each key over the records that have it (None values skipped)."""
    out = {}
    for key in keys:
        values = [r[key] for r in records if r.get(key) is not None]
        out[key] = _mean(values)
    return out
