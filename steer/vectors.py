"""Safety vectors as values: tensors + the model they belong to + a manifest with provenance.

Two kinds share one file format (``NAME.safetensors`` + ``NAME.json``):

- ``activation``: per-layer residual-stream directions (``layers.{l}``, raw mean differences) and an
  optional gate direction (``gate.direction``). ``config`` holds the calibrated coefficient (what
  strength 1.0 means), the steered layers and the gate layer/threshold.
- ``weight``: per-parameter deltas (``delta.{param}``) or low-rank factors (``lora_A.{param}``,
  ``lora_B.{param}``), applied at load time or per request.

Never pickle: tensors are safetensors, everything else is JSON.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

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

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise VectorError(f"vector {self.name!r}: unknown kind {self.kind!r}; known: {', '.join(KINDS)}")

    # -- activation accessors ---------------------------------------------------------------
    def layer_directions(self) -> dict[int, torch.Tensor]:
        """{layer: (d,)} raw directions for the steered layers."""
        return {int(k.split(".")[1]): v for k, v in self.tensors.items() if k.startswith("layers.")}

    def check_model(self, fp: ModelFingerprint) -> None:
        """Refuse to apply this vector to weights it was not made for."""
        if fp == self.model:
            return
        diffs = [
            f"{k}: vector {getattr(self.model, k)} != model {getattr(fp, k)}"
            for k in ("architecture", "hidden_size", "num_layers", "weights_sha256")
            if getattr(self.model, k) != getattr(fp, k)
        ]
        raise VectorError(f"vector {self.name!r} was made for a different model ({'; '.join(diffs)})")

    def scaled(self, k: float) -> SafetyVector:
        """A copy whose tensors are multiplied by k (gate direction untouched)."""
        tensors = {n: (t if n.startswith("gate.") else t * k) for n, t in self.tensors.items()}
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
        if hashlib.sha256(blob).hexdigest() != m["tensors_sha256"]:
            raise VectorError(f"{tpath}: sha256 does not match its manifest (file changed or corrupt)")
        return cls(
            name=m["name"],
            kind=m["kind"],
            model=ModelFingerprint.from_dict(m["model"]),
            tensors=load_file(tpath),
            config=m.get("config", {}),
            provenance=m.get("provenance", {}),
        )

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for k in sorted(self.tensors):
            h.update(k.encode())
            h.update(self.tensors[k].float().numpy().tobytes())
        return h.hexdigest()


def load_directory(directory: str | Path) -> list[SafetyVector]:
    """Every vector in a directory (one per ``*.json`` manifest), sorted by name."""
    d = Path(directory)
    if not d.is_dir():
        raise VectorError(f"vector directory {d} does not exist")
    return [SafetyVector.load(p) for p in sorted(d.glob("*.json"))]
