"""glibc heap hygiene for a long-running server: bounded arenas and periodic trims.

A serving process allocates tensors of ever-changing sizes (KV caches that grow by a column a step,
prefill chunks, big request bodies) from several threads. glibc's malloc gives each thread its own
arena (up to 8 per core) and keeps freed memory in them, so RSS creeps up for many minutes under steady
load without any leak (measured: +12% between minute 2 and minute 10 of bench/soak.py). Two standard
remedies, applied by ``steer serve``:

- ``mallopt(M_ARENA_MAX, 2)`` before any worker thread starts: fewer arenas, less memory stranded in
  them (the same as ``MALLOC_ARENA_MAX=2``);
- ``malloc_trim(0)`` from the engine thread every few seconds: hands freed pages back to the kernel.

Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from functools import cache

log = logging.getLogger("steer.server")

M_ARENA_MAX = -8  # glibc's mallopt parameter number


@cache
def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 - glibc only
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def limit_arenas(n: int = 2) -> bool:
    """At most ``n`` malloc arenas for the threads created from now on (True if applied)."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_ARENA_MAX, n))


def trim() -> bool:
    """Return freed heap memory to the kernel (True if some was released)."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


class Trimmer:
    """Calls :func:`trim` at most every ``interval`` seconds (from one thread, e.g. the engine's loop)."""

    def __init__(self, interval: float = 5.0):
        self.interval, self._last = interval, time.monotonic()

    def maybe(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            trim()
