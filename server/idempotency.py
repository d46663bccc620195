"""Idempotency keys of Edit: a retry gets the original reply instead of a second edit.

Why: an Edit whose reply is lost (a dropped connection, a deadline that passed just after the
journal commit) leaves the client unsure whether the fact was written. Retrying without a key
could apply it twice (two edits, two revisions). With a key, the journal row of the first
attempt answers the retry: same edit id, nothing recomputed or applied.

The key names one *request*: a retry must send the same method, facts, options and
description. The same key with another request is a client bug (two different edits under
one name) and answers ALREADY_EXISTS, naming the edit that holds the key, rather than
silently returning an edit the caller did not ask for. Keys are kept in the journal for good
(reverting an edit does not free its key).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from editserve.editing.errors import InvalidRequest
from editserve.editing.facts import Fact

MAX_KEY_CHARS = 128
# visible ASCII: no spaces or control characters, so a key logs and prints unambiguously
_FIRST, _LAST = 0x21, 0x7E


class KeyConflict(Exception):
    """The key is held by an edit made from a different request (ALREADY_EXISTS)."""


def validate_key(key: str, *, dry_run: bool) -> None:
    """InvalidRequest naming the field and its limits unless ``key`` is empty or usable."""
    if not key:
        return
    if len(key) > MAX_KEY_CHARS or not all(_FIRST <= ord(c) <= _LAST for c in key):
        raise InvalidRequest(f"idempotency_key must be 1 to {MAX_KEY_CHARS} visible ASCII characters "
                             f"(0x21-0x7e, no spaces), got {len(key)} characters")
    if dry_run:
        raise InvalidRequest("idempotency_key is refused on a dry run: a dry run journals nothing, so there is "
                             "nothing for a retry to find")


def request_digest(method: str, facts: list[Fact], options: dict, description: str) -> str:
    """sha256 of what the edit is made from, in canonical JSON (sorted keys), so the same request
    gives the same digest in any process and after an upgrade that keeps these fields."""
    payload = {"method": method, "facts": [asdict(f) for f in facts], "options": options,
               "description": description}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()
