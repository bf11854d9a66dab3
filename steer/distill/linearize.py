"""What stage 1 trains, and the NTK linearization of nonlinear blocks (METHODS.md 1.1).

Modes (EnchTable's ``ntk`` switch):

- ``attn``: the q/k/v/o projection *weights* of every layer, trained directly. A Linear is already
  linear in its weight (``W0 x + (W - W0) x = W x``), so linearizing it changes nothing and costs a JVP.
  Biases (qwen2's q/k/v) stay frozen.
- ``ffn``: the MLP block of layers ``[k, L - k)``, linearized as a whole.
- ``attn_ffn``: the attention block and the MLP block of layers ``[k, L - k)``, each linearized. A
  linearized attention block needs eager attention: SDPA's fused kernels have no forward-mode AD.

Inside a linearized block only the matrices (dim >= 2) are trainable; biases and norms stay at theta0,
so sigma is a set of weight-matrix differences in every mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call, jvp

from steer.models import decoder_layers

Mode = Literal["attn", "ffn", "attn_ffn"]
MODES: tuple[str, ...] = ("attn", "ffn", "attn_ffn")
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
ATTN_BLOCK, MLP_BLOCK = "self_attn", "mlp"


def is_matrix(name: str, p: torch.Tensor) -> bool:
    return p.dim() >= 2


class Linearized(nn.Module):
    """``f(x; theta0) + J_theta f(x; theta0) (theta - theta0)`` for a wrapped module.

    ``inner`` keeps theta0 (frozen); ``theta`` holds the trainable copies, initialised to theta0, of
    the parameters ``trainable`` selects. Blocks returning a tuple (attention: (output, weights)) return
    (linearized output, None): the attention weights are not linearized and nothing reads them in training.
    """

    def __init__(self, module: nn.Module, trainable: Callable[[str, torch.Tensor], bool] = is_matrix) -> None:
        super().__init__()
        self.inner = module.requires_grad_(False)
        self.names = [n for n, p in module.named_parameters() if trainable(n, p)]
        self.theta = nn.ParameterList(
            [nn.Parameter(module.get_parameter(n).detach().clone()) for n in self.names]
        )

    def forward(self, *args, **kwargs):
        theta0 = {n: self.inner.get_parameter(n) for n in self.names}
        tangents = {n: t - theta0[n] for n, t in zip(self.names, self.theta, strict=True)}
        was_tuple = False

        def f(params: dict[str, torch.Tensor]) -> torch.Tensor:
            nonlocal was_tuple
            out = functional_call(self.inner, params, args, kwargs, strict=False)
            was_tuple = isinstance(out, tuple)
            return out[0] if was_tuple else out

        y0, dy = jvp(f, (theta0,), (tangents,))
        y = y0 + dy
        return (y, None) if was_tuple else y

    def trained(self) -> dict[str, torch.Tensor]:
        """{name relative to the wrapped module: trained theta}."""
        return {n: t.detach() for n, t in zip(self.names, self.theta, strict=True)}


def layer_range(n_layers: int, skip: int) -> range:
    if skip < 0 or 2 * skip >= n_layers:
        raise ValueError(f"--skip-layers {skip} leaves no layer of {n_layers} to train (need 0 <= k < L/2)")
    return range(skip, n_layers - skip)


def block_paths(model: nn.Module, mode: Mode, skip: int) -> list[str]:
    """Module paths (from the model root) of the blocks a linearized mode wraps."""
    from steer.models import architecture

    prefix = architecture(model.config.model_type).layers
    blocks = {"ffn": (MLP_BLOCK,), "attn_ffn": (ATTN_BLOCK, MLP_BLOCK)}[mode]
    return [f"{prefix}.{i}.{b}" for i in layer_range(len(decoder_layers(model)), skip) for b in blocks]


def attn_weight_names(model: nn.Module) -> list[str]:
    """State-dict names of the q/k/v/o projection weights of every layer (``attn`` mode)."""
    from steer.models import architecture

    prefix = architecture(model.config.model_type).layers
    return [f"{prefix}.{i}.{ATTN_BLOCK}.{p}.weight" for i in range(len(decoder_layers(model))) for p in ATTN_PROJ]


class Targets:
    """The trainable parameters of a mode, keyed by the model's state-dict names.

    ``attn``: the model's own weights with ``requires_grad``. Linearized modes: the blocks are replaced by
    :class:`Linearized` wrappers until :meth:`restore` loads the trained theta back into the plain modules.
    """

    def __init__(self, model: nn.Module, mode: Mode, skip: int) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        self.model, self.mode = model, mode
        self.wrappers: dict[str, Linearized] = {}
        if mode == "attn":
            self.params = {n: model.get_parameter(n) for n in attn_weight_names(model)}
        else:
            self.params = {}
            for path in block_paths(model, mode, skip):
                w = Linearized(model.get_submodule(path))
                _set_submodule(model, path, w)
                self.wrappers[path] = w
                self.params.update({f"{path}.{n}": t for n, t in zip(w.names, w.theta, strict=True)})
        for p in self.params.values():
            p.requires_grad_(True)

    def restore(self) -> None:
        """Put the plain modules back, holding the trained weights (the surrogate is an ordinary model)."""
        with torch.no_grad():
            for path, w in self.wrappers.items():
                for n, t in w.trained().items():
                    w.inner.get_parameter(n).copy_(t)
                _set_submodule(self.model, path, w.inner)
        self.wrappers = {}
        for p in self.model.parameters():
            p.requires_grad_(False)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)
