"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import httpx


def wait_healthy(proc: subprocess.Popen, port: int, *, timeout: float, what: str) -> subprocess.Popen:
    """Return ``proc`` once GET /health on ``port`` answers 200; raise RuntimeError if it exits or times out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{what} did not become healthy in {timeout:g} s")


def interleaved(names: list[str], repeats: int) -> Iterator[str]:
    """Every name once per repeat, the order rotated each repeat, so slow drift of the machine
    spreads evenly over the modes being compared."""
    for rep in range(repeats):
        k = rep % len(names)
        yield from names[k:] + names[:k]
