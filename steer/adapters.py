"""A weight vector's low-rank factors as LoRA adapters in PEFT layout, one per (quantized) strength.

Serving engines with multi-LoRA (vLLM) apply a weight vector per request by routing each request to
an adapter: strength s of a vector with factors (A, B) and coefficient c is the adapter with
``lora_A = A`` and ``lora_B = s * c * B`` (scaling ``lora_alpha / r = 1``), i.e. ``W + s * c * B A``,
exactly what the embedded backend adds per row. Strengths are quantized to a step so that a bounded
set of adapters serves every request (:func:`quantize_strength`), made on first use and kept in a
bounded LRU (:class:`AdapterCache`).

The files are written by ``peft`` itself (``get_peft_model`` on a meta-device skeleton of the model,
so no weights are allocated, then ``save_pretrained``): ``adapter_config.json`` +
``adapter_model.safetensors``, loadable by ``peft.PeftModel.from_pretrained`` and by vLLM.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from steer.vectors import SafetyVector, VectorError

log = logging.getLogger("steer.adapters")

# The LoRA ranks vLLM accepts as --max-lora-rank (vllm.config.lora.MaxLoRARanks).
ENGINE_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def quantize_strength(strength: float, step: float) -> float:
    """``strength`` rounded to the nearest multiple of ``step``; 0 stays 0 (no adapter: the vanilla
    model), and a positive strength never rounds down to 0 (it becomes one step): a request that asked
    for safety is never served unsteered."""
    if not (step > 0 and math.isfinite(step)):
        raise ValueError(f"strength step must be a positive number, got {step!r}")
    if strength <= 0:
        return 0.0
    q = max(1, round(strength / step)) * step
    return float(round(q, 9))  # 0.15000000000000002 -> 0.15: stable names and echoes


def lowrank_targets(vector: SafetyVector) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (A, B)}`` of a weight vector, every parameter a ``.weight`` with low-rank factors;
    a dense delta or a non-weight parameter cannot be an adapter (a clear error)."""
    if vector.kind != "weight":
        raise VectorError(f"vector {vector.name!r} is an {vector.kind} vector: only weight vectors are LoRA adapters")
    out = {}
    for param in vector.weight_params():
        lr = vector.lowrank(param)
        if lr is None:
            raise VectorError(f"vector {vector.name!r} stores {param} as a dense delta: serving it per request needs "
                              "low-rank factors (make it with --format lowrank, or merge it at load)")
        if not param.endswith(".weight"):
            raise VectorError(f"vector {vector.name!r} changes {param}: only linear weights can be LoRA targets")
        out[param.removesuffix(".weight")] = lr
    if not out:
        raise VectorError(f"vector {vector.name!r} has no weight deltas")
    return out


def adapter_rank(vector: SafetyVector) -> int:
    """The adapter's rank: the largest rank among the vector's factors (smaller ones are zero-padded)."""
    return max(a.shape[0] for a, _ in lowrank_targets(vector).values())


def engine_max_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as its maximum that fits ``rank``."""
    for r in ENGINE_RANKS:
        if r >= rank:
            return r
    raise VectorError(f"a LoRA rank of {rank} exceeds the largest vLLM serves ({ENGINE_RANKS[-1]})")


def export_lora(vector: SafetyVector, strength: float, out: Path, model_config, *,
                base_model: str | None = None) -> Path:
    """Write ``vector`` at ``strength`` as a PEFT LoRA adapter directory ``out`` (atomically: a temporary
    directory renamed into place). ``model_config`` is the served model's transformers config."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = lowrank_targets(vector)
    rank = adapter_rank(vector)
    scale = float(strength) * float(vector.config.get("coefficient", 1.0))
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(targets), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", base_model_name_or_path=base_model)
    # dtype given: from_config would otherwise switch torch's process-wide default dtype to the config's
    # (bf16) while it builds, and a server exports adapters on a request thread while its engine thread
    # allocates tensors (a float tensor made then comes out bf16). float32 is torch's default already.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    peft_model = get_peft_model(skeleton, config)
    modules = dict(peft_model.named_modules())
    for name, (a, b) in targets.items():
        module = modules.get(f"base_model.model.{name}")
        if module is None or not hasattr(module, "lora_A"):
            raise VectorError(f"vector {vector.name!r} changes {name}, which the model has no linear layer for")
        r = a.shape[0]
        a_full = torch.zeros(rank, a.shape[1], dtype=torch.float32)
        b_full = torch.zeros(b.shape[0], rank, dtype=torch.float32)
        a_full[:r], b_full[:, :r] = a.float(), b.float() * scale
        module.lora_A["default"].weight = torch.nn.Parameter(a_full, requires_grad=False)
        module.lora_B["default"].weight = torch.nn.Parameter(b_full, requires_grad=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _remove_orphans(root: Path) -> None:
    """Delete the adapter directories of servers that are gone (killed before they could clean up):
    each server's directory under ``root`` starts with its process id."""
    for d in root.iterdir():
        pid = d.name.split("-", 1)[0]
        if not (d.is_dir() and pid.isdigit()) or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
            log.info("removed the adapters of a server that is gone: %s", d)
        except PermissionError:  # alive, another user's
            pass


@dataclass
class Adapter:
    vector: str
    strength: float  # quantized
    id: int  # unique for the cache's lifetime (never reused: engines key loaded adapters by it)
    path: Path
    users: int = 0

    @property
    def name(self) -> str:
        return f"{self.vector}@{self.strength:g}"


class AdapterCache:
    """Adapters made on first use and kept in a bounded LRU under one directory.

    ``acquire`` returns the adapter for (vector, quantized strength), making it if needed, and counts
    a user; ``release`` uncounts. Beyond ``capacity`` the least recently used adapter with no users is
    dropped: ``on_evict(adapter)`` (an engine unloads it) and its files removed. Adapters in use are
    never dropped, so the cache may exceed its capacity while every adapter is in use.

    ``ready`` lets an engine keep serving while an adapter is written: it starts writing a missing
    adapter on a background thread (once per adapter) and says whether ``acquire`` would now return
    without writing files; a write that failed is raised by the next ``acquire``."""

    def __init__(self, vectors: dict[str, SafetyVector], model_config, root: Path, *, step: float, capacity: int,
                 on_evict: Callable[[Adapter], None] = lambda a: None, base_model: str | None = None) -> None:
        for v in vectors.values():
            lowrank_targets(v)  # refuse what cannot be an adapter now, not on the first request
        self.vectors, self.model_config, self.base_model = vectors, model_config, base_model
        self.step, self.capacity, self.on_evict = step, capacity, on_evict
        root.mkdir(parents=True, exist_ok=True)
        _remove_orphans(root)
        self.root = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
        self._lru: OrderedDict[tuple[str, float], Adapter] = OrderedDict()
        self._next_id = 1
        self._lock = threading.Lock()
        self.made = 0  # adapters written (first uses and re-makes after eviction)
        self._making: dict[tuple[str, float], Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="steer-adapters")

    def quantize(self, strength: float) -> float:
        return quantize_strength(strength, self.step)

    def _key(self, vector: str, strength: float) -> tuple[str, float]:
        q = self.quantize(strength)
        if q == 0:
            raise ValueError("strength 0 is the vanilla model: no adapter")
        return vector, q

    def _new(self, key: tuple[str, float]) -> Adapter:
        """Write the adapter for ``key`` (never with the lock held: writing takes a while)."""
        with self._lock:
            ad = Adapter(key[0], key[1], self._next_id, self.root / f"{key[0]}-{self._next_id}")
            self._next_id += 1
        export_lora(self.vectors[key[0]], key[1], ad.path, self.model_config, base_model=self.base_model)
        log.info("made LoRA adapter %s (id %d)", ad.name, ad.id)
        return ad

    def _keep(self, key: tuple[str, float], ad: Adapter) -> Adapter:
        """Add a freshly written adapter (lock held); if another write of the same key got there first,
        keep that one and delete this one's files."""
        self.made += 1
        kept = self._lru.setdefault(key, ad)
        if kept is not ad:
            shutil.rmtree(ad.path, ignore_errors=True)
        return kept

    def _make_in_background(self, key: tuple[str, float]) -> None:
        ad = self._new(key)  # an exception stays in the future, for acquire() to raise
        with self._lock:
            self._keep(key, ad)
            self._making.pop(key, None)

    def ready(self, vector: str, strength: float) -> bool:
        key = self._key(vector, strength)
        with self._lock:
            if key in self._lru:
                return True
            fut = self._making.get(key)
            if fut is None:
                self._making[key] = self._pool.submit(self._make_in_background, key)
                return False
            return fut.done()

    def pending(self) -> list[Future]:
        """Adapters being written (an engine with nothing else to do waits on these)."""
        with self._lock:
            return [f for f in self._making.values() if not f.done()]

    def acquire(self, vector: str, strength: float) -> Adapter:
        key = self._key(vector, strength)
        while True:
            with self._lock:
                ad = self._lru.get(key)
                if ad is not None:
                    return self._use(key, ad)
                fut = self._making.get(key)
            if fut is None:
                break
            try:  # being written in the background: wait for it, then look again
                fut.result()
            except BaseException:  # the write failed: this request fails, the next one retries
                with self._lock:
                    if self._making.get(key) is fut:
                        del self._making[key]
                raise
        made = self._new(key)
        with self._lock:
            return self._use(key, self._keep(key, made))

    def _use(self, key: tuple[str, float], ad: Adapter) -> Adapter:
        """Count a user and mark recently used (lock held: no eviction can come between)."""
        self._lru.move_to_end(key)
        ad.users += 1
        self._evict()
        return ad

    def release(self, ad: Adapter) -> None:
        with self._lock:
            ad.users = max(0, ad.users - 1)
            self._evict()

    def _evict(self) -> None:
        while len(self._lru) > self.capacity:
            idle = next((k for k, a in self._lru.items() if a.users == 0), None)
            if idle is None:
                return
            ad = self._lru.pop(idle)
            try:
                self.on_evict(ad)
            finally:
                shutil.rmtree(ad.path, ignore_errors=True)
            log.info("dropped LoRA adapter %s (id %d)", ad.name, ad.id)

    def loaded(self) -> list[str]:
        """Adapter names, least recently used first."""
        with self._lock:
            return [a.name for a in self._lru.values()]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.root, ignore_errors=True)
