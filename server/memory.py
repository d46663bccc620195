"""Keeping the server's resident memory flat under many threads.

glibc gives each thread that allocates while another holds the main heap's lock an arena of
its own, up to 8 per core, and an arena keeps the memory it once held. The server has ~100
gRPC worker threads that each, now and then, build a tensor (a prompt, a Score batch, an
edit's temporaries): with glibc's default the server grew 9 % (tiny model) and 24 %
(SmolLM2, FT-L edits) over 10 minutes of 64 streams and an edit every 10 s, and in an A/B
of 4 minutes on the tiny model 4.0 % with the default against 1.6 % with 2 arenas
(docs/RELIABILITY.md, Load). Capping the arenas makes freed
memory reusable by every thread. Set through ``mallopt`` at start-up (before the worker
threads exist), so it is the server's own setting, not an environment variable that a
deployment may or may not carry.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # from glibc's malloc.h


def _libc_function(name: str):
    """A function of the C library the process runs on, or None where it has none of that
    name (not glibc). ``CDLL(None)`` is the process's own symbol table: no library search."""
    try:
        return getattr(ctypes.CDLL(None), name, None)
    except OSError:
        return None


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas at ``arenas`` (0: leave glibc's default). Returns whether the
    cap was set; False where the C library is not glibc (musl, macOS), which is harmless."""
    if arenas <= 0:
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        log.info("malloc arenas not capped: the C library has no mallopt")
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``); False elsewhere.

    An edit, a revert or a trace allocates and frees far more than a generation step. glibc
    keeps what was freed for reuse; measured in-process on the tiny model, 60 ROME edits and
    reverts left the process 5.9 MiB larger, 1.5 MiB after one ``malloc_trim`` (6 ms). Called
    when such an operation ends, so the resident size follows what is live."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True
