import math

import pytest
import torch

from editserve.editing.evaluation.datasets import detect_format, load_cases, resubjected
from editserve.editing.evaluation.metrics import (
    distribution_drift,
    harmonic_mean,
    ngram_entropy,
    rome_case_metrics,
    summarize,
    token_accuracy,
    unchanged_share,
)


def test_rome_case_metrics_on_known_values():
    m = rome_case_metrics((0.6, 0.1), [(0.3, 0.4), (0.5, 0.2)], [(0.1, 0.7), (0.2, 0.1), (0.0, 0.5), (0.3, 0.3)])
    assert m["es"] == 1.0 and m["em"] == pytest.approx(0.5)
    assert m["ps"] == 0.5 and m["pm"] == pytest.approx(0.1)
    assert m["ns"] == 0.5  # ties do not count as specific
    assert m["nm"] == pytest.approx((0.6 - 0.1 + 0.5 + 0.0) / 4)
    none = rome_case_metrics((0.1, 0.2), [], [])
    assert none["es"] == 0.0 and none["ps"] is None and none["ns"] is None


def test_harmonic_mean():
    assert harmonic_mean([1.0, 1.0, 1.0]) == 1.0
    assert harmonic_mean([0.5, 1.0]) == pytest.approx(2 / 3)
    assert harmonic_mean([0.0, 1.0]) == 0.0
    assert harmonic_mean([None, 0.5]) == 0.5


def test_token_accuracy_and_locality():
    assert token_accuracy([1, 2, 3], [1, 9, 3]) == pytest.approx(2 / 3)
    assert unchanged_share([4, 5], [4, 6]) == 0.5
    with pytest.raises(ValueError):
        token_accuracy([], [])
    with pytest.raises(ValueError):
        token_accuracy([1], [1, 2])


def test_ngram_entropy_known_values():
    # all bigrams distinct (4 of them: entropy 2 bits), trigrams 3 distinct (log2 3 bits)
    text = "a b c d e"
    expected = (2 / 3 * 2.0 + 4 / 3 * math.log2(3)) / 2
    assert ngram_entropy([text]) == pytest.approx(expected)
    assert ngram_entropy(["the the the the the"]) == 0.0
    assert ngram_entropy(["x y z w v u", "go go go go"]) < ngram_entropy(["x y z w v u"])


def test_distribution_drift():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    kl, agree = distribution_drift(logits, logits)
    assert kl == pytest.approx(0.0, abs=1e-7) and agree == 1.0
    flipped = torch.tensor([[-1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    kl, agree = distribution_drift(logits, flipped)
    p = torch.softmax(logits[0], -1)
    expected = float((p * (torch.log_softmax(logits[0], -1) - torch.log_softmax(flipped[0], -1))).sum()) / 2
    assert kl == pytest.approx(expected, rel=1e-5) and agree == 0.5


def test_summarize_skips_missing():
    assert summarize([{"es": 1.0, "ps": None}, {"es": 0.0, "ps": 0.5}], ["es", "ps"]) == {"es": 0.5, "ps": 0.5}


def test_dataset_formats(tmp_path):
    import json

    rich = {"case_id": 7, "requested_rewrite": {"prompt": "{} speaks", "subject": "Ann", "target_new": {"str": "Dutch"},
                                                "target_true": {"str": "French"}},
            "paraphrase_prompts": ["Ann talks"], "neighborhood_prompts": ["Bob speaks"], "generation_prompts": ["Ann"]}
    zsre = {"subject": "Ann", "src": "What does Ann speak?", "alt": "Dutch", "answers": ["French"], "rephrase": "Ann speaks?",
            "loc": "nq question: x", "loc_ans": "y", "inverse question": "Who speaks Dutch?"}
    assert detect_format(rich) == "counterfact" and detect_format(zsre) == "zsre"
    (tmp_path / "cf.json").write_text(json.dumps([rich]))
    cases, _ = load_cases(tmp_path / "cf.json")
    assert cases[0].fact.text == "Ann speaks" and cases[0].neighborhood_prompts == ("Bob speaks",)
    (tmp_path / "zsre.json").write_text(json.dumps([zsre, {**zsre, "subject": "Zed"}]))
    cases, skipped = load_cases(tmp_path / "zsre.json")
    assert len(cases) == 1 and skipped == 1  # "Zed" is not in the question
    (tmp_path / "blank.json").write_text(json.dumps([{**zsre, "alt": " "}, zsre]))
    assert [len(x) if isinstance(x, list) else x for x in load_cases(tmp_path / "blank.json")] == [1, 1]  # no new answer
    assert cases[0].fact.prompt == "What does {} speak?"
    cases, _ = load_cases(tmp_path / "zsre.json")
    assert cases[0].locality[0].answer == "y" and cases[0].portability[0].answer == "Ann"


def test_distinct_subjects_keeps_each_subjects_first_case(tmp_path):
    """zsRE edits one subject in several wordings with different answers; a sequential run can
    keep only the last, so ``resubjected`` counts them and ``distinct_subjects`` drops them."""
    import json

    def record(subject: str, question: str, alt: str) -> dict:
        return {"subject": subject, "src": question.format(subject), "alt": alt, "answers": ["x"]}

    records = [record("Ann", "What does {} speak?", "Dutch"), record("Bob", "What does {} speak?", "Greek"),
               record("ann", "Which language does {} speak?", "Welsh"),  # contradicts case 0 (case-blind)
               record("Ann", "{} speaks which language?", "Dutch"),  # agrees with case 0
               record("Cy", "What does {} speak?", "Thai"), record("Bob", "Bob's language?", "Maltese")]
    (tmp_path / "zsre.json").write_text(json.dumps(records))
    every, skipped = load_cases(tmp_path / "zsre.json")
    assert len(every) == 6 and skipped == 0
    assert resubjected(every) == 2  # "ann" -> Welsh and Bob -> Maltese; Ann -> Dutch again agrees
    kept, skipped = load_cases(tmp_path / "zsre.json", distinct_subjects=True, limit=3)
    assert [c.fact.subject for c in kept] == ["Ann", "Bob", "Cy"] and skipped == 2
    assert resubjected(kept) == 0


def test_true_answer_equal_to_the_target_is_dropped(tmp_path):
    """zsRE has cases whose edit target is already the answer (alt == answers[0])."""
    import json

    zsre = {"subject": "Ann", "src": "What is Ann's sex?", "alt": "male", "answers": ["male "], "rephrase": "Ann is?"}
    (tmp_path / "zsre.json").write_text(json.dumps([zsre]))
    case = load_cases(tmp_path / "zsre.json")[0][0]
    assert case.fact.target_new == "male" and case.fact.target_true == ""
    case.fact.validate()  # an editable fact, not "nothing to edit"


def test_answers_are_matched_after_normalisation():
    from editserve.editing.evaluation.metrics import first_clause, normalise_answer, says

    assert normalise_answer("  The  Eiffel-Tower! ") == "eiffel tower"
    assert normalise_answer("Ｐaris") == "paris"  # NFKC folds full-width letters
    assert says(" Paris, the capital of France.", "Paris")
    assert says(" the Paris Saint-Germain club", "Paris")
    assert says(" St. Louis is a city", "St. Louis")
    assert not says(" a city in France", "Paris")
    assert not says(" Parisian food", "Paris")  # a whole-word match, not a prefix of a word
    assert not says(" Rome\nParis", "Paris")  # only the first line answers
    assert says("\n Paris", "Paris")  # leading blank space is not an answer
    assert not says(" anything", "   ")
    assert first_clause(" French, and later English.") == "french"
    assert first_clause("\nFrench") == "french"
