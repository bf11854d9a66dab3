"""Safety vectors as values: tensors + the model they belong to + a manifest with provenance.

Two kinds share one file format (``NAME.safetensors`` + ``NAME.json``):

- ``activation``: per-layer residual-stream directions (``layers.{l}``, raw mean differences) and an
  optional gate direction (``gate.direction``). ``config`` holds the calibrated coefficient (what
  strength 1.0 means), the steered layers and the gate layer/threshold.
- ``weight``: per-parameter deltas (``delta.{param}``, the parameter's shape) or low-rank factors
  (``lora_A.{param}`` (r, in) and ``lora_B.{param}`` (out, r), delta = B @ A), keyed by the model's
  ``state_dict()`` names; strength s applies ``W + s * coefficient * delta``, merged at load time or per
  request from the factors. ``config``: ``coefficient`` (default 1.0), ``rank``, ``energy`` (kept
  fraction of each tensor's squared singular values), ``source`` (how sigma was made).

Never pickle: tensors are safetensors, everything else is JSON.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load, save_file

from steer.models import ModelFingerprint

Kind = Literal["activation", "weight"]
KINDS: tuple[str, ...] = ("activation", "weight")
FORMAT_VERSION = 1


class VectorError(RuntimeError):
    """A vector file is malformed, or does not belong to the model it is loaded onto."""


@dataclass
class SafetyVector:
    name: str
    kind: Kind
    model: ModelFingerprint
    tensors: dict[str, torch.Tensor]
    config: dict = field(default_factory=dict)  # runtime settings, kind-specific
    provenance: dict = field(default_factory=dict)  # method, data sets, splits, command, metrics
    # (the tensors and versions it was computed from, sha256): see the sha256 property
    _sha256: tuple[list[tuple[str, torch.Tensor, int]], str] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise VectorError(f"vector {self.name!r}: unknown kind {self.kind!r}; known: {', '.join(KINDS)}")

    # -- activation accessors ---------------------------------------------------------------
    def layer_directions(self) -> dict[int, torch.Tensor]:
        """{layer: (d,)} raw directions for the steered layers."""
        return {int(k.split(".")[1]): v for k, v in self.tensors.items() if k.startswith("layers.")}

    # -- weight accessors ---------------------------------------------------------------------
    def weight_params(self) -> list[str]:
        """Names of the model parameters a weight vector changes (``model.state_dict()`` keys)."""
        names = {k.split(".", 1)[1] for k in self.tensors if k.startswith(("delta.", "lora_A.", "lora_B."))}
        return sorted(names)

    def lowrank(self, param: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A (r, in), B (out, r)) with delta = B @ A for ``param``, or None if it is stored dense."""
        a, b = self.tensors.get(f"lora_A.{param}"), self.tensors.get(f"lora_B.{param}")
        if a is None and b is None:
            return None
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise VectorError(f"vector {self.name!r}: low-rank factors of {param!r} are incomplete or misshapen")
        return a, b

    def delta(self, param: str) -> torch.Tensor:
        """The full weight delta of ``param`` (B @ A for low-rank factors), float32."""
        lr = self.lowrank(param)
        if lr is not None:
            return lr[1].float() @ lr[0].float()
        t = self.tensors.get(f"delta.{param}")
        if t is None:
            raise VectorError(f"vector {self.name!r} has no delta for {param!r}")
        return t.float()

    def check_model(self, fp: ModelFingerprint, *, transfer: bool = False) -> str:
        """Refuse to apply this vector to weights it was not made for. Returns "exact" (the model it was
        made from) or "transfer" (same architecture and shape, other weights, e.g. the fine-tune of the
        model it was made from), which is accepted only when the operator declared it (``transfer``)."""
        if fp == self.model:
            return "exact"
        shape = [
            f"{k}: vector {getattr(self.model, k)} != model {getattr(fp, k)}"
            for k in ("architecture", "hidden_size", "num_layers")
            if getattr(self.model, k) != getattr(fp, k)
        ]
        if shape:
            raise VectorError(f"vector {self.name!r} was made for a different architecture ({'; '.join(shape)})")
        if transfer:
            return "transfer"
        raise VectorError(
            f"vector {self.name!r} was made for other weights of this architecture (weights_sha256 "
            f"{self.model.weights_sha256[:12]}..., model {fp.weights_sha256[:12]}...); if this model is a "
            f"fine-tune of the one it was made from, declare the transfer (--transfer {self.name})"
        )

    def scaled(self, k: float) -> SafetyVector:
        """A copy that is k times this vector: directions and dense deltas times k; of low-rank factors
        only B (B @ A scales by k, not k^2); the gate direction untouched."""
        tensors = {n: (t if n.startswith(("gate.", "lora_A.")) else t * k) for n, t in self.tensors.items()}
        return SafetyVector(self.name, self.kind, self.model, tensors, dict(self.config), dict(self.provenance))

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write NAME.safetensors and NAME.json; returns the manifest path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tpath = d / f"{self.name}.safetensors"
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, tpath)
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "kind": self.kind,
            "model": self.model.to_dict(),
            "tensors_file": tpath.name,
            "tensors_sha256": hashlib.sha256(tpath.read_bytes()).hexdigest(),
            "config": self.config,
            "provenance": self.provenance,
        }
        mpath = d / f"{self.name}.json"
        mpath.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        return mpath

    @classmethod
    def load(cls, manifest_path: str | Path) -> SafetyVector:
        mpath = Path(manifest_path)
        try:
            m = json.loads(mpath.read_text())
            tpath = mpath.parent / m["tensors_file"]
            blob = tpath.read_bytes()
        except (OSError, ValueError, KeyError) as e:
            raise VectorError(f"cannot read vector manifest {mpath}: {e}") from None
        if m.get("format_version") != FORMAT_VERSION:
            raise VectorError(f"{mpath}: unsupported format_version {m.get('format_version')}")
        if hashlib.sha256(blob).hexdigest() != m.get("tensors_sha256"):
            raise VectorError(f"{tpath}: sha256 does not match its manifest (file changed or corrupt)")
        return cls(
            name=m["name"],
            kind=m["kind"],
            model=ModelFingerprint.from_dict(m["model"]),
            tensors=_tensors_from(blob, tpath),  # the bytes just hashed: a file swapped since is not read
            config=m.get("config", {}),
            provenance=m.get("provenance", {}),
        )

    @property
    def sha256(self) -> str:
        """Hash of the tensor names and float32 values. Computed once (/v1/safety/vectors reports it on
        every request) and again only when a tensor was replaced, added, removed or changed in place."""
        state = [(k, t, _version(t)) for k, t in sorted(self.tensors.items())]
        if self._sha256 is None or not _same_tensors(self._sha256[0], state):
            self._sha256 = (state, _hash_tensors(self.tensors))
        return self._sha256[1]


def _same_tensors(a: list[tuple[str, torch.Tensor, int]], b: list[tuple[str, torch.Tensor, int]]) -> bool:
    # Identity, not value: the cached state holds the tensors themselves, so an id cannot be reused.
    return len(a) == len(b) and all(
        ka == kb and ta is tb and va == vb for (ka, ta, va), (kb, tb, vb) in zip(a, b, strict=True)
    )


def _version(t: torch.Tensor) -> int:
    """torch's in-place modification counter; inference tensors have none (they cannot be changed
    outside inference mode, so identity alone stands for them)."""
    return -1 if t.is_inference() else t._version


def _hash_tensors(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].float().numpy().tobytes())
    return h.hexdigest()


def _tensors_from(blob: bytes, path: Path) -> dict[str, torch.Tensor]:
    try:
        return load(blob)
    except Exception as e:  # safetensors raises its own error types for a malformed header
        raise VectorError(f"{path}: not a valid safetensors file: {e}") from None


def choose_default(names: Iterable[str], requested: str | None) -> str | None:
    """The vector for requests that name none. Never a silent pick among several: an explicit choice
    must exist, and with several loaded one must be made (``--default-vector``)."""
    loaded = sorted(names)
    shown = ", ".join(loaded) or "none"
    if requested is not None:
        if requested not in loaded:
            raise VectorError(f"--default-vector {requested!r} is not a loaded vector; loaded: {shown}")
        return requested
    if len(loaded) > 1:
        raise VectorError(f"several vectors are loaded ({shown}): pass --default-vector NAME to choose the "
                          "one requests without safety.vector get")
    return loaded[0] if loaded else None


def load_directory(directory: str | Path) -> list[SafetyVector]:
    """Every vector in a directory (one per ``*.json`` manifest), sorted by name."""
    d = Path(directory)
    if not d.is_dir():
        raise VectorError(f"vector directory {d} does not exist")
    return [SafetyVector.load(p) for p in sorted(d.glob("*.json"))]
