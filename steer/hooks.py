"""Per-row activation steering with scoped, reversible forward hooks.

Every forward pass reads its steering inputs from a ``RowSteering`` object that the caller fills
before the pass: one strength per row and vector (0 for rows that use another vector or none), and,
for decode passes, the gate each row's prompt produced at prefill. Rows with strength 0 pass through
bit for bit (``x + 0 * r == x``), which is what makes strength 0 the vanilla model even inside a
batch whose other rows are steered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from steer.models import ModelFingerprint, decoder_layers, fingerprint
from steer.vectors import SafetyVector, VectorError


class RowSteering:
    """Steering inputs of the forward pass about to run. Shapes are (B,).

    ``gate`` holds the gate decision (0/1) per row of every gated vector that has one. The engine
    decides gates before it steers any position (``steer.engine``); a caller that runs a whole prompt
    in one plain forward pass can leave ``gate`` empty and let the gate layer's hook decide from this
    pass's own residuals (at ``gate_position`` from each row's end, given ``prompt_lens`` when the
    batch is left-padded).
    """

    def __init__(self) -> None:
        self.strength: dict[str, torch.Tensor] = {}
        self.gate: dict[str, torch.Tensor] = {}
        self.prompt_lens: torch.Tensor | None = None  # real (unpadded) prompt length per row

    def reset(self, *, prompt_lens: torch.Tensor | None = None) -> None:
        self.strength, self.gate, self.prompt_lens = {}, {}, prompt_lens


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _replace_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (h, *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = h
    return args, kwargs


class ActivationSteerer:
    """Adds ``strength * coefficient * gate * r_l`` to the residual stream at the input of layer l.

    The gate (optional) is a hard threshold on a score of the prompt's residual at ``gate_position``
    (an offset from the prompt's end; -5 is the end-of-user-turn token of a ChatML prompt) at
    ``gate_layer``: a linear probe's logit, or a cosine with a gate direction; it is computed once per row at
    prefill and then held for all the row's decode steps, so benign prompts are left exactly vanilla.
    """

    def __init__(self, vector: SafetyVector, *, dtype: torch.dtype) -> None:
        if vector.kind != "activation":
            raise VectorError(f"vector {vector.name!r} is a {vector.kind} vector, not an activation vector")
        self.name = vector.name
        cfg = vector.config
        self.coefficient = float(cfg.get("coefficient", 1.0))
        self.directions = {ly: r.to(dtype) for ly, r in vector.layer_directions().items()}
        if not self.directions:
            raise VectorError(f"vector {vector.name!r} has no layer directions")
        gate = cfg.get("gate")
        self.gate_layer: int | None = None
        if gate:
            self.gate_layer = int(gate["layer"])
            self.gate_threshold = float(gate["threshold"])
            self.gate_position = int(gate.get("position", -1))  # offset from the prompt's end
            self.gate_metric = gate.get("metric", "cosine")
            if self.gate_metric not in ("cosine", "linear"):
                raise VectorError(f"vector {vector.name!r}: unknown gate metric {self.gate_metric!r}")
            self.gate_direction = vector.tensors["gate.direction"].float()
            self.gate_center = vector.tensors["gate.center"].float()
            if self.gate_layer > min(self.directions):
                raise VectorError(f"vector {vector.name!r}: gate layer must not follow the first steered layer")

    def layers(self) -> set[int]:
        return set(self.directions) | ({self.gate_layer} if self.gate_layer is not None else set())

    def gate_scores(self, h: torch.Tensor) -> torch.Tensor:
        """(B, d) residuals at the gate position -> (B,) scores: a linear probe's logit (``linear``) or
        the cosine with the gate direction (``cosine``), both after subtracting the center."""
        x = h.float() - self.gate_center
        s = x @ self.gate_direction
        return s if self.gate_metric == "linear" else s / x.norm(dim=-1).clamp_min(1e-6)

    def make_hook(self, layer: int, rows: RowSteering) -> Callable:
        r = self.directions.get(layer)
        coef = self.coefficient

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            s = rows.strength.get(self.name)
            if s is None or not bool(s.any()):
                return None
            h = _hidden_arg(args, kwargs)  # (B, T, d)
            if layer == self.gate_layer and self.name not in rows.gate:  # one-pass caller: decide here
                picked = _gate_rows(h, self.gate_position, rows.prompt_lens)
                rows.gate[self.name] = (self.gate_scores(picked) > self.gate_threshold).float()
            if r is None:
                return None
            k = s.float()
            if self.gate_layer is not None:
                k = k * rows.gate[self.name]
            k = (k * coef).to(h.dtype)  # (B,)
            return _replace_hidden(args, kwargs, h + k[:, None, None] * r)

        return hook


def _gate_rows(h: torch.Tensor, offset: int, prompt_lens: torch.Tensor | None) -> torch.Tensor:
    """(B, T, d) left-padded prefill residuals -> (B, d) at ``offset`` from each row's end, clamped to
    the row's first real token so a prompt shorter than the offset never reads padding."""
    B, T, _ = h.shape
    lens = prompt_lens if prompt_lens is not None else torch.full((B,), T)
    return h[torch.arange(B), gate_columns(T, offset, lens)]


def gate_columns(width: int, offset: int, lens: torch.Tensor) -> torch.Tensor:
    """Column of each row's gate position in a left-padded batch of ``width`` columns (see _gate_rows)."""
    return width + torch.maximum(torch.full_like(lens, offset), -lens)


class SteeringRuntime:
    """Owns the steerers for one model; ``with runtime:`` installs hooks, exit removes them."""

    def __init__(self, model: nn.Module, vectors: Iterable[SafetyVector], *, check_fingerprint: bool = True,
                 model_fingerprint: ModelFingerprint | None = None):
        self.model = model
        self.rows = RowSteering()
        vectors = list(vectors)
        if check_fingerprint and vectors:
            fp = model_fingerprint or fingerprint(model)
            for v in vectors:
                v.check_model(fp)
        dtype = next(model.parameters()).dtype
        self.steerers: dict[str, ActivationSteerer] = {}
        n_layers = len(decoder_layers(model))
        for v in vectors:
            if v.kind != "activation":
                raise VectorError(f"vector {v.name!r}: {v.kind} vectors cannot be applied per request yet")
            st = ActivationSteerer(v, dtype=dtype)
            bad = [ly for ly in st.layers() if not 0 <= ly < n_layers]
            if bad:
                raise VectorError(f"vector {v.name!r} targets layers {bad}, model has {n_layers}")
            self.steerers[v.name] = st
        self._handles: list = []

    @property
    def gated(self) -> list[str]:
        return [n for n, s in self.steerers.items() if s.gate_layer is not None]

    def __enter__(self) -> SteeringRuntime:
        if self._handles:
            raise RuntimeError("steering hooks are already installed on this model")
        layers = decoder_layers(self.model)
        try:
            for st in self.steerers.values():
                for ly in sorted(st.layers()):
                    hook = st.make_hook(ly, self.rows)
                    self._handles.append(layers[ly].register_forward_pre_hook(hook, with_kwargs=True))
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
