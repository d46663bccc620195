"""Bearer tokens read from files, re-read when the file changes.

A token lives in a file rather than on the command line or in the environment because both
of those leak (``ps``, ``/proc/PID/environ``, crash reports), and because a Kubernetes Secret
mounted as a volume *is* a file that the kubelet replaces atomically when the Secret
changes. Watching the file therefore gives rotation without a restart for free.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16  # shorter tokens can be guessed; `openssl rand -hex 32` gives 64
MAX_TOKEN_CHARS = 4096  # it travels in an HTTP/2 header; gRPC's default header budget is 8 KiB
CHECK_INTERVAL_S = 1.0  # how often (at most) the file is stat()ed for a rotation


class TokenFileError(ValueError):
    """A token file that cannot be used; the message names the file, never the token."""


def read_token(path: Path) -> bytes:
    """The token in ``path``, surrounding whitespace stripped (editors and
    ``kubectl create secret --from-file`` leave a trailing newline). It must be 16 to 4096
    visible ASCII characters without whitespace, since clients send it as the header
    ``authorization: Bearer <token>``."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_TOKEN_CHARS + 1024)  # bounded: a wrong path could be huge
    except OSError as error:
        raise TokenFileError(f"token file {path}: cannot read it ({error.strerror or error})") from None
    token = raw.strip()
    if not token:
        raise TokenFileError(f"token file {path} is empty")
    if len(token) > MAX_TOKEN_CHARS:
        raise TokenFileError(f"token file {path}: the token is longer than {MAX_TOKEN_CHARS} characters")
    if any(byte < 0x21 or byte > 0x7E for byte in token):
        raise TokenFileError(f"token file {path}: the token must be visible ASCII without whitespace "
                             "(it is sent as 'authorization: Bearer <token>')")
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenFileError(f"token file {path}: the token has {len(token)} characters, at least "
                             f"{MIN_TOKEN_CHARS} are required (e.g. `openssl rand -hex 32`)")
    return token


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is rewritten or (Kubernetes) its symlink is swapped."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class TokenFile:
    """The current token of one file, compared in constant time.

    ``matches`` stats the file at most once per ``check_interval`` seconds and re-reads it
    when its mtime, size or inode changed. A re-read that fails (the file briefly missing or
    half-written by a non-atomic rewrite) keeps the previous token and logs why: refusing
    every caller because of a half-written file would be an outage, and the previous token
    was valid a moment ago. The failure is logged once per change of the file.
    """

    def __init__(self, path: Path | str, *, check_interval: float = CHECK_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self._interval = check_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp = _stamp(self.path)
        self._digest = _digest(read_token(self.path))  # raises at start-up: a clear error
        self._checked = clock()

    def _refresh(self) -> None:
        now = self._clock()
        if now - self._checked < self._interval:
            return
        with self._lock:
            if now - self._checked < self._interval:
                return
            self._checked = now
            stamp = _stamp(self.path)
            if stamp == self._stamp:
                return
            self._stamp = stamp
            if stamp is None:
                log.error("token file %s is missing; keeping the previous token", self.path)
                return
            try:
                self._digest = _digest(read_token(self.path))
            except TokenFileError as error:
                log.error("%s; keeping the previous token", error)
                return
            log.info("token file %s changed: the new token is in use", self.path)

    def matches(self, presented: bytes) -> bool:
        """Constant time in the token's content and length: both sides are hashed first,
        then compared with ``hmac.compare_digest``."""
        self._refresh()
        return hmac.compare_digest(_digest(presented), self._digest)
