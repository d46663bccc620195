"""The evaluation harness's server target: every edit, score and revert goes through the
public client to a running editserve, so the numbers are what its users get."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from .sync import EditserveClient
from .types import ContinuationScore, Fact

_GENERATE_CONCURRENCY = 32
_SCORE_BATCH = 256


class ServerTarget:
    def __init__(self, client: EditserveClient, *, method: str = "rome", options: dict | None = None) -> None:
        self.client = client
        self.method = method
        self.options = options or {}

    def edit(self, facts: list) -> tuple[str, float, float]:
        plain = [Fact(f.prompt, f.subject, f.target_new, f.target_true) for f in facts]
        result = self.client.edit(plain, method=self.method, **self.options)
        return result.edit_id, result.compute_seconds, result.apply_seconds

    def revert(self, edit_id: str) -> float:
        return self.client.revert(edit_id).revert_seconds

    def active_edits(self) -> list[str]:
        """The server's active edits, oldest first (a resumed sequential run checks them)."""
        return [e.edit_id for e in sorted(self.client.list_edits(), key=lambda e: e.revision)]

    def unedited_identity(self) -> None:
        """Never cached: measuring through a server measures that server, as it serves now."""
        return None

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[ContinuationScore]:
        out: list[ContinuationScore] = []
        for start in range(0, len(pairs), _SCORE_BATCH):
            out += self.client.score(pairs[start : start + _SCORE_BATCH])
        return out

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        # concurrent requests: the server batches them into one decode loop. Capped below the
        # server's default admission limits (64 pending / 64 concurrent), since the runner
        # measures several cases' prompts in one call
        with ThreadPoolExecutor(max_workers=max(1, min(len(prompts), _GENERATE_CONCURRENCY))) as pool:
            return list(pool.map(lambda p: self.client.generate(p, max_new_tokens=max_new_tokens,
                                                                ignore_eos=True).text, prompts))

    def probe_logits(self):
        return None  # the server publishes drift itself: editserve_drift_kl_divergence
