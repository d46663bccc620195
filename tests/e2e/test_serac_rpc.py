"""SERAC over a real socket on a tiny random Llama with the real MiniLM encoder: an edit is a
memory entry; Generate, GenerateStream and Score report the edit that answered in-scope inputs
and leave others untouched; revert removes the entry; the memory replays after a restart."""

from __future__ import annotations

import subprocess
import sys

import pytest

from editserve.client import Fact, InvalidArgument

pytestmark = pytest.mark.e2e

FACT = Fact("The capital of {} is", "France", "Rome", "Paris")


def test_memory_routes_in_scope_inputs_reverts_and_replays(tiny_servers):
    first = tiny_servers()
    with first.client() as client:
        pristine = client.model_info(include_weights_digest=True).weights_digest
        plain = client.generate("The capital of France is", max_new_tokens=4)
        assert plain.route is None
        result = client.edit([FACT], method="serac")
        assert result.applied and client.get_edit(result.edit_id).method == "serac"
        routed = client.generate("The capital of France is", max_new_tokens=4)
        assert routed.route is not None and routed.route.edit_id == result.edit_id and routed.route.score > 0.99
        assert routed.prompt_tokens > plain.prompt_tokens  # the statement was read first
        assert client.generate("The capital of Spain is", max_new_tokens=4).route is None
        opening = next(iter(client.stream("What is the capital of France?", max_new_tokens=2)))
        assert opening.route is not None and opening.route.edit_id == result.edit_id
        in_scope, out_of_scope = client.score([("The capital of France is", " Rome"), ("The capital of Spain is", " Rome")])
        assert in_scope.route.edit_id == result.edit_id and out_of_scope.route is None
        assert client.model_info(include_weights_digest=True).weights_digest != pristine
        with pytest.raises(InvalidArgument, match="scope_threshold"):
            client.edit([FACT], method="serac", scope_threshold=2.0)
    cli = subprocess.run([sys.executable, "-m", "editserve.client.cli", "generate", "--server", first.target,
                          "The capital of France is", "--max-new-tokens", "2"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and f"answered by SERAC edit {result.edit_id}" in cli.stderr, cli.stderr
    first.stop()
    with tiny_servers().client() as client:
        assert client.generate("The capital of France is", max_new_tokens=2).route.edit_id == result.edit_id
        client.revert(result.edit_id)
        assert client.generate("The capital of France is", max_new_tokens=2).route is None
        assert client.model_info(include_weights_digest=True).weights_digest == pristine
        # another wording, named in the request: the model reads the fact twice, not four times
        revision = client.model_info().revision
        with pytest.raises(InvalidArgument, match="template must be one of"):
            client.edit([FACT], method="serac", template="{statement.__class__}")
        assert client.model_info().revision == revision  # nothing was journaled or applied
        assert client.generate("The capital of France is", max_new_tokens=2).route is None
        short = client.edit([FACT], method="serac", template="one_line")
        one_line = client.generate("The capital of France is", max_new_tokens=2)
        assert one_line.route.edit_id == short.edit_id
        assert plain.prompt_tokens < one_line.prompt_tokens < routed.prompt_tokens
