"""The model a bench harness serves: the tiny random Llama of the tests (default) or a named one."""

from __future__ import annotations

from pathlib import Path


def served_model(name: str, root: Path) -> str:
    """``"tiny"``: the tests' tiny random Llama (tests/conftest.py's tiny_model_dir), saved under
    ``root``; anything else (``smollm2-135m``, a directory) is passed to the server as is."""
    if name != "tiny":
        return name
    from tests.tiny import tiny_model, tiny_tokenizer

    model, tokenizer = tiny_model("llama", tokenizer=tiny_tokenizer())
    path = root / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
