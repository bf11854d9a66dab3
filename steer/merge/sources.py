"""The inputs of one merge, opened and checked, and read key by key in compute dtype."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from steer.merge.checkpoint import (
    ARCH_KEYS,
    Checkpoint,
    MergeError,
    SafetensorsFile,
    check_same_architecture,
    sha256_file,
)
from steer.merge.methods import Method, TensorInputs
from steer.vectors import SafetyVector

if TYPE_CHECKING:
    from steer.merge.run import MergeRequest

_SIGMA_HELP = "a safety vector: --aligned DIR --surrogate DIR, or --vector PATH.json"


class MaskFile:
    """A safetensors file of per-parameter masks (SOMF), keyed by state_dict names."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise MergeError(f"--mask {self.path}: no such file")
        self._f = SafetensorsFile(self.path, f"--mask {self.path}")

    def get(self, key: str, shape: tuple[int, ...], rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        return self._f.get(key, shape, rows)


class Sources:
    """ft plus whatever the method uses: base, sigma (aligned - surrogate, or a weight vector), a mask."""

    def __init__(self, ft: Checkpoint, base: Checkpoint | None, aligned: Checkpoint | None,
                 surrogate: Checkpoint | None, vector: SafetyVector | None, vector_path: str | None,
                 mask: MaskFile | None):
        self.ft, self.base, self.aligned, self.surrogate = ft, base, aligned, surrogate
        self.vector, self.vector_path, self.mask = vector, vector_path, mask
        self._vector_params = set(vector.weight_params()) if vector is not None else set()

    @classmethod
    def open(cls, req: MergeRequest, method: Method, params: dict) -> Sources:
        given = _given(req)
        needs = set(method.needs) | ({"base", "sigma"} if method.global_norms(params) else set())
        for role in sorted(needs - given):
            what = _SIGMA_HELP if role == "sigma" else f"--{role}"
            raise MergeError(f"--method {method.name} needs {what}")
        for role in sorted(given - needs - method.optional):
            what = "a safety vector (--aligned/--surrogate/--vector)" if role == "sigma" else f"--{role}"
            raise MergeError(f"{what} does not apply to --method {method.name}")
        ft = Checkpoint(req.ft, "ft")
        cks = {r: Checkpoint(getattr(req, r), r) for r in ("base", "aligned", "surrogate") if getattr(req, r)}
        check_same_architecture(ft, list(cks.values()))
        vector = _load_vector(req.vector, ft) if req.vector else None
        mask = MaskFile(req.mask) if req.mask else None
        return cls(ft, cks.get("base"), cks.get("aligned"), cks.get("surrogate"), vector, req.vector, mask)

    def checkpoints(self) -> list[Checkpoint]:
        return [c for c in (self.ft, self.base, self.aligned, self.surrogate) if c is not None]

    def inputs(self, key: str, rows: tuple[int, int] | None = None) -> tuple[TensorInputs | str, torch.Tensor]:
        """(inputs in compute dtype, or the reason the key is copied from ft; ft's raw tensor). With
        ``rows``, only that block of rows of every input (for the row-wise methods on large tensors)."""
        shape = self.ft.meta(key)[0]
        raw = self.ft.get(key, rows=rows)
        if not raw.is_floating_point():
            return "not a floating-point tensor", raw
        if self.vector is not None and key not in self._vector_params:
            return "not in --vector", raw  # decided before anything else is read: no vocab-sized copies
        cdt = torch.float64 if raw.dtype == torch.float64 else torch.float32
        x = TensorInputs(key, raw.to(cdt))
        if self.base is not None:
            b = self.base.get(key, shape, rows)
            if b is None:
                return "missing or shaped differently in --base", raw
            x.base = b.to(cdt)
        if self.aligned is not None:
            a, s = self.aligned.get(key, shape, rows), self.surrogate.get(key, shape, rows)
            if a is None or s is None:
                return "missing or shaped differently in --aligned/--surrogate", raw
            x.sigma = a.to(cdt).sub_(s)  # in place: one tensor-sized buffer, not three
            del a, s
        if self.vector is not None:
            d = self.vector.delta(key)
            if tuple(d.shape) != shape:
                return "shaped differently in --vector", raw
            x.sigma = (d if rows is None else d[rows[0]:rows[1]]).to(cdt)
        if self.mask is not None:
            m = self.mask.get(key, shape, rows)
            if m is None:
                return "missing or shaped differently in --mask", raw
            x.mask = m.to(cdt)
        return x, raw

    def provenance(self) -> dict:
        out = {c.role: c.fingerprint_files() for c in self.checkpoints()}
        if self.vector is not None:
            out["vector"] = {"path": str(Path(self.vector_path).resolve()), "name": self.vector.name,
                             "sha256": self.vector.sha256, "model": self.vector.model.to_dict()}
        if self.mask is not None:
            out["mask"] = {"path": str(self.mask.path.resolve()), "sha256": sha256_file(self.mask.path)}
        return out


def _given(req: MergeRequest) -> set[str]:
    if bool(req.aligned) != bool(req.surrogate):
        raise MergeError("--aligned and --surrogate go together (sigma = aligned - surrogate)")
    if req.aligned and req.vector:
        raise MergeError("give the safety vector once: --aligned/--surrogate or --vector, not both")
    given = {r for r in ("base", "mask") if getattr(req, r)}
    if req.aligned or req.vector:
        given.add("sigma")
    return given


def _load_vector(path: str, ft: Checkpoint) -> SafetyVector:
    if not Path(path).is_file():
        raise MergeError(f"--vector {path}: no such file")
    v = SafetyVector.load(path)
    if v.kind != "weight":
        raise MergeError(f"--vector {path}: a {v.kind!r} vector; merging needs a 'weight' vector")
    mine = {"model_type": v.model.architecture, "hidden_size": v.model.hidden_size,
            "num_hidden_layers": v.model.num_layers}
    diff = [f"{k}: {mine[k]} != {ft.arch()[k]}" for k in ARCH_KEYS if mine[k] != ft.arch()[k]]
    if diff:
        raise MergeError(f"--vector {path} was made for a different architecture from --ft ({'; '.join(diff)})")
    return v
