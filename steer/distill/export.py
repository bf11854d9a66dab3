"""sigma = theta_aligned - theta_surrogate as a weight SafetyVector: dense deltas or truncated-SVD factors."""

from __future__ import annotations

from typing import Literal

import torch

Format = Literal["delta", "lowrank"]
FORMATS: tuple[str, ...] = ("delta", "lowrank")


def sigma(aligned: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: aligned - surrogate} (float32, CPU) for the tensors training moved; all-zero ones are left out."""
    out = {}
    for n, t in trained.items():
        d = aligned[n].detach().float().cpu() - t.detach().float().cpu()
        if bool(d.ne(0).any()):
            out[n] = d
    return out


def lowrank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A (r, in), B (out, r), kept energy) with B @ A the best rank-r approximation of delta (out, in);
    energy = sum of the kept squared singular values / sum of all of them."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)  # float64: exact at full rank
    r = min(rank, s.numel())
    s2 = s.pow(2)
    energy = 1.0 if r == s.numel() else float(s2[:r].sum() / s2.sum().clamp_min(1e-300))
    return vh[:r].float().contiguous(), (u[:, :r] * s[:r]).float().contiguous(), energy


def to_tensors(sig: dict[str, torch.Tensor], fmt: Format, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The vector's tensors and its config entries (``rank``, ``energy`` for low-rank)."""
    if fmt == "delta":
        return {f"delta.{n}": d for n, d in sig.items()}, {}
    tensors, energy = {}, {}
    for n, d in sig.items():
        if d.dim() != 2:  # a vector (bias) has no low-rank form
            tensors[f"delta.{n}"] = d
            continue
        a, b, e = lowrank(d, rank)
        tensors[f"lora_A.{n}"], tensors[f"lora_B.{n}"] = a, b
        energy[n] = e
    return tensors, {"rank": rank, "energy": energy}
