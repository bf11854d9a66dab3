"""A weight vector's low-rank factors as PEFT LoRA adapters (how the vLLM backend serves per-request
strengths): strength quantization, the export checked against ``peft`` loading it and against the
merged weights, and the bounded LRU of adapters."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_vector
from hypothesis import given
from hypothesis import strategies as st
from peft import PeftModel
from test_weight_vectors import make_weight_vector

from steer.adapters import (
    ENGINE_RANKS,
    AdapterCache,
    adapter_rank,
    engine_max_rank,
    export_lora,
    lowrank_targets,
    quantize_strength,
)
from steer.hooks import merge_weight_vector
from steer.vectors import VectorError


def test_quantize_strength_examples():
    assert quantize_strength(0.0, 0.05) == 0.0
    assert quantize_strength(-1.0, 0.05) == 0.0
    assert quantize_strength(0.001, 0.05) == 0.05  # asked for safety: never rounded to none
    assert quantize_strength(0.53, 0.05) == 0.55
    assert quantize_strength(0.15, 0.05) == 0.15  # not 0.15000000000000002: stable names and echoes
    assert quantize_strength(1.0, 0.05) == 1.0
    assert quantize_strength(1.3, 0.25) == 1.25
    for bad in (0.0, -0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="strength step"):
            quantize_strength(1.0, bad)


@given(st.floats(0, 8, allow_nan=False), st.sampled_from([0.01, 0.05, 0.1, 0.25, 0.5]))
def test_quantize_strength_properties(s, step):
    q = quantize_strength(s, step)
    if s == 0:
        assert q == 0
        return
    assert q > 0
    assert abs(q / step - round(q / step)) < 1e-6  # a multiple of the step
    assert abs(q - s) <= step / 2 + 1e-9 or q == step  # nearest, or one step for tiny strengths
    assert quantize_strength(q, step) == q  # idempotent


def test_engine_max_rank():
    assert engine_max_rank(1) == 1
    assert engine_max_rank(4) == 8
    assert engine_max_rank(16) == 16
    assert engine_max_rank(17) == 32
    with pytest.raises(VectorError, match="exceeds"):
        engine_max_rank(ENGINE_RANKS[-1] + 1)


def _ragged(model):
    """A weight vector whose factors differ in rank (one tensor truncated to rank 2 of 4)."""
    v = make_weight_vector(model, name="w", rank=4, scale=2.0, coefficient=1.5)
    first = sorted(k for k in v.tensors if k.startswith("lora_A."))[0]
    v.tensors[first] = v.tensors[first][:2].clone()
    b = "lora_B." + first.removeprefix("lora_A.")
    v.tensors[b] = v.tensors[b][:, :2].clone()
    return v


def test_export_loads_in_peft_and_equals_the_merged_weights(tiny_model, tmp_path):
    """peft reads the adapter back, and the adapted model's logits are the model with
    ``W + s * c * B A`` merged, for ragged ranks (zero-padded) and a coefficient."""
    vector = _ragged(tiny_model)
    assert adapter_rank(vector) == 4
    out = export_lora(vector, 0.7, tmp_path / "ad", tiny_model.config)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4
    assert sorted(cfg["target_modules"]) == sorted(lowrank_targets(vector))
    assert (out / "adapter_model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind

    ids = torch.tensor([[3, 17, 40, 9, 22, 5]])
    adapted = PeftModel.from_pretrained(copy.deepcopy(tiny_model), out).eval()
    merged = copy.deepcopy(tiny_model)
    changed = merge_weight_vector(merged, vector, 0.7)
    assert len(changed) == len(lowrank_targets(vector))
    with torch.no_grad():
        got, want, base = adapted(ids).logits, merged(ids).logits, tiny_model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - base).abs().max() > 1e-3  # the adapter does something


def test_only_lowrank_weight_vectors_are_adapters(tiny_qwen, tmp_path):
    with pytest.raises(VectorError, match="dense delta"):
        lowrank_targets(make_weight_vector(tiny_qwen, name="d", dense=True))
    with pytest.raises(VectorError, match="activation vector"):
        lowrank_targets(make_vector(tiny_qwen))
    with pytest.raises(VectorError, match="dense delta"):
        AdapterCache({"d": make_weight_vector(tiny_qwen, name="d", dense=True)}, tiny_qwen.config, tmp_path,
                     step=0.05, capacity=2)


def test_adapter_cache_lru(tiny_qwen, tmp_path):
    """Same quantized strength, same adapter; beyond capacity the least recently used idle adapter is
    dropped (unloaded, files gone); adapters in use are never dropped; ids are never reused."""
    evicted = []
    cache = AdapterCache({"w": make_weight_vector(tiny_qwen, name="w")}, tiny_qwen.config, tmp_path,
                         step=0.1, capacity=2, on_evict=evicted.append)
    with pytest.raises(ValueError, match="no adapter"):
        cache.acquire("w", 0.0)
    a = cache.acquire("w", 0.51)
    assert (a.name, a.strength) == ("w@0.5", 0.5)
    assert cache.acquire("w", 0.49) is a and a.users == 2  # 0.49 and 0.51 both round to 0.5
    b = cache.acquire("w", 1.0)
    c = cache.acquire("w", 1.5)  # three in use, capacity 2: nothing idle to drop
    assert cache.loaded() == ["w@0.5", "w@1", "w@1.5"] and not evicted
    cache.release(b)  # idle now: dropped, being the least recently used idle one
    assert [e.name for e in evicted] == ["w@1"] and not b.path.exists()
    assert a.path.exists() and c.path.exists()
    cache.release(c)
    cache.release(a)
    cache.release(a)
    assert cache.loaded() == ["w@0.5", "w@1.5"]  # within capacity: kept
    b2 = cache.acquire("w", 1.0)  # made again, under a new id
    assert b2.id not in {a.id, b.id, c.id} and cache.made == 4
    assert [e.name for e in evicted] == ["w@1", "w@0.5"]  # the least recently used idle one
    cache.close()
    assert not cache.root.exists()


def test_adapters_of_dead_servers_are_removed(tiny_qwen, tmp_path):
    """Each server's adapters live in a directory named by its pid; a new cache deletes those of
    processes that are gone and keeps live ones'."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"{dead.pid}-abc" / "w-1").mkdir(parents=True)
    (tmp_path / f"{os.getppid()}-def").mkdir()  # alive
    (tmp_path / "notes").mkdir()  # not ours
    cache = AdapterCache({"w": make_weight_vector(tiny_qwen, name="w")}, tiny_qwen.config, tmp_path, step=0.1,
                         capacity=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{os.getppid()}-def", "notes", cache.root.name])
    assert cache.root.name.startswith(f"{os.getpid()}-")
    cache.close()


def test_adapters_are_written_in_the_background(tiny_qwen, tmp_path, monkeypatch):
    """``ready`` starts writing a missing adapter on a background thread (once) and says when
    ``acquire`` would not write files; ``acquire`` then returns that adapter without writing another. A
    background write that fails fails the next ``acquire`` (one request), and the one after retries."""
    import threading

    import steer.adapters as adapters

    cache = AdapterCache({"w": make_weight_vector(tiny_qwen, name="w")}, tiny_qwen.config, tmp_path,
                         step=0.1, capacity=4)
    gate, real = threading.Event(), adapters.export_lora
    writers = []

    def slow_export(*args, **kwargs):
        writers.append(threading.current_thread().name)
        assert gate.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(adapters, "export_lora", slow_export)
    assert cache.ready("w", 0.5) is False
    assert cache.ready("w", 0.5) is False and len(cache.pending()) == 1  # one write, not two
    assert cache.made == 0 and cache.loaded() == []
    gate.set()
    for f in cache.pending():
        f.result(timeout=30)
    assert cache.ready("w", 0.5) is True and cache.made == 1
    a = cache.acquire("w", 0.5)
    assert cache.made == 1 and a.users == 1 and (a.path / "adapter_config.json").exists()
    assert writers == ["steer-adapters_0"]  # written off the caller's thread

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "export_lora", broken)
    assert cache.ready("w", 1.0) is False
    for f in cache.pending():
        f.exception(timeout=30)
    assert cache.ready("w", 1.0) is True  # done: acquire will not block, it reports the failure
    with pytest.raises(OSError, match="disk full"):
        cache.acquire("w", 1.0)
    monkeypatch.setattr(adapters, "export_lora", real)
    assert cache.ready("w", 1.0) is False  # the next request writes it again
    b = cache.acquire("w", 1.0)  # waits for that write
    assert b.name == "w@1" and cache.made == 2 and cache.loaded() == ["w@0.5", "w@1"]
    cache.close()


def test_export_leaves_the_process_default_dtype_alone(tiny_qwen, tmp_path, monkeypatch):
    """The server exports adapters on a request thread while its engine thread allocates tensors, and
    torch's default dtype is process-wide: building the PEFT skeleton must not switch it to the served
    model's dtype (transformers' from_config does, for a bf16 config, unless told otherwise). A float
    tensor made in that window came out bf16 and failed an engine step."""
    config = copy.deepcopy(tiny_qwen.config)
    config.dtype = torch.bfloat16  # the served checkpoints are bf16
    switched = []
    real = torch.set_default_dtype
    monkeypatch.setattr(torch, "set_default_dtype", lambda d: (switched.append(d), real(d))[1])
    export_lora(make_weight_vector(tiny_qwen, name="w"), 0.5, tmp_path / "ad", config)
    assert torch.get_default_dtype() == torch.float32
    assert all(d == torch.float32 for d in switched), switched
