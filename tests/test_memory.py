"""Bounded memory in a long-running server: oneDNN's per-shape kernel caches are capped, and the
packed linear layers meet few distinct shapes (steady RSS under traffic of ever-changing shapes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from torch import nn

from server.memory import KERNEL_CACHE_ENV, bound_kernel_caches, limit_arenas, trim
from steer.packed import packing_unavailable

# 400 linear calls at 400 distinct row counts on a packed float32 weight (oneDNN on every x86 host),
# RSS growth in MiB after the calls, heap trimmed: each new shape leaves a cached kernel behind.
_GROWTH = r"""
import ctypes, gc, json, os, sys
if sys.argv[1] == "bounded":
    from server.memory import bound_kernel_caches
    bound_kernel_caches(32)
import torch
from steer.packed import PackedLinear, bucket_rows

def rss():
    gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(512, 256))
lin = PackedLinear(torch.nn.Linear(256, 512, bias=False))
call = lambda m: torch.ops.mkldnn._linear_pointwise(torch.randn(m, 256), w, None, "none", [], "")
if sys.argv[1] == "bucketed":
    call = lambda m: lin(torch.randn(m, 256))
for m in range(1, 33):
    call(m)
before = rss()
for m in range(33, 433):
    call(m)
print(json.dumps({"growth_mib": rss() - before}))
"""


def _growth(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_CACHE_ENV}
    out = subprocess.run([sys.executable, "-c", _GROWTH, mode], capture_output=True, text=True, env=env,
                         timeout=300, check=True).stdout
    return json.loads(out.splitlines()[-1])["growth_mib"]


@pytest.mark.skipif(packing_unavailable(nn.Linear(2, 2)) is not None or not sys.platform.startswith("linux"),
                    reason="needs oneDNN packing and /proc")
def test_kernel_caches_bounded_and_linear_shapes_bucketed():
    unbounded = _growth("free")
    # The premise: with torch's defaults every new shape costs memory for minutes (measured ~220 MiB
    # here). If a torch upgrade changes this, the bound below is no longer what keeps RSS flat.
    assert unbounded > 60, unbounded
    assert _growth("bounded") < 20
    assert _growth("bucketed") < unbounded / 3  # 400 row counts are 18 buckets: few kernels to cache


def test_bound_kernel_caches_keeps_what_the_operator_set(monkeypatch):
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "4096")
    assert bound_kernel_caches(256) == {"LRU_CACHE_CAPACITY": "256", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "4096"}


def test_glibc_hygiene_calls_work():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    assert limit_arenas(2) is True
    trim()  # returns whether memory was released; must not raise
