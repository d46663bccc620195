"""The evaluation harness's in-process target: a model edited through the server's own
edit manager and journal (in a temporary directory), so in-process numbers measure the
same compute -> journal -> apply -> revert path a server runs."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from editserve.editing.evaluation.probes import load_probes, next_token_logits
from editserve.editing.evaluation.teacher_forcing import ContinuationScore, score_continuations
from editserve.editing.facts import Fact

from .edits import EditManager, stable_weights
from .fresh_thread import in_fresh_thread
from .host import ModelHost
from .journal import Journal
from .methods import build_methods
from .metrics import Metrics
from .models import default_cache_dir, load_model


class InProcessTarget:
    """``state_dir``: keep the journal there (default: a temporary directory), so a
    sequential run's accumulated edits survive the process and a rerun resumes on them.

    Every model pass runs in a thread that ends with it, as in the server: the caller's thread
    lives on, and an OpenMP team it kept would throttle the edit thread's (server/fresh_thread.py),
    so the edit compute times measured here would include a slowdown a server does not have."""

    def __init__(self, model: str, *, method: str = "rome", options: dict | None = None, dtype: str = "fp32",
                 cache_dir: Path | None = None, state_dir: Path | None = None) -> None:
        cache = cache_dir or default_cache_dir()
        loaded, tokenizer, _ = in_fresh_thread(partial(load_model, model, dtype=dtype, cache_dir=cache))
        self.host = ModelHost(loaded, tokenizer, name=model, dtype=dtype, device="cpu")
        self._tmp = None if state_dir is not None else tempfile.TemporaryDirectory(prefix="editserve-eval-")
        self._fingerprint = in_fresh_thread(self.host.fingerprint)  # of the pristine base: constant, asked per case
        journal = Journal(Path(state_dir) if state_dir is not None else Path(self._tmp.name), self._fingerprint)
        table = build_methods(self.host, cache)
        self.manager = EditManager(self.host, journal, table.compute, table.score, Metrics())
        in_fresh_thread(self.manager.replay)
        self.method = method
        self.options = options or {}
        self.probes = load_probes()

    def edit(self, facts: list[Fact]) -> tuple[str, float, float]:
        outcome = self.manager.edit(self.method, facts, self.options, report=False)
        return outcome.edit_id, outcome.compute_seconds, outcome.apply_seconds

    def revert(self, edit_id: str) -> float:
        started = time.perf_counter()
        self.manager.revert(edit_id)
        return time.perf_counter() - started

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[ContinuationScore]:
        return in_fresh_thread(partial(self._score, pairs), "editserve-eval")

    def _score(self, pairs: Sequence[tuple[str, str]]) -> list[ContinuationScore]:
        with stable_weights(self.manager):
            prompts, _matches = self.host.routed_prompts([p for p, _ in pairs])  # as Score would read them
            return score_continuations(self.host.model, self.host.tokenizer, prompts, [c for _, c in pairs])

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of all prompts in one left-padded batch: fluency (GE) needs
        ten prompts per case, and one batched decode costs little more than one prompt's."""
        return in_fresh_thread(partial(self._generate, prompts, max_new_tokens), "editserve-eval")

    @torch.no_grad()
    def _generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        tok = self.host.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        encoded = [tok(p).input_ids for p in self.host.routed_prompts(list(prompts))[0]]
        width = max(len(e) for e in encoded)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        with stable_weights(self.manager):
            out = self.host.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                           min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        return [tok.decode(row[width:], skip_special_tokens=True) for row in out]

    def probe_logits(self):
        def measure():
            with stable_weights(self.manager):
                return next_token_logits(self.host.model, self.host.tokenizer, self.probes)

        return in_fresh_thread(measure, "editserve-eval")

    def active_edits(self) -> list[str]:
        return list(self.host.active_edit_ids)

    def unedited_identity(self) -> str | None:
        """What the unedited model's measurements depend on (name, base-weight fingerprint,
        dtype); None while any edit is active, so no cached record describes an edited model."""
        if self.host.active_edit_ids:
            return None
        return f"{self.host.name}/{self._fingerprint}/{self.host.dtype}/{self.host.device}"

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
