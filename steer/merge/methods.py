"""The merge methods: a registry name -> Method (inputs it needs, parameters with defaults and checks,
and the per-tensor step). The driver (``steer.merge.run``) does all I/O; a step sees float tensors.

Every step returns ``(tensor, record)``: the merged tensor in compute dtype, or None for "ft unchanged"
(copied bit for bit), and an optional JSON-able record of the decision for the merge card.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from steer.merge import ops
from steer.merge.checkpoint import MergeError

log = logging.getLogger(__name__)


@dataclass
class TensorInputs:
    """One key's inputs in compute dtype; None where the method does not use that input."""

    key: str
    ft: torch.Tensor
    base: torch.Tensor | None = None
    sigma: torch.Tensor | None = None  # aligned - surrogate, or the vector's delta
    mask: torch.Tensor | None = None
    coef: tuple[float, ...] | None = None  # per-tensor scalars from a block pre-pass (row-wise merges)

    @property
    def tau(self) -> torch.Tensor:
        return self.ft - self.base


@dataclass
class Globals:
    """Whole-model quantities from the first pass (EnchTable's alpha, RESTA's adaptive scale)."""

    norm_tau: float | None = None
    norm_sigma: float | None = None
    sigma_factor: float = 1.0  # what sigma is multiplied by before the per-tensor step


Step = Callable[[TensorInputs, dict, Globals], tuple[torch.Tensor | None, dict | None]]


# -- parameter checks: each returns an error text or None -------------------------------------------
def _finite(v):
    return None if isinstance(v, int | float) and math.isfinite(v) else "must be a finite number"


def _nonneg(v):
    return _finite(v) or (None if v >= 0 else "must be >= 0")


def _unit_open_closed(v):  # (0, 1]
    return _finite(v) or (None if 0 < v <= 1 else "must be in (0, 1]")


def _unit_closed_open(v):  # [0, 1)
    return _finite(v) or (None if 0 <= v < 1 else "must be in [0, 1)")


def _unit(v):  # [0, 1]
    return _finite(v) or (None if 0 <= v <= 1 else "must be in [0, 1]")


def _cosine(v):
    return _finite(v) or (None if -1 <= v <= 1 else "must be in [-1, 1]")


def _seed(v):
    return None if isinstance(v, int) and v >= 0 else "must be an integer >= 0"


def _bool(v):
    return None if isinstance(v, bool) else "must be true or false"


@dataclass(frozen=True)
class Method:
    name: str
    doc: str
    step: Step
    needs: frozenset[str]  # inputs besides ft: subset of {"base", "sigma", "mask"}
    optional: frozenset[str] = frozenset()  # used when given
    params: dict[str, tuple[object, Callable]] = field(default_factory=dict)  # name -> (default, check)
    # Whether a first pass computes ||tau|| and ||sigma|| over the whole model (given resolved params).
    global_norms: Callable[[dict], bool] = lambda p: False
    exclusive: tuple[tuple[str, str], ...] = ()  # pairs of parameters that cannot be given together
    # Row-wise: the step on a block of rows gives those rows of the step on the whole tensor (given the
    # per-tensor scalars of ``prepass``, if any), so a large tensor can be merged a block at a time.
    rowwise: bool = False
    prepass: Callable[[Iterable[TensorInputs], dict], tuple[float, ...]] | None = None

    def resolve(self, given: dict) -> dict:
        """Defaults filled in, every value checked; a flag this method does not take is an error."""
        for name in given:
            if name not in self.params:
                known = ", ".join(flag(n) for n in self.params) or "none"
                raise MergeError(f"{flag(name)} does not apply to --method {self.name} (its parameters: {known})")
        out = {}
        for name, (default, check) in self.params.items():
            value = given.get(name, default)
            err = check(value)
            if err:
                raise MergeError(f"{flag(name)} {value!r} {err} (method {self.name})")
            out[name] = value
        for a, b in self.exclusive:
            if given.get(a) not in (None, False) and given.get(b) not in (None, False):
                raise MergeError(f"{flag(a)} and {flag(b)} cannot be combined (method {self.name})")
        return out


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# -- steps ------------------------------------------------------------------------------------------
def _enchtable(x: TensorInputs, p: dict, g: Globals):
    # In place on the tensors this step owns: a vocab-sized matrix is copied as few times as possible.
    s = x.sigma.mul_(g.sigma_factor)  # alpha * sigma
    if not s.any():  # nothing to add: skip the SVDs (an attention-only sigma is zero on the MLP)
        return None, None
    if s.dim() != 2:  # 1-D (norms, biases): alpha * sigma with no interference weight
        return s.add_(x.ft), None
    w = ops.interference_weight(x.tau, s, gamma=p["gamma"], scale=p["interference_scale"])
    log.info("enchtable %s: w=%.4g", x.key, w)
    return s.mul_(w).add_(x.ft), {"w": w}


def _task_arithmetic(x: TensorInputs, p: dict, g: Globals):
    s = g.sigma_factor
    return (None, None) if s == 0 else (x.sigma.mul_(s).add_(x.ft), None)


def _deltas(x: TensorInputs) -> list[torch.Tensor]:
    return [x.tau] if x.sigma is None else [x.tau, x.sigma]


def _weights(x: TensorInputs, p: dict) -> list[float]:
    return [1.0] if x.sigma is None else [1.0, p["scale"]]


def _ties(x: TensorInputs, p: dict, g: Globals):
    trimmed = [ops.trim(d, p["density"]) for d in _deltas(x)]
    return x.base + p["lambda"] * ops.sign_consensus(trimmed, _weights(x, p), normalize=True), None


def _dare_all(x: TensorInputs, p: dict) -> list[torch.Tensor]:
    # One generator per (tensor, input): the masks do not depend on the order keys are visited in.
    return [ops.dare(d, p["drop_p"], torch.Generator().manual_seed(ops.tensor_seed(p["seed"], x.key, role)))
            for d, role in zip(_deltas(x), ("tau", "sigma"), strict=False)]


def _dare(x: TensorInputs, p: dict, g: Globals):
    mixed = sum(w * d for w, d in zip(_weights(x, p), _dare_all(x, p), strict=True))
    return x.base + p["lambda"] * mixed, None


def _dare_ties(x: TensorInputs, p: dict, g: Globals):
    # mergekit's dare_ties does not normalise (a sum over the sign-agreeing entries), nor does this.
    return x.base + p["lambda"] * ops.sign_consensus(_dare_all(x, p), _weights(x, p), normalize=False), None


def _breadcrumbs(x: TensorInputs, p: dict, g: Globals):
    kept = [ops.breadcrumbs(d, p["density"], p["gamma"]) for d in _deltas(x)]
    return x.base + p["lambda"] * sum(w * d for w, d in zip(_weights(x, p), kept, strict=True)), None


def _safe_lora(x: TensorInputs, p: dict, g: Globals):
    if x.ft.dim() != 2:  # Safe LoRA projects weight matrices only
        return None, None
    res = ops.safe_lora_projection(x.tau, x.sigma)
    if res is None:
        return None, {"projected": False, "cos": None}
    proj, cos = res
    if cos > p["threshold"]:  # the update already lies in the safety subspace: keep ft's weight
        return None, {"projected": False, "cos": cos}
    return x.base + proj, {"projected": True, "cos": cos}


def _tsv(x: TensorInputs, p: dict, g: Globals):
    if x.ft.dim() != 2:
        return x.base + (x.tau + x.sigma) / 2, None
    return x.base + ops.tsv_delta(x.tau, x.sigma, p["gamma"]), None


def _model_stock(x: TensorInputs, p: dict, g: Globals):
    delta, t = ops.model_stock_delta(x.tau, x.sigma)
    return x.base + delta, {"t": t}


def _linear(x: TensorInputs, p: dict, g: Globals):
    lam = p["lambda"]
    return (1 - lam) * x.base + lam * x.ft, None


def _slerp(x: TensorInputs, p: dict, g: Globals):
    if x.coef is not None:  # a block of rows: the coefficients come from the whole tensor
        c_base, c_ft = x.coef
        return c_base * x.base + c_ft * x.ft, None
    return ops.slerp(x.base, x.ft, p["lambda"]), None


def _slerp_prepass(blocks: Iterable[TensorInputs], p: dict) -> tuple[float, ...]:
    dot = nb = nf = 0.0
    for x in blocks:
        dot += float(torch.sum(x.base * x.ft, dtype=torch.float64))
        nb += float(torch.sum(x.base * x.base, dtype=torch.float64))
        nf += float(torch.sum(x.ft * x.ft, dtype=torch.float64))
    return ops.slerp_coefficients(dot, math.sqrt(nb), math.sqrt(nf), p["lambda"])


def _somf(x: TensorInputs, p: dict, g: Globals):
    m = x.mask
    if m.numel() and (float(m.min()) < 0 or float(m.max()) > 1):
        raise MergeError(f"--mask: values for {x.key} are outside [0, 1]")
    record = None
    if p["rescale"]:  # the reference's tau * m / mean(m), mean per tensor (keeps the update's scale)
        mean = x.coef[0] if x.coef is not None else float(m.mean(dtype=torch.float64)) if m.numel() else 1.0
        record = {"mask_mean": mean}
        if mean == 0:  # nothing kept: base (the reference would divide by zero)
            return x.base.clone(), record
        if mean != 1:
            m = m / mean
    # base + m * tau, written as ft - (1 - m) * tau so that an all-ones mask gives ft bit for bit.
    return x.ft - (1 - m) * x.tau, record


def _somf_prepass(blocks: Iterable[TensorInputs], p: dict) -> tuple[float, ...]:
    total = n = 0.0
    for x in blocks:
        total += float(x.mask.sum(dtype=torch.float64))
        n += x.mask.numel()
    return (total / n if n else 1.0,)


# -- registry ---------------------------------------------------------------------------------------
_BASE, _SIGMA, _MASK = "base", "sigma", "mask"
_SPARSE = {"lambda": (1.0, _finite), "scale": (1.0, _finite)}

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("enchtable", "theta_ft + w_n * alpha * sigma_n; alpha = beta ||tau|| / ||sigma|| (global), "
               "w_n = exp(-c * overlap of top singular subspaces)", _enchtable, frozenset({_BASE, _SIGMA}),
               params={"beta": (0.1, _nonneg), "gamma": (0.5, _unit_open_closed),
                       "interference_scale": (200.0, _nonneg), "ada": (True, _bool)},
               global_norms=lambda p: p["ada"]),
        Method("task_arithmetic", "theta_ft + s * sigma (RESTA); --ada: s = beta ||tau|| / ||sigma||",
               _task_arithmetic, frozenset({_SIGMA}), optional=frozenset({_BASE}),
               params={"scale": (1.0, _finite), "ada": (False, _bool), "beta": (0.1, _nonneg)},
               global_norms=lambda p: p["ada"], exclusive=(("scale", "ada"),), rowwise=True),
        Method("ties", "base + lambda * disjoint mean of the sign-elected, magnitude-trimmed tau and sigma",
               _ties, frozenset({_BASE}), optional=frozenset({_SIGMA}),
               params={"density": (0.5, _unit_open_closed), **_SPARSE}),
        Method("dare", "base + lambda * (DARE(tau) + scale * DARE(sigma)), DARE = drop p, rescale 1/(1-p)",
               _dare, frozenset({_BASE}), optional=frozenset({_SIGMA}),
               params={"drop_p": (0.5, _unit_closed_open), "seed": (0, _seed), **_SPARSE}),
        Method("dare_ties", "base + lambda * sign-elected sum of DARE(tau), scale * DARE(sigma)",
               _dare_ties, frozenset({_BASE}), optional=frozenset({_SIGMA}),
               params={"drop_p": (0.5, _unit_closed_open), "seed": (0, _seed), **_SPARSE}),
        Method("breadcrumbs", "base + lambda * (tau' + scale * sigma'), ' = drop the top gamma and the "
               "smallest entries, keep density", _breadcrumbs, frozenset({_BASE}), optional=frozenset({_SIGMA}),
               params={"density": (0.5, _unit_open_closed), "gamma": (0.01, _unit_closed_open), **_SPARSE}),
        Method("safe_lora", "base + C tau where cos(C tau, tau) <= threshold, C = sigma sigma^T / ||sigma||_F; "
               "else ft", _safe_lora, frozenset({_BASE, _SIGMA}), params={"threshold": (0.5, _cosine)}),
        Method("tsv", "base + TSV-Merge(tau, sigma) (2-D), base + (tau + sigma) / 2 (1-D)", _tsv,
               frozenset({_BASE, _SIGMA}), params={"gamma": (0.5, _unit_open_closed)}),
        Method("model_stock", "base + t (tau + sigma) / 2, t = 2 cos / (1 + cos)", _model_stock,
               frozenset({_BASE, _SIGMA})),
        Method("linear", "(1 - lambda) base + lambda ft", _linear, frozenset({_BASE}),
               params={"lambda": (0.5, _unit)}, rowwise=True),
        Method("slerp", "spherical interpolation from base (lambda 0) to ft (lambda 1)", _slerp,
               frozenset({_BASE}), params={"lambda": (0.5, _unit)}, rowwise=True, prepass=_slerp_prepass),
        Method("somf", "base + mask * tau / mean(mask) (a trained SOMF mask, mean per tensor; --no-rescale: "
               "base + mask * tau; all ones gives ft)", _somf, frozenset({_BASE, _MASK}),
               params={"rescale": (True, _bool)}, rowwise=True, prepass=_somf_prepass),
    )
}
ALIASES = {"resta": "task_arithmetic"}


def get(name: str) -> Method:
    m = METHODS.get(ALIASES.get(name, name))
    if m is None:
        raise MergeError(f"unknown merge method {name!r}; known: {', '.join([*METHODS, *ALIASES])}")
    return m
