"""`editserve eval --server`: the harness measures what a server's users get."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.server_process import start_server

pytestmark = pytest.mark.e2e


def test_eval_cli_against_a_running_server(tiny_model_dir, tmp_path):
    data = tmp_path / "zsre.json"
    data.write_text(json.dumps([
        {"subject": "Danielle Darrieux", "src": "What language does Danielle Darrieux speak?", "alt": "English",
         "answers": ["French"], "rephrase": "Which language is spoken by Danielle Darrieux?",
         "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare",
         "portability": {"New Question": "Where is the language of Danielle Darrieux spoken?", "New Answer": "England"}},
        {"subject": "Michael Jordan", "src": "Which sport does Michael Jordan play?", "alt": "football",
         "answers": ["basketball"], "rephrase": "What is Michael Jordan's sport?",
         "loc": "nq question: capital of italy", "loc_ans": "Rome"},
    ]))
    server = start_server(str(tiny_model_dir), tmp_path / "state", tmp_path / "logs", timeout=120)
    try:
        out = tmp_path / "results.json"
        done = subprocess.run(
            [sys.executable, "-m", "editserve.client.cli", "eval", "--server", server.target, "--method", "ft_l",
             "--dataset", str(data), "--n", "2", "--layer", "1", "--set", "steps=8", "--out", str(out),
             "--by-generation", "--generation-tokens", "6"],
            capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert "| unedited |" in done.stdout and "| edited |" in done.stdout
        assert "Reverts checked (P(new) back to its pre-edit value): 2/2" in done.stdout
        records = json.loads(out.read_text())["records"]
        # --report prints the same tables from the file alone
        shown = subprocess.run([sys.executable, "-m", "editserve.client.cli", "eval", "--dataset", str(data),
                                "--out", str(out), "--report"], capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, shown.stderr
        edited = next(line for line in done.stdout.splitlines() if line.startswith("| edited |"))
        assert edited in shown.stdout
        assert f"ft_l on zsre.json, server {server.target}, non-sequential, from results.json" in shown.stdout
        assert len(records) == 2 and all(r["post"]["locality"] is not None for r in records)
        assert records[0]["post"]["portability"] is not None
        # by generation through the server: zsRE has no neighbourhood prompts, so no gNS
        assert "| gES | gPS | gNS | gLoc |" in done.stdout
        assert all(r["post"]["gen_es"] in (0.0, 1.0) and r["post"]["gen_ns"] is None
                   and r["post"]["gen_loc"] is not None for r in records)
        with server.client() as client:
            assert client.list_edits() == []  # every edit was reverted
            assert len(client.list_edits(include_reverted=True)) == 2
        # sequential: edits accumulate, the curve and costs are printed, then all are reverted
        done = subprocess.run(
            [sys.executable, "-m", "editserve.client.cli", "eval", "--server", server.target, "--method", "ft_l",
             "--dataset", str(data), "--n", "2", "--layer", "1", "--sequential", "--checkpoints", "1"],
            capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert "\n| 1 |" in done.stdout and "\n| 2 |" in done.stdout and "| edit compute (s) |" in done.stdout
        with server.client() as client:
            assert client.list_edits() == []
            assert len(client.list_edits(include_reverted=True)) == 4
    finally:
        server.stop()
