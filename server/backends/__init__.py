"""Backend registry. Heavy backends are imported only when selected: a transformers-only run never
imports vllm."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

from server.backends.base import Backend

_REGISTRY: dict[str, str] = {
    "transformers": "server.backends.transformers:TransformersBackend",
    "vllm": "server.backends.vllm:VllmBackend",
}


class UnknownBackend(ValueError):
    pass


def get(name: str) -> Callable[..., Backend]:
    if name not in _REGISTRY:
        raise UnknownBackend(f"backend {name!r} is not available; available: {', '.join(sorted(_REGISTRY))}")
    module, attr = _REGISTRY[name].split(":")
    return getattr(import_module(module), attr)
