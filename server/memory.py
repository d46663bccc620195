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
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # from glibc's malloc.h


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas at ``arenas`` (0: leave glibc's default). Returns whether the
    cap was set; False where the C library is not glibc (musl, macOS), which is harmless."""
    if arenas <= 0:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None:
        log.info("malloc arenas not capped: the C library has no mallopt")
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))
