"""OpenAI wire request models and their one-time conversion to engine types (responses: responses.py).

Requests are validated here and turned into ``steer.types`` dataclasses by ``resolve``; nothing past
this module sees a pydantic request model. Unknown top-level fields are ignored (clients routinely
send neutral extras such as ``frequency_penalty: 0``), but a field asking for behaviour we do not
implement is a 400 naming it: silently ignoring it would change the answer's meaning.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationInfo, field_validator

from server.errors import APIError
from server.settings import Settings
from steer.types import ChatMessage, GenerationInput, SamplingParams, SteeringSpec

MAX_STOP_SEQUENCES = 4
MAX_LOGIT_BIAS = 1024  # logit_bias entries at most (each costs a little per token)
MAX_LOGPROBS = 20  # top_logprobs (chat) and logprobs (completions) at most: OpenAI's and vLLM's limit
MAX_PROMPTS = 256  # prompts in one /v1/completions request (a batch: lm-eval-harness sends them)
Role = Literal["system", "user", "assistant", "developer", "tool"]

# strict=True: "1.5" and true are not numbers; allow_inf_nan=False: Python's json accepts NaN/Infinity.
_NUMBER: dict[str, Any] = {"strict": True, "allow_inf_nan": False}

# Error messages quote a rejected value; bounded in length and depth (a 1 MB or 900-deep JSON value must
# not come back whole, nor recurse).
_QUOTE = reprlib.Repr()  # Python 3.11's Repr takes no constructor arguments
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother = 3, 60, 60


def _text(value: str, what: str) -> str:
    """``value`` if it is valid Unicode. JSON's ``"\\ud800"`` escape decodes to a lone surrogate, which the
    tokenizer cannot encode: refuse it here with a 400 naming the field, not deep in the backend."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"{what} is not valid Unicode: lone surrogate {value[e.start]!r} at index {e.start}"
            ) from None
    return value


# ---------------------------------------------------------------- request models


class SafetyOptions(BaseModel):
    """The ``safety`` request extension. Unknown keys fail: a typo in a safety control must be loud."""

    model_config = ConfigDict(extra="forbid")

    strength: float | None = Field(
        None, ge=0, **_NUMBER, description="Steering strength (>= 0; 0 = vanilla). Omitted: server default."
    )
    vector: str | None = Field(None, description="Name of a loaded vector. Omitted: the server default.")
    compare: StrictBool = Field(False, description="Also generate the unsteered baseline (strength 0).")


class StreamOptions(BaseModel):
    include_usage: StrictBool = False
    include_baseline: StrictBool = Field(
        False, description="With safety.compare: also stream the baseline's text as it is generated, in "
        "chunks with no choices and a 'baseline' holding the baseline's choice deltas (the whole baseline "
        "still comes on the final chunk).",
    )


class ChatMessageIn(BaseModel):
    role: Role
    # Validated "before" so that the error loc is "messages.N.content", not a union branch name.
    content: str = Field(None, validate_default=True, description="A string or a list of text parts.")
    tool_calls: list[Any] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _flatten_content(cls, value: Any, info: ValidationInfo) -> str:
        if value is None:
            if info.data.get("role") == "assistant":  # OpenAI allows a null assistant content
                return ""
            raise ValueError("content is required")
        if isinstance(value, str):
            return _text(value, "content")
        if isinstance(value, list):
            # vLLM joins text parts the same way
            return _text("\n".join(_text_part(part) for part in value), "content")
        raise ValueError("content must be a string or a list of text content parts")

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("tool calls are not supported by this server")
        return value


def _text_part(part: Any) -> str:
    if not isinstance(part, dict):
        raise ValueError("content parts must be objects like {'type': 'text', 'text': '...'}")
    if part.get("type") != "text":
        raise ValueError(f"only text content parts are supported, got type {part.get('type')!r}")
    text = part.get("text")
    if not isinstance(text, str):
        raise ValueError("a text content part needs a string 'text'")
    return text


def _neutral_choice(value: Any) -> bool:
    return value in (None, "none", "auto")


# Fields we accept only at their neutral value: anything else would silently change the semantics.
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "tools": lambda v: not v,
    "tool_choice": _neutral_choice,
    "functions": lambda v: not v,
    "function_call": _neutral_choice,
    "response_format": lambda v: v is None or v == {"type": "text"},
    "best_of": lambda v: v is None or v == 1,
    "suffix": lambda v: v is None,
}


def _reject_unsupported(value: Any, info: ValidationInfo) -> Any:
    name = info.field_name or "field"
    if not _NEUTRAL[name](value):
        raise ValueError(f"not supported by this server (got {_QUOTE.repr(value)})")
    return value


class _SamplingRequest(BaseModel):
    """Fields shared by both completion endpoints."""

    model: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, **_NUMBER, description="0 = greedy.")
    top_p: float | None = Field(None, gt=0, le=1, **_NUMBER)
    n: StrictInt | None = Field(None, ge=1)
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**64)  # torch.manual_seed's range
    stop: tuple[str, ...] = Field((), description="Up to 4 stop sequences (a string or a list).")
    stream: StrictBool | None = None
    ignore_eos: StrictBool = Field(False, description="vLLM extension: keep generating past end-of-sequence "
                                   "(benchmarks use it for fixed-length outputs).")
    stream_options: StreamOptions | None = None
    safety: SafetyOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(
        None, ge=-2, le=2, **_NUMBER, description="Subtracted from the logit of every token already in the answer."
    )
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, **_NUMBER, description="Subtracted from a token's logit once per time it is in the answer."
    )
    repetition_penalty: float | None = Field(  # from 0.01: dividing a logit by a subnormal one overflows
        None, ge=0.01, le=10, **_NUMBER, description="vLLM extension: divides positive (multiplies negative) logits "
        "of tokens in the prompt or the answer; 1 = off, 0.01..10."
    )
    logit_bias: dict[str, float] | None = Field(
        None, description=f"Token id (a string) -> bias added to its logit, -100..100; at most {MAX_LOGIT_BIAS} entries."
    )

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _check_logit_bias(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError("logit_bias must be an object mapping token ids to biases")
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {len(value)}")
        for key, bias in value.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit()):
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {_QUOTE.repr(key)}")
            if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be numbers from -100 to 100, got {_QUOTE.repr(bias)}")
        return value

    def logit_bias_ids(self) -> tuple[tuple[int, float], ...]:
        return tuple(sorted((int(k), float(v)) for k, v in (self.logit_bias or {}).items()))

    @field_validator("stop", mode="before")
    @classmethod
    def _normalise_stop(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list | tuple) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return tuple(_text(s, "a stop sequence") for s in stops)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def include_baseline(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_baseline)

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """(value, name of the field it came from), so an error names what the client sent."""
        return self.max_tokens, "max_tokens"


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = Field(None, description="Return each answer token's log-probability.")
    top_logprobs: StrictInt | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="With logprobs: also the most likely tokens at each position."
    )
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None

    _check_chat_neutral = field_validator(
        "tools", "tool_choice", "functions", "function_call", "response_format"
    )(_reject_unsupported)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return value

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> tuple[int | None, str]:
        # max_completion_tokens is OpenAI's newer name; it wins when both are sent.
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


Prompt = str | tuple[int, ...]  # a text prompt, or its token ids


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``."""

    max_tokens: StrictInt | None = Field(None, ge=0, description="0 only with echo (the prompt alone).")
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(
        description=f"A string, a list of token ids, or a batch of up to {MAX_PROMPTS} of either: choice "
        "p * n + j is prompt p's answer j."
    )
    echo: StrictBool | None = Field(None, description="Start each answer with its prompt (with logprobs: and the "
                                    "prompt tokens' log-probabilities, the first token's null).")
    suffix: Any = None
    logprobs: StrictInt | None = Field(
        None, ge=0, le=MAX_LOGPROBS,
        description="Return each answer token's log-probability and this many most likely tokens at each position.",
    )
    best_of: Any = None

    _check_completion_neutral = field_validator("suffix", "best_of")(_reject_unsupported)

    def logprobs_k(self) -> int | None:
        return self.logprobs

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        """The shapes OpenAI and vLLM take, checked here so that an error says what is wrong in words
        (pydantic's union errors list every branch)."""
        shapes = "a string, a list of strings, a list of token ids or a list of token-id lists"
        if isinstance(value, str):
            return cls._one_prompt(value)
        if not isinstance(value, list):
            raise ValueError(f"prompt must be {shapes}")
        if not value:
            raise ValueError("prompt must not be an empty list")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return cls._one_prompt(value)
        if len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(value)}")
        kinds = {str if isinstance(v, str) else list if isinstance(v, list) else None for v in value}
        if len(kinds) != 1 or None in kinds:
            raise ValueError(f"prompt must be {shapes} (not a mix)")
        return [cls._one_prompt(v) for v in value]

    @staticmethod
    def _one_prompt(value: Any) -> Any:
        if isinstance(value, str):
            if not value:
                raise ValueError("prompt must not be empty")
            return _text(value, "prompt")
        if not value:
            raise ValueError("a token-id prompt must not be empty")
        bad = next((v for v in value if isinstance(v, bool) or not isinstance(v, int) or v < 0), None)
        if bad is not None:
            raise ValueError(f"prompt token ids must be non-negative integers, got {_QUOTE.repr(bad)}")
        return value

    def prompts(self) -> tuple[Prompt, ...]:
        """The request's prompts, one per batch entry."""
        v = self.prompt
        if isinstance(v, str) or (v and isinstance(v[0], int)):
            v = [v]
        return tuple(p if isinstance(p, str) else tuple(p) for p in v)


# ---------------------------------------------------------------- conversion to engine types


def resolve(
    req: ChatCompletionRequest | CompletionRequest,
    settings: Settings,
    vectors: Mapping[str, str],
    default_vector: str | None,
) -> tuple[tuple[GenerationInput, ...], SteeringSpec]:
    """Check a request against server policy and convert it to engine types: one input per prompt (a
    chat request and most completions have one). Raises APIError (400).

    ``vectors`` maps each loaded vector name to its kind ("activation", "weight", ...).
    """
    if req.n is not None and req.n > settings.max_n:
        raise APIError(400, f"n must be at most {settings.max_n}, got {req.n}", param="n")
    sampling = sampling_params(req, settings)
    steering = steering_spec(req.safety, settings, vectors, default_vector)
    n, param = req.n or 1, req.requested_max_tokens()[1]
    if isinstance(req, ChatCompletionRequest):
        messages = tuple(ChatMessage(role=m.role, content=m.content) for m in req.messages)
        return (GenerationInput(messages=messages, sampling=sampling, n=n, max_tokens_param=param),), steering
    echo = bool(req.echo)
    if req.max_tokens == 0:
        if not echo:
            raise APIError(400, "max_tokens must be at least 1 (0 only with echo: the prompt alone)", param="max_tokens")
        sampling = replace(sampling, max_tokens=1)  # as vLLM: one token is generated and dropped
    if echo and sampling.logprobs is not None:
        sampling = replace(sampling, prompt_logprobs=sampling.logprobs)
    common = {"sampling": sampling, "n": n, "max_tokens_param": param, "echo": echo, "echo_only": req.max_tokens == 0}
    return tuple(GenerationInput(prompt=p, **common) if isinstance(p, str) else GenerationInput(prompt_ids=p, **common)
                 for p in req.prompts()), steering


def sampling_params(req: ChatCompletionRequest | CompletionRequest, settings: Settings) -> SamplingParams:
    """Decoding settings with OpenAI defaults. The prompt-length check is the backend's (it tokenizes)."""
    max_tokens, param = req.requested_max_tokens()
    if max_tokens is not None and max_tokens > settings.max_model_len:
        raise APIError(
            400,
            f"{param} must be at most max_model_len={settings.max_model_len}, got {max_tokens}",
            param=param,
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        ignore_eos=req.ignore_eos,
        stop=req.stop,
        logprobs=req.logprobs_k(),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=req.logit_bias_ids(),
    )


def steering_spec(
    safety: SafetyOptions | None,
    settings: Settings,
    vectors: Mapping[str, str],
    default_vector: str | None,
) -> SteeringSpec:
    """Resolve strength and vector against server policy; never falls back to unsteered output."""
    safety = safety or SafetyOptions()
    strength = settings.default_strength if safety.strength is None else safety.strength
    if not settings.min_strength <= strength <= settings.max_strength:
        raise APIError(
            400,
            f"safety.strength must be between {settings.min_strength:g} and {settings.max_strength:g}, "
            f"got {strength:g}",
            param="safety.strength",
        )
    if safety.compare and settings.min_strength > 0:  # the baseline is strength 0: outside this policy
        raise APIError(
            400,
            "safety.compare returns the unsteered baseline (strength 0), which this server does not serve: "
            f"its minimum safety strength is {settings.min_strength:g}",
            param="safety.compare",
        )
    vector = _resolve_vector(safety.vector, strength, vectors, default_vector)
    return SteeringSpec(strength=strength, vector=vector, compare=safety.compare)


def _resolve_vector(
    requested: str | None, strength: float, vectors: Mapping[str, str], default_vector: str | None
) -> str:
    loaded = ", ".join(sorted(vectors)) or "none"
    if requested is not None:
        if requested not in vectors:
            raise APIError(
                400, f"unknown safety vector {requested!r}; loaded vectors: {loaded}", param="safety.vector"
            )
        return requested
    if strength == 0:  # the vanilla model needs no vector, so this works even with none loaded
        return default_vector or ""
    if not vectors:
        raise APIError(
            400,
            f"no safety vectors are loaded, so strength {strength:g} cannot be applied; "
            "send safety.strength 0 for the unsteered model",
            param="safety",
        )
    if default_vector is None:
        raise APIError(400, f"no default safety vector; choose one of: {loaded}", param="safety.vector")
    return default_vector
