"""Memory hygiene for a long-running server: bounded kernel caches, bounded arenas, periodic trims.

A serving process allocates tensors of ever-changing sizes (KV caches that grow by a column a step,
prefill chunks, big request bodies) from several threads. glibc's malloc gives each thread its own
arena (up to 8 per core) and keeps freed memory in them, so RSS creeps up for many minutes under steady
load without any leak (measured: +12% between minute 2 and minute 10 of bench/soak.py). Two standard
remedies, applied by ``steer serve``:

- ``mallopt(M_ARENA_MAX, 2)`` before any worker thread starts: fewer arenas, less memory stranded in
  them (the same as ``MALLOC_ARENA_MAX=2``);
- ``malloc_trim(0)`` from the engine thread every few seconds: hands freed pages back to the kernel.

Both are no-ops where the C library is not glibc.

oneDNN (under torch's CPU matmuls) builds and caches a kernel per distinct input shape, in two LRU
caches of 1024 entries each (ideep's, sized by ``LRU_CACHE_CAPACITY``, and oneDNN's primitive cache,
``ONEDNN_PRIMITIVE_CACHE_CAPACITY``). Decode attention meets a new shape at nearly every step (the
context grows by one), and each entry holds JIT code and buffers of up to ~1 MB: the caches filled for
minutes and took ~600 MB before they plateaued (measured: a bf16 (8, 2, 7, 64) x (64, T) matmul for
T = 1..500 grew RSS by 530 MB). :func:`bound_kernel_caches` caps both at 256 entries unless the
operator set them; measured on the demo model, a batch of 8 decodes as fast at 256 (or 128) entries
as at 1024: the hot shapes stay cached, only one-off shapes are rebuilt. The linear layers' input
shapes are bucketed as well (steer.packed.bucket_rows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
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


KERNEL_CACHE_ENV = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")


def bound_kernel_caches(entries: int = 256) -> dict[str, str]:
    """Cap oneDNN's kernel caches (read when the first kernel is built, so call this before any model
    work); a value the operator set in the environment is kept. Returns the values in force."""
    for name in KERNEL_CACHE_ENV:
        os.environ.setdefault(name, str(entries))
    return {name: os.environ[name] for name in KERNEL_CACHE_ENV}


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
