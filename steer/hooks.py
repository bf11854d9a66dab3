"""Per-row steering with scoped, reversible forward hooks, for both kinds of safety vector.

Every forward pass reads its steering inputs from a ``RowSteering`` object that the caller fills
before the pass: one strength per row and vector (0 for rows that use another vector or none), and,
for decode passes, the gate each row's prompt produced at prefill. Rows with strength 0 pass through
bit for bit (``x + 0 * r == x``), which is what makes strength 0 the vanilla model even inside a
batch whose other rows are steered.

Two steerers share one interface (:class:`Steerer`): an :class:`ActivationSteerer` adds a direction to
the residual stream at the input of decoder layers; a :class:`WeightSteerer` adds a weight vector's
low-rank delta to the output of the linear layers it changes, ``y = W x + s_row * c * B (A x)``, so rows
with different strengths share a batch. :func:`merge_weight_vector` instead adds ``s * c * B A`` to
the weights once, for a vector served at one fixed strength.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Protocol

import torch
from torch import nn

from steer.models import ModelFingerprint, decoder_layers, fingerprint
from steer.vectors import SafetyVector, VectorError


class RowSteering:
    """Steering inputs of the forward pass about to run. Shapes are (B,).

    ``gate`` holds the gate decision (0/1) per row of every gated vector that has one. The engine
    decides gates before it steers any position (``steer.engine``); a caller that runs a whole prompt
    in one plain forward pass can leave ``gate`` empty and let the gate layer's hook decide from this
    pass's own residuals (at the gate's position from each row's end, given ``prompt_lens`` when the
    batch is left-padded).
    """

    def __init__(self) -> None:
        self.strength: dict[str, torch.Tensor] = {}
        self.gate: dict[str, torch.Tensor] = {}
        self.prompt_lens: torch.Tensor | None = None  # real (unpadded) prompt length per row
        self.decode = False  # the pass runs generated tokens only (no prompt position)

    def reset(self, *, prompt_lens: torch.Tensor | None = None, decode: bool = False) -> None:
        self.strength, self.gate, self.prompt_lens, self.decode = {}, {}, prompt_lens, decode


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _replace_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (h, *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = h
    return args, kwargs


MAX_LOWER_STRENGTH = 4.0  # a two-sided gate's lower strength: at most this many times an open row's push
LOWER_SPANS = ("all", "prompt")  # where a two-sided gate's lowered rows are steered (see Gate)


class Gate:
    """A hard threshold on a score of a prompt's residual at ``position`` (an offset from the prompt's
    end; -5 is the end-of-user-turn token of a ChatML prompt): a linear probe's logit (``linear``) or the
    cosine with a gate direction (``cosine``), both after subtracting a center. The residual is read at
    the input of decoder layer ``layer``, or, for a multi-layer gate (``layers``, increasing, ending at
    ``layer``), at the input of each of those layers and concatenated in that order; the decision is
    made at ``layer``, so a gate never reads past the first layer it steers. Made with an activation
    vector (``steer extract``); a weight vector can be served behind another vector's gate
    (``SteeringRuntime(gated_by=...)``).

    A two-sided gate (``lower``: ``{"threshold": t_lo, "strength": c}``, t_lo below ``threshold``) also
    lowers refusal on rows it judges benign with confidence: a row scoring below t_lo gets the steering
    direction *subtracted*, at ``c`` times what an open row gets (decision -c instead of 0). A decision
    is the row's multiplier: 1 (open), 0 (closed: vanilla), -c (lowered). ``lower.span`` says where a
    lowered row is steered: ``"all"`` (the default) at every position, generated tokens included;
    ``"prompt"`` over its prompt only (the first token, decided there, included), its generated tokens
    then run vanilla on top of the lowered prompt (see :meth:`in_decode`). ``lower.floor`` (optional,
    below t_lo) makes the lowering a band: a row scoring at or below it is so clearly benign that it is
    left vanilla (``steer extract --lower-floor`` puts it at the gate's code prompts, whose answers
    lowering only degrades). ``two_sided=False`` drops
    ``lower`` (a weight vector borrowing the gate: subtracting a weight-space safety vector is not what
    the lower threshold was chosen for).

    A gate with ``also`` (``{"layers": [...], "threshold": t2, "metric": ...}``, its probe in the tensors
    ``gate.also.direction`` / ``gate.also.center``; ``steer extract --and-gates``) opens a row only where a
    second probe, over a subset of the gate's layers at the same position, scores above ``t2`` too: the AND
    of two gates, for example one fitted with jailbreak templates (which stops a template alone from opening
    it) and one fitted without (which stays closed on plain benign look-alikes). It is one-sided."""

    def __init__(self, name: str, cfg: dict, direction: torch.Tensor, center: torch.Tensor, *,
                 hidden_size: int | None = None, two_sided: bool = True,
                 also: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.layer = int(cfg["layer"])
        self.layers = tuple(int(x) for x in cfg.get("layers", [self.layer]))
        if list(self.layers) != sorted(set(self.layers)) or self.layers[-1] != self.layer:
            raise VectorError(f"vector {name!r}: gate layers {list(self.layers)} must be increasing and end at "
                              f"its decision layer {self.layer}")
        if self.layers[0] < 1:
            raise VectorError(f"vector {name!r}: gate layer 0 reads the token embedding, not the prompt; "
                              "gate layers start at 1")
        self.threshold = float(cfg["threshold"])
        self.position = int(cfg.get("position", -1))
        self.metric = cfg.get("metric", "cosine")
        if self.metric not in ("cosine", "linear"):
            raise VectorError(f"vector {name!r}: unknown gate metric {self.metric!r}")
        size = len(self.layers) * hidden_size if hidden_size else direction.numel()
        if direction.shape != (size,) or center.shape != (size,) or size % len(self.layers):
            raise VectorError(f"vector {name!r}: gate direction {tuple(direction.shape)} and center "
                              f"{tuple(center.shape)} do not fit {len(self.layers)} gate layer(s)")
        self.direction, self.center = direction.float(), center.float()
        self.also: _Probe | None = None
        if cfg.get("also") is not None:
            self.also = _Probe.of(name, cfg["also"], also, self.layers, size // len(self.layers))
            if cfg.get("lower") is not None:
                raise VectorError(f"vector {name!r}: a gate with 'also' (two gates AND-ed) cannot be two-sided")
        self.lower_threshold: float | None = None
        self.lower_strength = 0.0
        self.lower_span = "all"
        self.lower_floor: float | None = None
        lower = cfg.get("lower")
        if lower is not None and two_sided:
            try:
                t, c = float(lower["threshold"]), float(lower["strength"])
            except (TypeError, KeyError, ValueError):
                raise VectorError(f"vector {name!r}: gate 'lower' must be {{\"threshold\": number, "
                                  f"\"strength\": number}}, got {lower!r}") from None
            if not (math.isfinite(t) and t < self.threshold):
                raise VectorError(f"vector {name!r}: gate lower threshold {t} must be below its threshold "
                                  f"{self.threshold}")
            if not (math.isfinite(c) and 0 < c <= MAX_LOWER_STRENGTH):
                raise VectorError(f"vector {name!r}: gate lower strength {c} must be in (0, {MAX_LOWER_STRENGTH:g}]")
            span = lower.get("span", "all")
            if span not in LOWER_SPANS:
                raise VectorError(f"vector {name!r}: gate lower span {span!r} must be one of {', '.join(LOWER_SPANS)}")
            floor = lower.get("floor")
            if floor is not None and not (isinstance(floor, int | float) and math.isfinite(floor) and floor < t):
                raise VectorError(f"vector {name!r}: gate lower floor {floor!r} must be a number below its lower "
                                  f"threshold {t}")
            self.lower_threshold, self.lower_strength, self.lower_span = t, c, span
            self.lower_floor = None if floor is None else float(floor)

    @classmethod
    def of(cls, vector: SafetyVector, *, two_sided: bool = True) -> Gate | None:
        cfg = vector.config.get("gate")
        if not cfg:
            return None
        also = None
        if cfg.get("also") is not None:
            try:
                also = (vector.tensors["gate.also.direction"], vector.tensors["gate.also.center"])
            except KeyError:
                raise VectorError(f"vector {vector.name!r}: its gate has 'also' but its tensors lack "
                                  "gate.also.direction / gate.also.center") from None
        return cls(vector.name, cfg, vector.tensors["gate.direction"], vector.tensors["gate.center"],
                   hidden_size=vector.model.hidden_size, two_sided=two_sided, also=also)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """(B, k*d) residuals at the gate position (k gate layers, concatenated in order) -> (B,) scores."""
        return _probe_scores(h, self.direction, self.center, self.metric)

    def fired(self, h: torch.Tensor) -> torch.Tensor:
        """(B, k*d) residuals at the gate position -> (B,) 1.0 where the gate opens, else 0.0."""
        return (self.scores(h) > self.threshold).float()

    def decide(self, h: torch.Tensor) -> torch.Tensor:
        """(B, k*d) residuals at the gate position -> (B,) decisions: 1.0 open, 0.0 closed, and for a
        two-sided gate -lower_strength where the score is below the lower threshold (and above its floor)."""
        s = self.scores(h)
        d = (s > self.threshold).float()
        if self.also is not None:
            d = d * (self.also.scores(h) > self.also.threshold).float()
        if self.lower_threshold is not None:
            low = s < self.lower_threshold
            if self.lower_floor is not None:
                low &= s > self.lower_floor
            d = torch.where(low, torch.full_like(d, -self.lower_strength), d)
        return d

    def in_decode(self, d: torch.Tensor) -> torch.Tensor:
        """Decisions ``d`` as they apply to a pass of generated tokens: a lowered row (d < 0) of a gate
        whose lower span is ``"prompt"`` runs them vanilla (0)."""
        return d.clamp_min(0) if self.lower_span == "prompt" else d

    def decide_from(self, parts: dict[int, torch.Tensor]) -> torch.Tensor:
        """Decisions from {gate layer: (B, d) residuals at the gate position}, one entry per gate layer
        (taken out of ``parts``), concatenated in the gate's layer order."""
        missing = [ly for ly in self.layers if ly not in parts]
        if missing:
            raise RuntimeError(f"gate residuals of layers {missing} were not kept before layer {self.layer}")
        return self.decide(torch.cat([parts.pop(ly) for ly in self.layers], dim=-1))

    def install(self, name: str, model: nn.Module, rows: RowSteering) -> list:
        """Pre-hooks that decide ``rows.gate[name]`` inside a one-pass caller's prompt pass (a whole
        left-padded prompt in one forward, ``rows.prompt_lens`` its real lengths): each gate layer keeps
        its input residual at the gate position, the last one decides. Nothing is done where the
        decision is already made (the engine's chunked prefill, decode passes) or no row uses ``name``.
        Install these before any hook that changes the same layers' inputs."""
        layers = decoder_layers(model)
        parts: dict[int, torch.Tensor] = {}

        def hook_for(ly: int) -> Callable:
            def hook(module: nn.Module, args: tuple, kwargs: dict):
                s = rows.strength.get(name)
                if s is None or not bool(s.any()) or name in rows.gate:
                    return None
                parts[ly] = _gate_rows(_hidden_arg(args, kwargs), self.position, rows.prompt_lens)
                if ly == self.layer:
                    rows.gate[name] = self.decide_from(parts)
                return None

            return hook

        return [layers[ly].register_forward_pre_hook(hook_for(ly), with_kwargs=True) for ly in self.layers]


class _Probe:
    """A gate's second probe (``Gate.also``): a threshold on a score of the gate's residuals at some of its
    layers (``layers``, a subset of the gate's, in order)."""

    def __init__(self, direction: torch.Tensor, center: torch.Tensor, threshold: float, metric: str,
                 index: torch.Tensor) -> None:
        self.direction, self.center, self.threshold, self.metric = direction.float(), center.float(), threshold, metric
        self.index = index  # the columns of the gate's concatenated residuals this probe reads

    @classmethod
    def of(cls, name: str, cfg: dict, tensors: tuple[torch.Tensor, torch.Tensor] | None, gate_layers: tuple,
           d: int) -> _Probe:
        try:
            layers = [int(x) for x in cfg["layers"]]
            threshold, metric = float(cfg["threshold"]), cfg.get("metric", "cosine")  # as Gate's
        except (TypeError, KeyError, ValueError):
            raise VectorError(f"vector {name!r}: gate 'also' must be {{\"layers\": [...], \"threshold\": number}}, "
                              f"got {cfg!r}") from None
        if not layers or layers != sorted(set(layers)) or not set(layers) <= set(gate_layers):
            raise VectorError(f"vector {name!r}: gate 'also' layers {layers} must be increasing and among the gate's "
                              f"layers {list(gate_layers)}")
        if not math.isfinite(threshold) or metric not in ("cosine", "linear"):
            raise VectorError(f"vector {name!r}: gate 'also' needs a finite threshold and metric linear or cosine")
        if tensors is None:
            raise VectorError(f"vector {name!r}: gate 'also' has no probe tensors")
        direction, center = tensors
        if direction.shape != (len(layers) * d,) or center.shape != direction.shape:
            raise VectorError(f"vector {name!r}: gate 'also' direction {tuple(direction.shape)} and center "
                              f"{tuple(center.shape)} do not fit {len(layers)} layer(s) of size {d}")
        index = torch.cat([torch.arange(gate_layers.index(ly) * d, (gate_layers.index(ly) + 1) * d) for ly in layers])
        return cls(direction, center, threshold, metric, index)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """The gate's (B, k*d) residuals -> (B,) scores of this probe, over its layers' columns."""
        return _probe_scores(h.index_select(-1, self.index), self.direction, self.center, self.metric)


def _probe_scores(h: torch.Tensor, direction: torch.Tensor, center: torch.Tensor, metric: str) -> torch.Tensor:
    """A probe's scores of (B, n) residuals: the linear logit, or the cosine, of h - center with direction."""
    x = h.float() - center
    s = x @ direction
    return s if metric == "linear" else s / x.norm(dim=-1).clamp_min(1e-6)


class Steerer(Protocol):
    """What the runtime and the engine need of a steerer, whatever its kind."""

    name: str
    kind: str
    transfer: bool  # applied to other weights than the ones it was made from, as the operator declared
    gate_layer: int | None  # None: ungated (every row with strength > 0 is steered)
    gate: Gate | None  # how the rows' gates are decided (at the input of gate_layer)

    def install(self, model: nn.Module, rows: RowSteering) -> list: ...  # -> hook handles


class ActivationSteerer:
    """Adds ``strength * coefficient * gate * r_l`` to the residual stream at the input of layer l.

    The gate (optional, a :class:`Gate` stored in the vector) is computed once per row at prefill and
    then held for all the row's decode steps, so benign prompts are left exactly vanilla.
    """

    kind = "activation"

    def __init__(self, vector: SafetyVector, *, dtype: torch.dtype, transfer: bool = False) -> None:
        if vector.kind != "activation":
            raise VectorError(f"vector {vector.name!r} is a {vector.kind} vector, not an activation vector")
        self.name, self.transfer = vector.name, transfer
        cfg = vector.config
        if cfg.get("mode", "add") != "add":
            raise VectorError(f"vector {vector.name!r}: unknown activation mode {cfg.get('mode')!r}; known: add")
        self.coefficient = float(cfg.get("coefficient", 1.0))
        self.directions = {ly: r.to(dtype) for ly, r in vector.layer_directions().items()}
        if not self.directions:
            raise VectorError(f"vector {vector.name!r} has no layer directions")
        self.gate = Gate.of(vector)
        self.gate_layer = self.gate.layer if self.gate else None
        if self.gate and self.gate.layer > min(self.directions):
            raise VectorError(f"vector {vector.name!r}: gate layer must not follow the first steered layer")

    def layers(self) -> set[int]:
        return set(self.directions) | (set(self.gate.layers) if self.gate is not None else set())

    def install(self, model: nn.Module, rows: RowSteering) -> list:
        layers = decoder_layers(model)
        bad = [ly for ly in self.layers() if not 0 <= ly < len(layers)]
        if bad:
            raise VectorError(f"vector {self.name!r} targets layers {bad}, model has {len(layers)}")
        # the gate's hooks first: at a layer both read, the gate reads the input before it is steered
        handles = self.gate.install(self.name, model, rows) if self.gate is not None else []
        return handles + [layers[ly].register_forward_pre_hook(self.make_hook(ly, rows), with_kwargs=True)
                          for ly in sorted(self.directions)]

    def make_hook(self, layer: int, rows: RowSteering) -> Callable:
        r = self.directions.get(layer)
        coef = self.coefficient

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            s = rows.strength.get(self.name)
            if s is None or not bool(s.any()):
                return None
            h = _hidden_arg(args, kwargs)  # (B, T, d)
            k = s.float()
            if self.gate_layer is not None:
                g = rows.gate[self.name]
                k = k * (self.gate.in_decode(g) if rows.decode else g)
            k = (k * coef).to(h.dtype)  # (B,)
            return _replace_hidden(args, kwargs, h + k[:, None, None] * r)

        return hook


def _linear_targets(model: nn.Module, vector: SafetyVector) -> dict[str, nn.Module]:
    """{parameter name: the module whose ``.weight`` it is} for every parameter the vector changes; each
    must be a 2-D weight of a linear layer (plain or packed) with the delta's shape."""
    modules = dict(model.named_modules())
    targets = {}
    for param in vector.weight_params():
        mod_name, _, leaf = param.rpartition(".")
        mod = modules.get(mod_name)
        if leaf != "weight" or mod is None or not hasattr(mod, "in_features"):
            raise VectorError(f"vector {vector.name!r} changes {param!r}, which is not a linear layer's weight "
                              "in this model")
        lr = vector.lowrank(param)
        shape = (lr[1].shape[0], lr[0].shape[1]) if lr is not None else tuple(vector.tensors[f"delta.{param}"].shape)
        if shape != (mod.out_features, mod.in_features):
            raise VectorError(f"vector {vector.name!r}: {param} is {shape[0]}x{shape[1]}, the model's is "
                              f"{mod.out_features}x{mod.in_features}")
        targets[param] = mod
    if not targets:
        raise VectorError(f"vector {vector.name!r} has no weight deltas")
    return targets


class WeightSteerer:
    """Adds ``strength * coefficient * B (A x)`` to the output of each linear layer a weight vector
    changes, per row: the vector's low-rank factors applied per request.

    ``gate`` (optional; a weight vector has none of its own, it borrows an activation vector's): a row
    is changed only if its prompt passes the gate. The gate is known only once the prompt has reached
    the gate layer, so a gated row's prompt runs the layers before it unchanged; from the gate layer on,
    and at every layer for each generated token, the row runs the changed weights."""

    kind = "weight"

    def __init__(self, vector: SafetyVector, model: nn.Module, *, transfer: bool = False,
                 gate: Gate | None = None) -> None:
        if vector.kind != "weight":
            raise VectorError(f"vector {vector.name!r} is a {vector.kind} vector, not a weight vector")
        self.name, self.transfer = vector.name, transfer
        self.gate = gate
        self.gate_layer = gate.layer if gate else None
        if gate and not 0 <= gate.layer < len(decoder_layers(model)):
            raise VectorError(f"vector {vector.name!r}: gate layer {gate.layer}, model has "
                              f"{len(decoder_layers(model))} layers")
        self.coefficient = float(vector.config.get("coefficient", 1.0))
        self.targets = _linear_targets(model, vector)
        dtype = next(model.parameters()).dtype
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for param in self.targets:
            lr = vector.lowrank(param)
            if lr is None:
                raise VectorError(f"vector {vector.name!r} stores {param} as a dense delta: per-request serving "
                                  "needs low-rank factors (make it with --format lowrank, or merge it at load)")
            a, b = lr
            self.factors[param] = (a.to(dtype).contiguous(), (b.float() * self.coefficient).to(dtype).contiguous())
        self.rank = max(a.shape[0] for a, _ in self.factors.values())

    def install(self, model: nn.Module, rows: RowSteering) -> list:
        # Modules are looked up now, by name: packing replaces the linear modules after this steerer was
        # made. Targets under one parent with the same input width (q/k/v, gate/up) usually read the same
        # input tensor: their A factors are stacked so that A x is one matmul for the group, reused while
        # the input and the strengths are the same objects (checked by identity, so any model is correct).
        modules = dict(model.named_modules())
        groups: dict[tuple[str, int], list[str]] = {}
        for p in self.targets:
            groups.setdefault((p.rsplit(".", 2)[0], self.factors[p][0].shape[1]), []).append(p)
        state = _StrengthCache(self.name, rows, gated=self.gate is not None)
        handles = []
        if self.gate is not None:  # a one-pass caller's gate is decided by these hooks, from its residuals
            handles += self.gate.install(self.name, model, rows)
        for params in groups.values():
            group = _InputGroup(torch.cat([self.factors[p][0] for p in params]))
            lo = 0
            for p in params:
                a, b = self.factors[p]
                hook = self._hook(group, slice(lo, lo + a.shape[0]), b, state)
                handles.append(modules[p.rpartition(".")[0]].register_forward_hook(hook))
                lo += a.shape[0]
        return handles

    @staticmethod
    def _hook(group: _InputGroup, cols: slice, b: torch.Tensor, state: _StrengthCache) -> Callable:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor):
            s = state.current()
            if s is None:
                return None
            x = args[0]
            if group.x is not x or group.s is not s:  # the strength scales the small (B, ..., R) tensor
                group.x, group.s = x, s
                group.xa = torch.nn.functional.linear(x, group.a) * state.factor(x.dim(), out.dtype)
            xa = group.xa[..., cols]
            flat = out.reshape(-1, out.shape[-1])
            flat.addmm_(xa.reshape(-1, xa.shape[-1]), b.t())  # out += (s A x) B^T in one pass; 0 rows add 0
            return flat.view_as(out)

        return hook


class _InputGroup:
    """Stacked A factors of the targets that share an input, and the last (input, strengths, s * A x)."""

    def __init__(self, a: torch.Tensor):
        self.a, self.x, self.s, self.xa = a.contiguous(), None, None, None


class _StrengthCache:
    """This forward pass's strengths of one vector (times the gate decisions, for a gated vector; no
    decisions yet counts as closed): None when no row is steered, else the tensor, with its reshaped
    copies per (ndim, dtype) made once per pass rather than once per hooked layer."""

    def __init__(self, name: str, rows: RowSteering, *, gated: bool = False):
        self.name, self.rows, self.gated = name, rows, gated
        self._s = self._g = self._eff = None
        self._factors: dict = {}

    def current(self) -> torch.Tensor | None:
        s = self.rows.strength.get(self.name)
        g = self.rows.gate.get(self.name) if self.gated else None
        if s is not self._s or g is not self._g:
            self._s, self._g, self._factors = s, g, {}
            eff = s if not self.gated or s is None else (s.float() * g if g is not None else None)
            self._eff = eff if eff is not None and bool(eff.any()) else None
        return self._eff

    def factor(self, ndim: int, dtype: torch.dtype) -> torch.Tensor:
        key = (ndim, dtype)
        if key not in self._factors:
            self._factors[key] = self._eff.to(dtype).view(-1, *([1] * (ndim - 1)))
        return self._factors[key]


@torch.no_grad()
def merge_weight_vector(model: nn.Module, vector: SafetyVector, strength: float) -> list[str]:
    """W += strength * coefficient * delta for every weight the vector changes (in float32, rounded
    once to the model's dtype). Returns the changed parameter names. Before packing."""
    targets = _linear_targets(model, vector)
    k = strength * float(vector.config.get("coefficient", 1.0))
    for param, mod in targets.items():
        w = mod.weight
        w.copy_((w.float() + k * vector.delta(param)).to(w.dtype))
    return sorted(targets)


def _gate_rows(h: torch.Tensor, offset: int, prompt_lens: torch.Tensor | None) -> torch.Tensor:
    """(B, T, d) left-padded prefill residuals -> (B, d) at ``offset`` from each row's end, clamped to
    the row's first real token so a prompt shorter than the offset never reads padding."""
    B, T, _ = h.shape
    lens = prompt_lens if prompt_lens is not None else torch.full((B,), T)
    return h[torch.arange(B), gate_columns(T, offset, lens)]


def gate_columns(width: int, offset: int, lens: torch.Tensor) -> torch.Tensor:
    """Column of each row's gate position in a left-padded batch of ``width`` columns (see _gate_rows)."""
    return width + torch.maximum(torch.full_like(lens, offset), -lens)


def borrowed_gates(vectors: dict[str, SafetyVector], gated_by: dict[str, str]) -> dict[str, Gate]:
    """{weight vector: the gate it borrows} for ``gated_by`` ({weight vector: gated activation vector}),
    checked: both named vectors loaded, the first a weight vector, the second one with a gate."""
    gates = {}
    for weight, source in gated_by.items():
        for name in (weight, source):
            if name not in vectors:
                raise VectorError(f"--gate-with {weight}={source}: {name!r} is not a loaded vector; loaded: "
                                  f"{', '.join(sorted(vectors)) or 'none'}")
        if vectors[weight].kind != "weight":
            raise VectorError(f"--gate-with {weight}={source}: {weight!r} is an {vectors[weight].kind} vector; "
                              "only a weight vector borrows a gate (an activation vector has its own)")
        gate = Gate.of(vectors[source], two_sided=False)
        if gate is None:
            raise VectorError(f"--gate-with {weight}={source}: {source!r} has no gate")
        gates[weight] = gate
    return gates


def check_combinations(vectors: dict[str, SafetyVector], combos: dict[str, dict[str, float]]) -> None:
    """``combos`` ({name: {part vector: ratio}}) checked against the loaded per-request ``vectors``: a name
    of its own, two or more loaded parts, positive finite ratios, no combination inside another."""
    for name, parts in combos.items():
        spec = f"--combine {name}={'+'.join(f'{p}*{r:g}' for p, r in parts.items())}"
        if name in vectors:
            raise VectorError(f"{spec}: {name!r} is already a loaded vector's name")
        if len(parts) < 2:
            raise VectorError(f"{spec}: a combination needs two or more vectors")
        for part, ratio in parts.items():
            if part not in vectors:
                what = "another combination" if part in combos else "not a loaded per-request vector"
                raise VectorError(f"{spec}: {part!r} is {what}; loaded: {', '.join(sorted(vectors)) or 'none'}")
            if not (math.isfinite(ratio) and ratio > 0):
                raise VectorError(f"{spec}: the ratio of {part!r} must be a finite number > 0, got {ratio!r}")


class SteeringRuntime:
    """Owns the steerers for one model; ``with runtime:`` installs hooks, exit removes them.

    ``transfers``: names of vectors the operator declared as transfers (made on another model of the
    same architecture, e.g. the aligned model a fine-tune came from); any other vector must have been
    made from exactly these weights. ``gated_by``: {weight vector: activation vector} serves each such
    weight vector behind the activation vector's gate (both loaded here). ``combos``: {name: {vector:
    ratio}}: a row that names a combination is steered by each of its vectors at its strength times the
    vector's ratio, each behind its own gate (a weight vector: the one it borrows, if any)."""

    def __init__(self, model: nn.Module, vectors: Iterable[SafetyVector], *, check_fingerprint: bool = True,
                 model_fingerprint: ModelFingerprint | None = None, transfers: Iterable[str] = (),
                 gated_by: dict[str, str] | None = None, combos: dict[str, dict[str, float]] | None = None):
        self.model = model
        self.rows = RowSteering()
        vectors = list(vectors)
        self.combos = {n: dict(p) for n, p in (combos or {}).items()}
        check_combinations({v.name: v for v in vectors}, self.combos)
        transfers = set(transfers)
        matched: dict[str, str] = {}
        if check_fingerprint and vectors:
            fp = model_fingerprint or fingerprint(model)
            for v in vectors:
                matched[v.name] = v.check_model(fp, transfer=v.name in transfers)
        dtype = next(model.parameters()).dtype
        gates = borrowed_gates({v.name: v for v in vectors}, gated_by or {})
        self.steerers: dict[str, ActivationSteerer | WeightSteerer] = {}
        for v in vectors:
            transfer = matched.get(v.name) == "transfer"
            if v.kind == "activation":
                st = ActivationSteerer(v, dtype=dtype, transfer=transfer)
                n_layers = len(decoder_layers(model))
                bad = [ly for ly in st.layers() if not 0 <= ly < n_layers]
                if bad:
                    raise VectorError(f"vector {v.name!r} targets layers {bad}, model has {n_layers}")
            else:
                gate = gates.get(v.name)
                st = WeightSteerer(v, model, transfer=transfer, gate=gate)
            self.steerers[v.name] = st
        self._handles: list = []

    @property
    def gated(self) -> list[str]:
        return [n for n, s in self.steerers.items() if s.gate_layer is not None]

    def deciding(self, name: str | None) -> str | None:
        """The vector whose gate decision a row naming ``name`` reports: the first gated part of a
        combination (in the order given), or the vector itself if it has a gate."""
        return next((n for n in self.parts(name) if n in self.steerers and self.steerers[n].gate is not None), None)

    def parts(self, name: str | None) -> dict[str, float]:
        """{vector: ratio} a row naming ``name`` is steered by: a combination's parts, or the vector."""
        if not name:
            return {}
        return self.combos.get(name) or {name: 1.0}

    def __enter__(self) -> SteeringRuntime:
        if self._handles:
            raise RuntimeError("steering hooks are already installed on this model")
        try:
            for st in self.steerers.values():
                self._handles.extend(st.install(self.model, self.rows))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
