import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from editserve.server.backends.base import GenerationParams
from editserve.server.detokenize import IncrementalText
from editserve.server.sampling import sample_token


def test_incremental_text_matches_full_decode(tiny_tokenizer):
    ids = tiny_tokenizer("The mother tongue of Danielle Darrieux is French.").input_ids
    text = IncrementalText(tiny_tokenizer, [], ())
    streamed = "".join(text.add(i) for i in ids) + text.flush()
    assert streamed == tiny_tokenizer.decode(ids)


def test_holdback_of_a_possible_stop_prefix(tiny_tokenizer):
    text = IncrementalText(tiny_tokenizer, [], ("The end",))
    streamed = "".join(text.add(i) for i in tiny_tokenizer("Paris. The").input_ids)
    assert streamed == "Paris. "  # "The" may still become "The end": held back
    assert text.flush() == "The"
    text = IncrementalText(tiny_tokenizer, [], ("The end",))
    streamed = "".join(text.add(i) for i in tiny_tokenizer("Paris. The capital").input_ids)
    assert streamed == "Paris. The capital"


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 20), st.floats(0.05, 1.0), st.integers(0, 10_000))
def test_top_k_and_top_p_only_sample_allowed_tokens(k, p, seed):
    logits = torch.linspace(-3, 3, 40)
    params = GenerationParams(temperature=0.7, top_k=k, top_p=p)
    token = sample_token(logits, params, torch.Generator().manual_seed(seed))
    assert token >= 40 - k  # one of the k largest (linspace is increasing)
    probs = torch.softmax(logits / 0.7, -1).sort(descending=True).values
    rank = 39 - token
    assert rank == 0 or probs[:rank].sum() < p + 1e-6  # inside the nucleus


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0])
    assert sample_token(logits, GenerationParams(), None) == 1
