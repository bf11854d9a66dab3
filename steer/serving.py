"""One way to build a served model: kernels chosen for the host, load, fingerprint, vectors, packing.

The order matters and lives only here: the kernel choice (compute dtype, packed or plain linear
weights) comes first because it decides the load dtype; the fingerprint is taken before packing
(it reads the plain weights, and vectors are checked against it); packing comes last. The server, the
extractor and the benchmarks all build their model through :func:`build`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from steer import hardware
from steer.hooks import SteeringRuntime, borrowed_gates, check_combinations, merge_weight_vector
from steer.models import ModelFingerprint, fingerprint, load_config, load_model
from steer.packed import is_packed, pack_linears
from steer.vectors import SafetyVector, VectorError

log = logging.getLogger("steer.serving")


@dataclass
class ServedModel:
    model: nn.Module
    tokenizer: object
    fingerprint: ModelFingerprint
    vectors: dict[str, SafetyVector]
    runtime: SteeringRuntime | None  # hooks for the per-request vectors (installed by ``with runtime:``)
    kernels: dict  # what the model runs with: dtype, linear weights, how they were chosen and why
    host: dict  # steer.hardware.HostCaps.to_dict()
    merged: dict[str, float]  # weight vectors merged into the weights at load: name -> strength
    matched: dict[str, str]  # vector name -> "exact" (made from these weights) or "transfer" (declared)


def choose_kernels(path: str | Path, *, dtype: str = "auto", linear_weights: str = "auto",
                   probe: bool = True) -> hardware.KernelChoice:
    """The kernels to load ``path`` with on this host (one log line says which and why)."""
    cfg = load_config(path)
    choice = hardware.choose(hardware.detect(), dtype=dtype, linear_weights=linear_weights,
                             hidden_size=int(cfg.hidden_size), intermediate_size=int(cfg.intermediate_size),
                             probe=probe)
    log.info(choice.summary())
    return choice


def build(path: str | Path | None = None, vectors: list[SafetyVector] | None = None, *, dtype: str = "auto",
          linear_weights: str = "auto", model: nn.Module | None = None, tokenizer=None,
          merged: dict[str, float] | None = None, transfers: set[str] | frozenset[str] = frozenset(),
          gated_by: dict[str, str] | None = None, combos: dict[str, dict[str, float]] | None = None) -> ServedModel:
    """Load ``path`` with the kernels this host runs fastest (or as set), or take ``model`` exactly as
    given (tests, embedding), then fingerprint it, check ``vectors`` against it (``transfers``: the
    vectors declared as made on another model of this architecture), merge the weight vectors named
    in ``merged`` at their strength, attach the others for per-request steering (a weight vector named
    in ``gated_by`` behind that activation vector's gate; ``combos``: named combinations of them, see
    SteeringRuntime), and pack if chosen.

    Raises hardware.HardwareError for a kernel setting the host cannot run, VectorError for a vector
    made for other weights (or a merge/transfer naming no loaded vector), ModelError for an unsupported
    checkpoint."""
    by_name = {v.name: v for v in vectors or []}
    merged = dict(merged or {})
    for flag, names in (("--merge-vector", merged), ("--transfer", transfers)):
        unknown = sorted(set(names) - set(by_name))
        if unknown:
            raise VectorError(f"{flag} names {', '.join(unknown)}, not a loaded vector; loaded: "
                              f"{', '.join(sorted(by_name)) or 'none'}")
    for name in merged:
        if by_name[name].kind != "weight":
            raise VectorError(f"--merge-vector {name}: only weight vectors can be merged, {name!r} is an "
                              f"{by_name[name].kind} vector")
    gated_by = dict(gated_by or {})
    borrowed_gates(by_name, gated_by)  # checked before the model loads
    both = sorted(set(gated_by) & set(merged))
    if both:
        raise VectorError(f"--gate-with {', '.join(both)}: a vector merged at load cannot be gated")
    combos = dict(combos or {})
    check_combinations({n: v for n, v in by_name.items() if n not in merged}, combos)  # before the model loads
    choice = None
    if model is None:
        choice = choose_kernels(path, dtype=dtype, linear_weights=linear_weights)
        model, tokenizer = load_model(path, dtype=choice.dtype)
    fp = fingerprint(model)
    matched = {n: v.check_model(fp, transfer=n in transfers) for n, v in by_name.items()}
    for name, strength in merged.items():
        changed = merge_weight_vector(model, by_name[name], strength)
        log.info("merged weight vector %s at strength %g into %d weights%s", name, strength, len(changed),
                 " (declared transfer)" if matched[name] == "transfer" else "")
    per_request = [v for n, v in by_name.items() if n not in merged]
    runtime = (SteeringRuntime(model, per_request, model_fingerprint=fp, transfers=transfers, gated_by=gated_by,
                               combos=combos) if per_request else None)
    if choice is not None and choice.packed:
        pack_linears(model, hybrid=choice.hybrid)
    return ServedModel(model, tokenizer, fp, by_name, runtime, _kernels(model, choice), hardware.detect().to_dict(),
                       merged, matched)


def _kernels(model: nn.Module, choice: hardware.KernelChoice | None) -> dict:
    if choice is not None:
        return choice.to_dict()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    weights = "packed" if is_packed(model) else "plain"
    return {"dtype": dtype, "linear_weights": weights, "how": "given", "reason": "model passed in as built"}
