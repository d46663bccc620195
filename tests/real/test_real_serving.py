"""The real default model (smollm2-135m), served over gRPC as a user would run it."""

from __future__ import annotations

import pytest

from editserve.server.models import load_model
from tests.server_process import start_server

pytestmark = [pytest.mark.real, pytest.mark.e2e]


def test_tokenizer_is_built_correctly(editserve_cache):
    """transformers < 5.23 builds a broken tokenizer from this GGUF (every space unknown)."""
    _model, tokenizer, _dir = load_model("smollm2-135m", cache_dir=editserve_cache)
    ids = tokenizer("The mother tongue of Danielle Darrieux is").input_ids
    assert len(ids) == 10
    assert tokenizer.decode(ids) == "The mother tongue of Danielle Darrieux is"


def test_default_model_answers_paris_over_grpc(tmp_path, editserve_cache):
    server = start_server("smollm2-135m", tmp_path / "state", tmp_path / "logs", "--cache-dir", str(editserve_cache))
    try:
        with server.client() as client:
            result = client.generate("The capital of France is", max_new_tokens=8)
            assert "Paris" in result.text
            streamed = "".join(c.text for c in client.stream("The capital of France is", max_new_tokens=8))
            assert streamed == result.text
            chat = client.generate([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=20)
            assert "Paris" in chat.text
    finally:
        assert server.stop() == 0
