"""What this host's CPU can do for inference, and which kernels (compute dtype, packed or plain linear
weights) to serve with.

Hosts differ in ways that decide the fastest setup. Where oneDNN has bf16 kernels (AVX-512 BW/VL/DQ,
AVX-512 BF16, AMX, AVX-NE-CONVERT; ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``), bfloat16 with
oneDNN-packed linear weights is fastest, and no measurement is needed. Where it has none (AVX2/FMA-only
CPUs), bf16 matmuls fall to slow non-oneDNN kernels (several times slower than float32 at prefill
sizes), bf16 weights cannot be packed, and float32 can be packed or plain: :func:`choose` then times
the candidates on the model's own matmul shape for well under a second and keeps the fastest.

:func:`detect` reads /proc/cpuinfo (raw hardware flags; empty elsewhere) and torch's own view (its
ATen vector ISA, oneDNN, oneDNN bf16). The two can disagree: ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` makes torch behave as on an AVX2 host while the flags still list AVX-512.
Decisions follow torch's view, the flags are reported for humans. :func:`packing_supported` is the one
capability check for oneDNN packing; it looks up :func:`detect` at call time, so a test that
monkeypatches ``steer.hardware.detect`` changes every decision made through this module.

torch is the only dependency; nothing here changes global torch state (threads, grad mode, RNG).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import torch

# Raw flags worth reporting (x86 /proc/cpuinfo "flags"; the last three are aarch64 "Features").
RELEVANT_FLAGS = (
    "avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_bf16", "avx_ne_convert",
    "amx_tile", "amx_bf16", "asimd", "sve", "bf16",
)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
LINEAR_WEIGHTS = ("packed", "plain", "hybrid")

# The probe: input rows of a single stream's decode step, a batch of 8 decoding, and a prefill;
# untimed warm-up calls then timed calls (the median counts), candidates in preference order (earlier
# wins ties and is the fallback).
PROBE_ROWS = (1, 8, 128)
PROBE_WARMUP = 1
PROBE_REPEATS = 3
PROBE_CANDIDATES: tuple[tuple[torch.dtype, str], ...] = (
    (torch.float32, "packed"),
    (torch.float32, "plain"),
    (torch.bfloat16, "plain"),
    (torch.float32, "hybrid"),  # steer.packed.HybridLinear: bf16 gemv for one row, packed float32 else
)


class HardwareError(RuntimeError):
    """An explicit kernel setting this host cannot run; ``str(err)`` is one line."""


# -- host capabilities -----------------------------------------------------------------------------

@dataclass(frozen=True)
class HostCaps:
    """The CPU as the hardware reports it and as torch sees it (a snapshot taken by :func:`detect`)."""

    cpu_model: str
    flags: tuple[str, ...]  # the RELEVANT_FLAGS present, in that order
    flags_known: bool  # False where /proc/cpuinfo could not be read (non-Linux): flags are then empty
    torch_capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", "DEFAULT", ...
    mkldnn: bool  # torch.backends.mkldnn.is_available()
    mkldnn_bf16: bool  # torch.ops.mkldnn._is_mkldnn_bf16_supported()
    threads: int  # torch.get_num_threads() when detected
    cpus: int  # CPUs this process may run on
    torch_version: str = ""

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def avx2(self) -> bool:
        return self.has("avx2")

    @property
    def avx512(self) -> bool:
        """The hardware has AVX-512 (the avx512f flag), whatever torch is limited to."""
        return self.has("avx512f")

    @property
    def avx512_bf16(self) -> bool:
        return self.has("avx512_bf16")

    @property
    def amx(self) -> bool:
        return self.has("amx_tile") and self.has("amx_bf16")

    @property
    def onednn_bf16(self) -> bool:
        """oneDNN has bf16 kernels here: bf16 matmuls are fast and bf16 weights can be packed."""
        return self.mkldnn and self.mkldnn_bf16

    def to_dict(self) -> dict:
        return {
            "cpu_model": self.cpu_model,
            "flags": list(self.flags),
            "flags_known": self.flags_known,
            "avx2": self.avx2,
            "avx512": self.avx512,
            "avx512_bf16": self.avx512_bf16,
            "amx": self.amx,
            "torch_capability": self.torch_capability,
            "onednn": self.mkldnn,
            "onednn_bf16": self.onednn_bf16,
            "threads": self.threads,
            "cpus": self.cpus,
            "torch_version": self.torch_version,
        }

    def summary(self) -> str:
        """One line, e.g. 'AMD EPYC, avx2 fma avx512 avx512_bf16, torch AVX512, oneDNN bf16 yes, 2 threads'."""
        if self.flags_known:
            isa = [f for f in ("avx2", "fma") if self.has(f)]
            isa.append("avx512" if self.avx512 else "no avx512")
            isa += [f for f in ("avx512_bf16", "avx_ne_convert") if self.has(f)]
            if self.amx:
                isa.append("amx")
            isa += [f for f in ("asimd", "sve", "bf16") if self.has(f)]
            flags = " ".join(isa)
        else:
            flags = "cpu flags unknown"
        onednn = ("oneDNN bf16 yes" if self.onednn_bf16 else "oneDNN bf16 no") if self.mkldnn else "no oneDNN"
        return f"{self.cpu_model}, {flags}, torch {self.torch_capability}, {onednn}, {self.threads} threads"


def _read_cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, tuple[str, ...], bool]:
    """(model name, relevant flags present, whether the flags could be read)."""
    model, flags, known = "", set(), False
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if not sep:
                    continue
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not known:
                    flags, known = set(value.split()), True
    except OSError:
        pass
    return model, tuple(f for f in RELEVANT_FLAGS if f in flags), known


def _torch_bool(fn: Callable[[], bool]) -> bool:
    try:
        return bool(fn())
    except Exception:  # an op missing from this build means the feature is missing
        return False


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@cache
def detect() -> HostCaps:
    """This host's capabilities, read once per process (``detect.cache_clear()`` to re-read)."""
    model, flags, known = _read_cpuinfo()
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except Exception:
        capability = "unknown"
    mkldnn = _torch_bool(torch.backends.mkldnn.is_available)
    return HostCaps(
        cpu_model=model or platform.processor() or platform.machine() or "unknown CPU",
        flags=flags,
        flags_known=known,
        torch_capability=capability,
        mkldnn=mkldnn,
        mkldnn_bf16=mkldnn and _torch_bool(torch.ops.mkldnn._is_mkldnn_bf16_supported),
        threads=torch.get_num_threads(),
        cpus=_cpus(),
        torch_version=torch.__version__,
    )


def packing_supported(dtype: torch.dtype, caps: HostCaps | None = None) -> str | None:
    """Why linear weights of ``dtype`` cannot be packed for oneDNN on this host, or None if they can.
    ``caps`` defaults to :func:`detect` (looked up at call time)."""
    caps = detect() if caps is None else caps
    if not caps.mkldnn:
        return "this torch build has no oneDNN (mkldnn)"
    if dtype == torch.bfloat16 and not caps.onednn_bf16:
        return f"oneDNN has no bf16 kernels on this CPU ({caps.cpu_model}, torch {caps.torch_capability})"
    if dtype not in (torch.bfloat16, torch.float32):
        return f"dtype {_name(dtype)} is not packed (bf16 and float32 are)"
    return None


# -- kernel choice ---------------------------------------------------------------------------------

def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _key(dtype: torch.dtype, weights: str) -> str:
    return f"{_name(dtype)}+{weights}"


@dataclass(frozen=True)
class KernelChoice:
    """What to serve with: ``dtype`` for the model, ``linear_weights`` packed, plain or hybrid
    (steer.packed.HybridLinear: a float32 model whose one-row inputs go through a bf16 copy of the
    weights and larger inputs through a packed float32 copy; for CPUs without oneDNN bf16).

    ``how`` says what decided: "setting" (both given explicitly), "capability" (the host's
    capabilities leave one sensible option), "probe" (timed on this host), "fallback" (a probe was
    wanted but disabled or impossible). ``probe`` maps each timed candidate ("float32+packed", ...) to
    its median ``rows_R_ms`` for each probed row count R and its ``score`` (the sum over R of ms per
    row; lower is better)."""

    dtype: torch.dtype
    linear_weights: str
    how: str
    reason: str
    probe: dict[str, dict[str, float]] | None = field(default=None, hash=False)
    caps: HostCaps | None = field(default=None, compare=False, repr=False)

    @property
    def packed(self) -> bool:
        """The linear layers get oneDNN-packed weights (packed, or hybrid: see steer.packed)."""
        return self.linear_weights in ("packed", "hybrid")

    @property
    def hybrid(self) -> bool:
        return self.linear_weights == "hybrid"

    def to_dict(self) -> dict:
        return {
            "dtype": _name(self.dtype),
            "linear_weights": self.linear_weights,
            "how": self.how,
            "reason": self.reason,
            "probe": None if self.probe is None else {
                k: {m: round(v, 4) for m, v in r.items()} for k, r in self.probe.items()},
        }

    def summary(self) -> str:
        """One log line, e.g. 'kernels: float32, packed linear weights (probe: float32+packed 0.29 ms/row,
        ...; cpu: AMD EPYC, avx2 fma no avx512, torch AVX2, oneDNN bf16 no, 2 threads)'."""
        if self.how == "probe" and self.probe:
            why = "probe: " + ", ".join(f"{k} {v['score']:.3g} ms/row" for k, v in self.probe.items())
        else:
            why = f"{self.how}: {self.reason}"
        if self.caps is not None:
            why += f"; cpu: {self.caps.summary()}"
        return " ".join(f"kernels: {_name(self.dtype)}, {self.linear_weights} linear weights ({why})".split())


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype | None:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be 'auto', 'bfloat16' or 'float32', got {dtype}")
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto', 'bfloat16' or 'float32', got {dtype!r}")
    return DTYPES[dtype]


def choose(
    caps: HostCaps,
    *,
    dtype: str | torch.dtype = "auto",
    linear_weights: str = "auto",
    hidden_size: int,
    intermediate_size: int,
    probe: bool = True,
    timer: Callable[[], float] = time.perf_counter,
) -> KernelChoice:
    """Pick the compute dtype and linear-weight layout for a model on this host.

    Explicit settings are honoured: an explicit dtype is kept (with a warning in ``reason`` when
    bfloat16 is forced on a host without oneDNN bf16: it works, slowly), an explicit "plain" is kept,
    and an explicit "packed" or "hybrid" the host cannot do raises :class:`HardwareError`.

    "auto" is decided by capability where it can be: bfloat16 (packed) where oneDNN has bf16 kernels;
    bfloat16 is never packed without them, float32 never packed (nor hybrid) without oneDNN.
    Where several candidates remain among (float32, packed), (float32, plain), (bfloat16, plain),
    (float32, hybrid), a short probe times them on the model's real matmul shape, an
    (hidden_size -> intermediate_size) linear, at PROBE_ROWS input rows (1: one stream decoding, 8: a
    batch decoding, 128: a prefill): per shape, one untimed warm-up call per candidate, then 3 rounds
    timing each candidate once in turn; each candidate's median counts. The score is the sum over the
    shapes of ms per row (each regime's per-token cost, weighted equally); the lowest wins (ties: the
    order above). Measured at 896 -> 4864 on 2 cores: well under a second.

    ``timer`` is called twice around each timed call, in the order: shapes in PROBE_ROWS order; per
    round, candidates in the order above. With ``probe=False``, or where timing fails (a raised error,
    a non-positive or non-finite reading), the fallback is float32 packed where oneDNN can pack it,
    else float32 plain (``how="fallback"``).
    """
    want_dtype = _parse_dtype(dtype)
    if linear_weights not in ("auto", *LINEAR_WEIGHTS):
        raise ValueError(f"linear_weights must be 'auto', 'packed', 'plain' or 'hybrid', got {linear_weights!r}")

    warning = ""
    if want_dtype == torch.bfloat16 and not caps.onednn_bf16:
        warning = (" Warning: bfloat16 was asked on a CPU without oneDNN bf16 kernels: it works but "
                   "matmuls are slow here; dtype=float32 (or auto) is faster.")

    if linear_weights == "packed":
        d = want_dtype or (torch.bfloat16 if caps.onednn_bf16 else torch.float32)
        why = packing_supported(d, caps)
        if why is not None:
            raise HardwareError(_packed_refusal(d, want_dtype is not None, why, caps))
    if linear_weights == "hybrid":
        _check_hybrid(want_dtype, caps)
        want_dtype = torch.float32

    def done(d: torch.dtype, w: str, how: str, reason: str, measured=None) -> KernelChoice:
        return KernelChoice(d, w, how, (reason + warning).strip(), measured, caps)

    if want_dtype is not None and linear_weights != "auto":
        return done(want_dtype, linear_weights, "setting",
                    f"{_name(want_dtype)} and {linear_weights} linear weights as set")
    if want_dtype is None and caps.onednn_bf16:
        w = "plain" if linear_weights == "plain" else "packed"
        return done(torch.bfloat16, w, "capability", "oneDNN has bf16 kernels on this CPU: bfloat16"
                    + (", plain linear weights as set" if w == "plain" else " with packed linear weights"))
    if want_dtype == torch.bfloat16 and caps.onednn_bf16:  # linear_weights auto
        return done(torch.bfloat16, "packed", "capability",
                    "bfloat16 as set, packed linear weights (oneDNN has bf16 kernels on this CPU)")
    if want_dtype is None and linear_weights == "packed":  # float32 is all this CPU can pack
        return done(torch.float32, "packed", "capability", "packed linear weights as set; float32, the "
                    "only dtype oneDNN packs on this CPU (no oneDNN bf16)")

    # Left: a CPU without oneDNN bf16 (bf16 is never packed there), or float32 set.
    cands = [
        (d, w) for d, w in PROBE_CANDIDATES
        if (want_dtype is None or d == want_dtype)
        and (linear_weights == "auto" or w == linear_weights)
        and (w == "plain" or packing_supported(d, caps) is None)
    ]
    if len(cands) == 1:  # one option: float32 or bfloat16 where oneDNN is missing
        d, w = cands[0]
        why = packing_supported(d, caps) if w == "plain" else None
        return done(d, w, "capability", f"{_name(d)} as set; {w} linear weights" + (f": {why}" if why else ""))
    fallback = cands[0]
    if not probe:
        return done(*fallback, "fallback", f"probe disabled: {_key(*fallback)}, the default without "
                    "oneDNN bf16" if want_dtype is None else f"probe disabled: {_key(*fallback)}")
    try:
        measured = _probe(cands, hidden_size, intermediate_size, timer)
    except Exception as e:  # timing impossible here: do not fail startup over a measurement
        msg = " ".join(str(e).split())[:200]
        return done(*fallback, "fallback", f"probe failed ({type(e).__name__}: {msg}): {_key(*fallback)}")
    best = min(cands, key=lambda c: measured[_key(*c)]["score"])  # min keeps the first of equals
    table = ", ".join(f"{k} {v['score']:.3g}" for k, v in measured.items())
    rows = " + ".join(f"ms/row at {r} row{'s' if r > 1 else ''}" for r in PROBE_ROWS)
    return done(*best, "probe",
                f"probe on a {hidden_size}->{intermediate_size} linear, score = {rows}, lower is better: "
                f"{table} -> {_key(*best)}", measured)


def _check_hybrid(want_dtype: torch.dtype | None, caps: HostCaps) -> None:
    if want_dtype == torch.bfloat16:
        raise HardwareError("cannot use linear_weights=hybrid with dtype=bfloat16: hybrid is a float32 model "
                            "with a bf16 copy of its weights for one-row steps; pass dtype=float32 (or auto)")
    why = packing_supported(torch.float32, caps)
    if why is not None:
        raise HardwareError(f"cannot use linear_weights=hybrid: {why}; pass linear_weights=plain or auto")


def _packed_refusal(d: torch.dtype, explicit_dtype: bool, why: str, caps: HostCaps) -> str:
    asked = f"linear_weights=packed with dtype={_name(d)}" if explicit_dtype else "linear_weights=packed"
    if not caps.mkldnn:
        instead = "pass linear_weights=plain or auto"
    else:  # only bf16 lacks support here; float32 can be packed
        instead = "pass linear_weights=plain or auto, or dtype=float32 (or auto) to pack in float32"
    return f"cannot use {asked}: {why}; {instead}"


def _probe(cands, hidden: int, inter: int, timer: Callable[[], float]) -> dict[str, dict[str, float]]:
    """Median ms per candidate and shape, and the score; raises where timing is impossible."""
    if hidden < 1 or inter < 1:
        raise ValueError(f"bad matmul shape {hidden}x{inter}")
    g = torch.Generator().manual_seed(0)  # a private generator: the global RNG is left alone
    with torch.inference_mode():  # thread-local and restored on exit
        w32 = torch.randn(inter, hidden, generator=g) * 0.02
        weights = {torch.float32: w32, torch.bfloat16: w32.to(torch.bfloat16)}
        fns = {(d, w): _probe_fn(d, w, weights) for d, w in cands}
        ms: dict[tuple, list[float]] = {(c, rows): [] for c in cands for rows in PROBE_ROWS}
        for rows in PROBE_ROWS:
            x32 = torch.randn(rows, hidden, generator=g)
            xs = {torch.float32: x32, torch.bfloat16: x32.to(torch.bfloat16)}
            for c in cands:
                for _ in range(PROBE_WARMUP):
                    fns[c](xs[c[0]])
            for _ in range(PROBE_REPEATS):
                for c in cands:
                    t0 = timer()
                    fns[c](xs[c[0]])
                    ms[c, rows].append((timer() - t0) * 1e3)
    out = {}
    for c in cands:
        med = {rows: statistics.median(ms[c, rows]) for rows in PROBE_ROWS}
        if not all(math.isfinite(v) and v > 0 for v in med.values()):
            raise RuntimeError(f"timer gave unusable readings for {_key(*c)} ({list(med.values())!r} ms)")
        out[_key(*c)] = {**{f"rows_{r}_ms": v for r, v in med.items()},
                         "score": sum(v / r for r, v in med.items())}
    return out


def _probe_fn(d: torch.dtype, w: str, weights: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """The candidate's linear, as steer.packed runs it (x in the candidate's dtype)."""
    pointwise = torch.ops.mkldnn._linear_pointwise
    if w == "plain":
        return lambda x: torch.nn.functional.linear(x, weights[d])
    packed = torch.ops.mkldnn._reorder_linear_weight(weights[d])
    if w == "packed":
        return lambda x: pointwise(x, packed, None, "none", [], "")

    def hybrid(x: torch.Tensor) -> torch.Tensor:  # steer.packed.HybridLinear (float32 in and out)
        if x.shape[0] <= 1:
            return torch.nn.functional.linear(x.to(torch.bfloat16), weights[torch.bfloat16]).to(x.dtype)
        return pointwise(x, packed, None, "none", [], "")

    return hybrid
