"""OpenAI response bodies and SSE chunks, with the ``safety`` / ``baseline`` extensions.

Builders take plain values (texts, finish reasons, token counts), never engine objects.
"""

from __future__ import annotations

import codecs
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from server.backends.base import LogprobEntry
from steer.types import SteeringSpec

FinishReason = Literal["stop", "length"]

Kind = Literal["chat", "text"]  # /v1/chat/completions vs /v1/completions
SSE_DONE = "data: [DONE]\n\n"


class Logprobs:
    """One answer's token log-probabilities as they arrive, with each token's character offset in the
    answer (the legacy completions format's ``text_offset``; a token holding part of a character starts
    where that character does)."""

    def __init__(self) -> None:
        self.entries: list[LogprobEntry] = []
        self.offsets: list[int] = []
        self._chars = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, entries: Sequence[LogprobEntry]) -> None:
        for e in entries:
            self.entries.append(e)
            start = self._chars
            held = self._utf8.getstate()[0]  # the start of a character the last tokens left incomplete
            if held:
                try:  # this token goes on with that character: it starts where the character does
                    codecs.getincrementaldecoder("utf-8")().decode(held + e.bytes[:1])
                except UnicodeDecodeError:  # it does not: the held bytes are one U+FFFD before it
                    start += 1
            self.offsets.append(start)
            self._chars += len(self._utf8.decode(e.bytes))

    def render(self, kind: Kind, start: int = 0, stop: int | None = None) -> dict[str, Any]:
        """Tokens ``start:stop`` as a choice's ``logprobs``: ``{"content": [...]}`` for chat, the legacy
        ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` for completions."""
        part = self.entries[start:stop]
        if kind == "chat":
            def one(token: str, raw: bytes, logprob: float) -> dict[str, Any]:
                return {"token": token, "logprob": logprob, "bytes": list(raw)}

            content = [one(e.token, e.bytes, e.logprob) | {"top_logprobs": [one(*t) for t in e.top]} for e in part]
            return {"content": content, "refusal": None}
        return {
            "tokens": [e.token for e in part],
            "token_logprobs": [e.logprob for e in part],
            # as vLLM: the most likely tokens and the chosen one (a text shared by two tokens shows once)
            "top_logprobs": [None if e.logprob is None else {t: v for t, _, v in e.top} | {e.token: e.logprob}
                             for e in part],  # None: a prompt's first token (echo) has no log-probability
            "text_offset": self.offsets[start:stop],
        }


@dataclass(frozen=True)
class Choice:
    """One generated answer; ``logprobs`` where the request asked for them."""

    text: str
    finish_reason: FinishReason
    logprobs: Logprobs | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def to_dict(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }


Baseline = tuple[Sequence[Choice], Usage]  # the strength-0 answers and their usage, when compare is on


@dataclass(frozen=True)
class ResponseMeta:
    """What every body and chunk of one response shares (OpenAI repeats id/created in every chunk)."""

    kind: Kind
    id: str
    model: str
    created: int

    @classmethod
    def new(cls, kind: Kind, model: str) -> ResponseMeta:
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        return cls(kind=kind, id=prefix + uuid.uuid4().hex, model=model, created=int(time.time()))

    def body(self, object_: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }


def sse_line(payload: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def safety_info(spec: SteeringSpec, kind: str | None, applied: float | None = None) -> dict[str, Any]:
    """The ``safety`` response extension. ``vector`` is null when no vector was involved;
    ``applied_strength`` is present only where the backend served a strength other than the one asked
    (the vLLM backend's adapter step)."""
    info = {"strength": spec.strength, "vector": spec.vector or None, "kind": kind}
    if applied is not None and applied != spec.strength:
        info["applied_strength"] = applied
    return info


def _choice_dicts(kind: Kind, choices: Sequence[Choice]) -> list[dict[str, Any]]:
    def one(i: int, c: Choice) -> dict[str, Any]:
        if kind == "chat":
            body = {"index": i, "message": {"role": "assistant", "content": c.text}}
        else:
            body = {"index": i, "text": c.text}
        lp = c.logprobs.render(kind) if c.logprobs is not None else None
        return body | {"logprobs": lp, "finish_reason": c.finish_reason}

    return [one(i, c) for i, c in enumerate(choices)]


def _with_extensions(
    meta: ResponseMeta,
    body: dict[str, Any],
    usage: Usage | None,
    safety: Mapping[str, Any],
    baseline: Baseline | None,
) -> dict[str, Any]:
    body["usage"] = usage.to_dict() if usage else None
    body["safety"] = dict(safety)
    if baseline is not None:
        body["baseline"] = {"choices": _choice_dicts(meta.kind, baseline[0]), "usage": baseline[1].to_dict()}
    return body


def completion_response(
    meta: ResponseMeta,
    choices: Sequence[Choice],
    usage: Usage,
    safety: Mapping[str, Any],
    baseline: Baseline | None = None,
) -> dict[str, Any]:
    """A non-streaming body with the safety extension: ``chat.completion`` when ``meta.kind`` is
    "chat", ``text_completion`` when it is "text"."""
    object_ = "chat.completion" if meta.kind == "chat" else "text_completion"
    body = meta.body(object_, _choice_dicts(meta.kind, choices))
    return _with_extensions(meta, body, usage, safety, baseline)


# Same builder; the name reads better at the chat endpoint (pass a ResponseMeta of kind "chat").
chat_completion_response = completion_response


def chat_chunk(
    meta: ResponseMeta,
    index: int = 0,
    *,
    role: str | None = None,
    content: str | None = None,
    finish_reason: FinishReason | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` for one choice; send ``role="assistant"`` on a choice's first chunk.
    ``logprobs``: the chunk's tokens, rendered by ``Logprobs.render``."""
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return meta.body("chat.completion.chunk", [choice])


def completion_chunk(
    meta: ResponseMeta, index: int = 0, *, text: str = "", finish_reason: FinishReason | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed ``text_completion`` chunk for one choice."""
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return meta.body("text_completion", [choice])


def baseline_chunk(
    meta: ResponseMeta,
    index: int = 0,
    *,
    role: str | None = None,
    content: str = "",
    finish_reason: FinishReason | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """New text of one baseline choice while it streams (``stream_options.include_baseline``): a chunk
    with no choices (so a client reading ``choices`` sees nothing) and the baseline choice's delta under
    ``baseline``, shaped like a steered chunk's choice (``delta`` for chat, ``text`` for completions)."""
    if meta.kind == "chat":
        delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
        choice: dict[str, Any] = {"index": index, "delta": delta}
        object_ = "chat.completion.chunk"
    else:
        choice, object_ = {"index": index, "text": content}, "text_completion"
    body = meta.body(object_, [])
    body["baseline"] = {"choices": [choice | {"logprobs": logprobs, "finish_reason": finish_reason}]}
    return body


def final_chunk(
    meta: ResponseMeta, usage: Usage | None, safety: Mapping[str, Any], baseline: Baseline | None = None
) -> dict[str, Any]:
    """The last chunk before ``[DONE]``: no choices (like OpenAI's usage chunk), usage only if the client
    asked for it (stream_options.include_usage), the safety extension, and the baseline if compared."""
    object_ = "chat.completion.chunk" if meta.kind == "chat" else "text_completion"
    return _with_extensions(meta, meta.body(object_, []), usage, safety, baseline)
