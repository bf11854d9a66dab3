"""Per-tensor merge math. Pure functions on float32 tensors: no I/O, no checkpoints.

Shapes: 2-D weights are (out, in); ``tau = ft - base`` is the task vector, ``sigma`` the safety vector
(aligned - surrogate), both shaped like the weight. Where mergekit (0.1.5) has the primitive, it is
used (magnitude / outlier trimming, TIES sign election, SLERP); the rest is written here from
METHODS.md (EnchTable, Safe LoRA, TSV, Model Stock for two deltas, DARE with a per-tensor generator).
"""

from __future__ import annotations

import math
import zlib

import torch
from mergekit.merge_methods.generalized_task_arithmetic import get_mask
from mergekit.merge_methods.slerp import slerp as _mk_slerp
from mergekit.sparsify import magnitude, magnitude_outliers

# -- EnchTable (METHODS 1.2) ------------------------------------------------------------------------


def _kept_svd(x: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top floor(gamma * rank) singular triplets: U (out, k), s (k,), Vh (k, in)."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = int(math.floor(gamma * s.numel()))
    return u[:, :k], s[:k], vh[:k]


def interference_sum(tau: torch.Tensor, sigma: torch.Tensor, gamma: float) -> tuple[float, int]:
    """(sum |M|, K) by the cheap closed form: the diagonal blocks of U^T U - I and V^T V - I vanish, so
    sum|M| = sum|A diag(s2) B^T| + sum|A^T diag(s1) B| with A = U1k^T U2k, B = V1k^T V2k (k1 x k2)."""
    u1, s1, v1h = _kept_svd(tau, gamma)
    u2, s2, v2h = _kept_svd(sigma, gamma)
    k = s1.numel() + s2.numel()
    if not s1.numel() or not s2.numel():
        return 0.0, k
    a = u1.T @ u2  # (k1, k2)
    b = v1h @ v2h.T  # (k1, k2)
    total = ((a * s2) @ b.T).abs().sum() + ((a.T * s1) @ b).abs().sum()
    return float(total), k


def interference_matrix(tau: torch.Tensor, sigma: torch.Tensor, gamma: float) -> torch.Tensor:
    """The reference code's explicit M = (U^T U - I) diag(s) (V^T V - I), (K, K). For tests only."""
    u1, s1, v1h = _kept_svd(tau, gamma)
    u2, s2, v2h = _kept_svd(sigma, gamma)
    u, s, vh = torch.cat([u1, u2], 1), torch.cat([s1, s2]), torch.cat([v1h, v2h], 0)
    eye = torch.eye(s.numel(), dtype=u.dtype)
    return (u.T @ u - eye) @ torch.diag(s) @ (vh @ vh.T - eye)


def interference_weight(tau: torch.Tensor, sigma: torch.Tensor, *, gamma: float, scale: float) -> float:
    """w = exp(-c * sum|M| / K^2): 1 when the kept singular subspaces of tau and sigma are orthogonal,
    falling as they overlap. ``sigma`` already carries the global factor alpha. A zero tau has no
    subspace to interfere with (its singular vectors would be arbitrary): w = 1."""
    if not tau.any() or not sigma.any():
        return 1.0
    total, k = interference_sum(tau, sigma, gamma)
    return math.exp(-scale * total / k**2) if k else 1.0


# -- Safe LoRA (METHODS 1.3.2) ----------------------------------------------------------------------


def safe_lora_projection(delta: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """(C @ delta, cos(C @ delta, delta)) with C = sigma sigma^T / ||sigma||_F, computed as
    sigma (sigma^T delta) / ||sigma||_F so the (out, out) matrix is never formed. None when sigma or
    delta is zero (nothing to project onto, or nothing to project)."""
    nrm = torch.linalg.norm(sigma)
    if nrm == 0 or not delta.any():
        return None
    proj = sigma @ (sigma.T @ delta) / nrm  # (out, in) @ ((in, out) @ (out, in)) -> (out, in)
    cos = torch.nn.functional.cosine_similarity(proj.reshape(1, -1), delta.reshape(1, -1), eps=1e-12)
    return proj, float(cos)


# -- TSV-Merge (METHODS 1.3.3) ----------------------------------------------------------------------


def _polar(x: torch.Tensor) -> torch.Tensor:
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def tsv_delta(tau: torch.Tensor, sigma: torch.Tensor, gamma: float = 0.5) -> torch.Tensor:
    """Stack the kept triplets of tau and sigma, orthogonalise U and V^T by their polar factors,
    return U_perp diag(s) V_perp^T. A zero input contributes no triplets (a zero matrix's singular
    vectors are arbitrary and would only tilt the other's through the polar factor)."""
    parts = [_kept_svd(x, gamma) for x in (tau, sigma) if x.any()]
    if not parts:
        return torch.zeros_like(tau)
    u = torch.cat([p[0] for p in parts], 1)  # (out, K)
    s = torch.cat([p[1] for p in parts])  # (K,)
    vh = torch.cat([p[2] for p in parts], 0)  # (K, in)
    return (_polar(u) * s) @ _polar(vh)


# -- Model Stock for two deltas (METHODS 1.3.5) -----------------------------------------------------


def model_stock_delta(tau: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(t * (tau + sigma) / 2, t) with t = 2 cos / (1 + cos); t = 0 at cos = -1, as mergekit does."""
    a, b = tau.reshape(-1), sigma.reshape(-1)
    cos = float(((a @ b) / (a.norm() * b.norm()).clamp(min=1e-6)).clamp(-1, 1))
    t = 0.0 if abs(1 + cos) < 1e-6 else 2 * cos / (1 + cos)
    return t * (tau + sigma) / 2, t


# -- sparsification and sign election (TIES, DARE, Breadcrumbs) ------------------------------------


def tensor_seed(seed: int, key: str, role: str) -> int:
    """A per-tensor seed: a merge's random masks do not depend on the order tensors are visited in."""
    return (seed * 1_000_003 + zlib.crc32(f"{role}:{key}".encode())) % (2**63)


def dare(delta: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability p, rescale survivors by 1/(1-p) (the DARE paper's rescale;
    mergekit 0.1.5 instead matches the L1 norm). The mask is drawn as mergekit's ``bernoulli`` draws it,
    so with the same seed it is the same mask (tests rely on that)."""
    if p == 0:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, 1 - p, dtype=torch.float32), generator=generator)
    return delta * mask / (1 - p)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the top ``density`` fraction of entries by |value|, no rescale (mergekit)."""
    return magnitude(delta, density)


def breadcrumbs(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Drop the largest ``gamma`` fraction and the smallest entries, keeping ``density`` (mergekit)."""
    return magnitude_outliers(delta, density, gamma=gamma)


def sign_consensus(deltas: list[torch.Tensor], weights: list[float], *, normalize: bool) -> torch.Tensor:
    """TIES merge of already-sparsified deltas: elect each entry's sign from the sum of the *unweighted*
    deltas (the TIES paper; mergekit elects after weighting, arcee-ai/mergekit#474: the two agree when
    all weights are equal), keep the agreeing entries, weighted sum, divided by the agreeing weights
    when ``normalize`` (the disjoint mean)."""
    stacked = torch.stack(deltas)  # (n, *shape)
    agree = get_mask(stacked, method="sum").to(stacked.dtype)  # (n, *shape) 0/1
    w = torch.tensor(weights, dtype=stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
    mixed = (stacked * agree * w).sum(0)
    if normalize:
        divisor = (agree * w).sum(0)
        mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return mixed


# -- interpolation between base and ft (METHODS 3) -------------------------------------------------


def slerp_coefficients(dot: float, norm_base: float, norm_ft: float, t: float, *, dot_threshold: float = 0.9995,
                       eps: float = 1e-8) -> tuple[float, float]:
    """(c_base, c_ft) with slerp(base, ft, t) = c_base * base + c_ft * ft, from the raw dot product and the
    norms of the whole flattened tensors: mergekit's formula, for merges that read a tensor in row blocks."""
    na = norm_base if norm_base > eps else 1.0
    nb = norm_ft if norm_ft > eps else 1.0
    d = min(1.0, max(-1.0, dot / (na * nb)))
    if abs(d) > dot_threshold:
        return 1 - t, t
    theta = math.acos(d)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp(base: torch.Tensor, ft: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's SLERP on the whole flattened tensor (one output row), linear when nearly colinear."""
    out = _mk_slerp(torch.tensor([t]), base.reshape(1, -1), ft.reshape(1, -1))
    return out.reshape(base.shape)
