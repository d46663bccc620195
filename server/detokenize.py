"""Incremental detokenization with stop strings.

Text is released only when it can no longer change: a trailing replacement character (an
unfinished multi-byte character) or a suffix that could still grow into a stop string is
held back, so a streaming client never receives text that a later stop would have cut.
"""

from __future__ import annotations


class IncrementalText:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._emitted = 0
        self.text = ""
        self.stopped_by: str | None = None

    def _holdback(self, text: str) -> int:
        """How many trailing characters might still change or start a stop string."""
        hold = 0
        if text.endswith("\ufffd"):
            hold = 1
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold

    def add(self, token_id: int) -> str:
        """Append a token; return the newly releasable text (may be empty)."""
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        for s in self._stop:
            at = text.find(s, max(0, self._emitted - len(s)))
            if at != -1:
                self.stopped_by = s
                text = text[:at]
                break
        self.text = text
        if self.stopped_by is not None:
            release_to = len(text)
        else:
            release_to = len(text) - self._holdback(text)
        release_to = max(release_to, self._emitted)
        new = text[self._emitted:release_to]
        self._emitted = release_to
        return new

    def flush(self) -> str:
        """At the end: release whatever is left (held-back text that never became a stop)."""
        rest = self.text[self._emitted:]
        self._emitted = len(self.text)
        return rest.rstrip("\ufffd")
