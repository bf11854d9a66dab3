"""What the app needs from a backend: vector metadata and an async stream of per-row events."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from steer.types import GenerationInput, SteeringSpec


@dataclass(frozen=True)
class LogprobEntry:
    """One generated token's log-probability as the API shows it: its text, its UTF-8 bytes (a token may
    hold part of a character; its text then has U+FFFD where the bytes are incomplete) and the most
    likely tokens at its position as (text, bytes, log-probability), most likely first. A prompt's first
    token (legacy ``echo``) has no log-probability: None."""

    token: str
    bytes: bytes
    logprob: float | None
    top: tuple[tuple[str, bytes, float], ...] = ()


@dataclass(frozen=True)
class RowEvent:
    """New text for one output row. ``baseline`` rows are the unsteered twins of compare requests."""

    index: int  # choice index (0..n-1)
    baseline: bool
    text: str
    n_tokens: int
    finish_reason: str | None
    # on a steered row's last event: its vector's gate decision (True: open, False: closed), None where
    # the vector has no gate or no gate was decided (strength 0, baseline rows, cancelled before prefill)
    gate: bool | None = None
    lowered: bool = False  # a two-sided gate judged the prompt benign and lowered refusal on this row
    logprobs: tuple[LogprobEntry, ...] = ()  # the tokens this event adds, where the request asked for logprobs
    # on a row's first event, where the request asked for the prompt's (legacy echo): one per prompt token
    prompt_logprobs: tuple[LogprobEntry, ...] = ()


@dataclass(frozen=True)
class Prepared:
    """A request after tokenisation, ready to run."""

    prompt_ids: tuple[int, ...]
    inp: GenerationInput
    steering: SteeringSpec
    prompt_text: str = ""  # the prompt as text (a token-id prompt's decoded), for the legacy echo
    # a later prompt of a batch whose first prompt was admitted: the queue cap counts the request once
    follows: bool = False


class Backend(Protocol):
    model_name: str
    max_model_len: int

    def vector_kinds(self) -> dict[str, str]: ...

    def default_vector(self) -> str | None: ...

    def merged_vectors(self) -> dict[str, float]: ...  # weight vectors merged into the weights: name -> strength

    def applied_strength(self, vector: str | None, strength: float) -> float:
        """The strength a request for ``strength`` of ``vector`` is served at (the vLLM backend rounds a
        weight vector's to its adapter step)."""
        ...

    def vectors_info(self) -> list[dict]: ...

    def model_fingerprint(self) -> dict: ...

    async def prepare(self, inp: GenerationInput, steering: SteeringSpec) -> Prepared: ...

    def generate(self, req: Prepared) -> AsyncIterator[RowEvent]: ...

    def runtime_info(self) -> dict:
        """{"kernels": {"dtype", "linear_weights", "how", "reason", ...}, "host": {...}}"""
        ...

    def start(self) -> None: ...

    def shutdown(self) -> None: ...

    def healthy(self) -> bool: ...

    def status(self) -> str:
        """serving | starting | draining | failed | stopped"""
        ...

    # graceful shutdown (server.runner): stop admitting, wait for in-flight work, fail the rest
    on_fatal: Callable[[], None] | None

    def begin_shutdown(self) -> None: ...

    def inflight(self) -> int: ...

    def abort_all(self, message: str) -> None: ...
