"""Property tests (hypothesis) of the wire protocol: server/protocol.py's request models and ``resolve``,
server/errors.py's ``validation_error_to_api_error`` and server/responses.py's SSE framing. No model.

For any JSON-like body (arbitrary, or a valid body with one field broken: wrong types, NaN/inf, huge
ints, unknown keys inside ``safety``, lone surrogates and other odd unicode, nested junk), either

* validation and ``resolve`` succeed and the engine types satisfy the documented invariants (strength
  within the policy range, a loaded vector whenever one is applied, max_tokens within max_model_len,
  at most 4 non-empty stop strings, 1 <= n <= max_n, every text valid Unicode, ...), or
* the request fails with a 400 whose OpenAI envelope names the field where the body is wrong, and
  which renders to JSON exactly as the app sends it;

and nothing else is ever raised. The bounded settings keep the module well under 30 s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from starlette.testclient import TestClient

from server.errors import APIError, install_error_handlers, validation_error_to_api_error
from server.protocol import MAX_STOP_SEQUENCES, ChatCompletionRequest, CompletionRequest, resolve
from server.responses import SSE_DONE, ResponseMeta, final_chunk, safety_info, sse_line
from server.settings import Settings
from steer.types import ChatMessage, GenerationInput, SteeringSpec

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,  # no .hypothesis/examples in the working tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ROLES = ["system", "user", "assistant", "developer", "tool"]
VECTOR_NAMES = ["refusal", "enchtable", "other"]
POLICY_PARAMS = {"n", "max_tokens", "max_completion_tokens", "safety", "safety.strength", "safety.vector"}
SAFETY_KEYS = {"strength", "vector", "compare"}
Model = type[ChatCompletionRequest] | type[CompletionRequest]

# ---------------------------------------------------------------- strategies: junk

LONE_SURROGATES = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)  # JSON "\ud800"
ODD_TEXT = st.one_of(
    st.text(max_size=20),
    LONE_SURROGATES,
    st.builds(lambda a, s, b: a + s + b, st.text(max_size=5), LONE_SURROGATES, st.text(max_size=5)),
    st.sampled_from(
        ["", " ", "\x00", "\u202e", "\ufeff", "\ufffd", "\U0001f600", "e\u0301", "<|im_end|>",
         "<|im_start|>system\n", "{{ messages }}", "{% raw %}", "null", "NaN", "1.5", "true", "a" * 5000]
    ),
)
HUGE_INTS = st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**30, -(10**30), 10**400])
NUMBERS = st.one_of(
    st.integers(-10, 10),
    st.integers(),
    HUGE_INTS,
    st.floats(),  # NaN and +-inf included: Python's json reads the NaN / Infinity literals
    st.sampled_from([0.0, -0.0, 5e-324, 1e-320, 1e-300, 1e308, -1e308]),
)
SCALARS = st.none() | st.booleans() | NUMBERS | ODD_TEXT
JSON = st.recursive(
    SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(ODD_TEXT, kids, max_size=4), max_leaves=12
)


def _deep(depth: int, kind: str) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


# Deeper than the interpreter's recursion limit: a naive repr() or recursive walk of it would blow up.
DEEP = st.builds(_deep, st.integers(1, 3000), st.sampled_from(["list", "dict"]))
JUNK = JSON | DEEP
# As deep as json.dumps / json.loads go (their recursion is bounded by the same limit).
WIRE_JUNK = JSON | st.builds(_deep, st.integers(1, 800), st.sampled_from(["list", "dict"]))

# ---------------------------------------------------------------- strategies: valid bodies

ANY_MODEL = st.none() | st.text(max_size=10)


def request_bodies(
    *,
    max_tokens: int = 4096,
    max_n: int = 8,
    min_strength: float = 0.0,
    max_strength: float = 8.0,
    vectors: tuple[str, ...] = (*VECTOR_NAMES, "nope"),
    models: st.SearchStrategy[str | None] = ANY_MODEL,
    require_max_tokens: bool = False,
    text_size: int = 30,
) -> st.SearchStrategy[tuple[Model, dict[str, Any]]]:
    """(request model, body) pairs that pass schema validation. The defaults reach past every policy
    limit (for ``resolve``'s errors); bodies for a live server pass its limits, so it must serve them.
    ``require_max_tokens``: always send max_tokens (omitted, a live server fills the whole context).
    Texts are at most ``text_size`` characters (hypothesis' text() never draws surrogates)."""
    text = st.text(max_size=text_size)
    content = text | st.lists(st.builds(lambda t: {"type": "text", "text": t}, text), max_size=3)
    message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": content})
    strength = st.floats(min_strength, max_strength)
    if math.ceil(min_strength) <= max_strength:
        strength |= st.integers(math.ceil(min_strength), math.floor(max_strength))
    safety = st.fixed_dictionaries(
        {},
        optional={
            "strength": st.none() | strength,
            "vector": st.none() | st.sampled_from(vectors) if vectors else st.none(),
            "compare": st.booleans(),
        },
    )
    required = {"max_tokens": st.integers(1, max_tokens)} if require_max_tokens else {}
    shared: dict[str, st.SearchStrategy[Any]] = {
        "model": models,
        "max_tokens": st.none() | st.integers(1, max_tokens),
        "temperature": st.none() | st.floats(0, 2) | st.integers(0, 2),
        "top_p": st.none() | st.floats(0, 1, exclude_min=True),
        "n": st.none() | st.integers(1, max_n),
        "seed": st.none() | st.integers(-(2**63), 2**64 - 1),
        "stop": st.none()
        | st.text(min_size=1, max_size=5)
        | st.lists(st.text(min_size=1, max_size=5), max_size=MAX_STOP_SEQUENCES),
        "stream": st.none() | st.booleans(),
        "ignore_eos": st.booleans(),
        "stream_options": st.none() | st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
        "safety": st.none() | safety,
        "user": st.none() | st.text(max_size=10),
        "presence_penalty": st.none() | st.floats(-2, 2),
        "frequency_penalty": st.none() | st.floats(-2, 2),
        "repetition_penalty": st.none() | st.floats(0.01, 10),
        "logit_bias": st.none() | st.dictionaries(st.integers(0, 300).map(str), st.floats(-100, 100), max_size=4),
    }
    chat_fields = {
        **shared,
        "max_completion_tokens": st.none() | st.integers(1, max_tokens),
        "logprobs": st.sampled_from([None, False, True]),
        "top_logprobs": st.sampled_from([None, 0]),
        "tools": st.sampled_from([None, []]),
        "tool_choice": st.sampled_from([None, "none", "auto"]),
        "functions": st.sampled_from([None, []]),
        "function_call": st.sampled_from([None, "none", "auto"]),
        "response_format": st.sampled_from([None, {"type": "text"}]),
    }
    completion_fields = {
        **shared,
        "echo": st.sampled_from([None, False, True]),
        "suffix": st.none(),
        "logprobs": st.none() | st.integers(0, 20),
        "best_of": st.sampled_from([None, 1]),
    }
    prompt = st.text(min_size=1, max_size=text_size)
    for fields in (chat_fields, completion_fields):
        for name in required:
            del fields[name]
    chat = st.fixed_dictionaries(
        {"messages": st.lists(message, min_size=1, max_size=4), **required}, optional=chat_fields
    )
    ids = st.lists(st.integers(0, 255), min_size=1, max_size=8)  # token ids (the tiny vocabulary has more)
    prompts = prompt | st.lists(prompt, min_size=1, max_size=3) | ids | st.lists(ids, min_size=1, max_size=3)
    completion = st.fixed_dictionaries({"prompt": prompts, **required}, optional=completion_fields)
    return st.tuples(st.just(ChatCompletionRequest), chat) | st.tuples(st.just(CompletionRequest), completion)


BODIES = request_bodies()
FIELDS = sorted(set(ChatCompletionRequest.model_fields) | set(CompletionRequest.model_fields))


@st.composite
def policies(draw) -> tuple[Settings, dict[str, str], str | None]:
    """Server settings, loaded vectors (name -> kind) and the default vector, as ``resolve`` takes them."""
    lo = draw(st.sampled_from([0.0, 0.0, 0.5]))
    hi = draw(st.sampled_from([x for x in (0.0, 0.5, 2.0, 4.0) if x >= lo]))
    default = draw(st.sampled_from(sorted({lo, hi, (lo + hi) / 2})))
    s = Settings(
        min_strength=lo,
        max_strength=hi,
        default_strength=default,
        max_model_len=draw(st.sampled_from([16, 256, 2048])),
        max_n=draw(st.integers(1, 8)),
    )
    vectors = draw(st.dictionaries(st.sampled_from(VECTOR_NAMES), st.sampled_from(["activation", "weight"])))
    default_vector = draw(st.none() | st.sampled_from(sorted(vectors))) if vectors else None
    return s, vectors, default_vector


# ---------------------------------------------------------------- mutations: one field made invalid

_NOT_STR = [3, 1.5, True, [], {}, ["x"]]
_NOT_BOOL = [1, 0, "yes", "true", None, [], 1.0]
_BAD_INT = [0, -1, 1.5, 2.0, "10", True, False, [], {}, float("nan"), float("inf")]
_SHARED_BAD: dict[str, list[Any]] = {
    "model": _NOT_STR[:-1],
    "max_tokens": _BAD_INT,
    "temperature": [-0.1, 2.0001, 3, float("nan"), float("inf"), -float("inf"), "1", True, [], 10**400],
    "top_p": [0, 0.0, -0.0, -1, 1.0001, float("nan"), float("inf"), "0.5", True, {}],
    "n": _BAD_INT,
    "seed": [2**64, -(2**63) - 1, 1.5, "7", True, 10**400, []],
    "stop": ["", [""], ["a", ""], ["s"] * (MAX_STOP_SEQUENCES + 1), [1], [None], {}, 3, True, "\ud800", ["ok", "\udfff"]],
    "stream": ["yes", 1, 0, "true", [], {}],
    "ignore_eos": _NOT_BOOL,
    "stream_options": ["x", 1, [], True],
    "stream_options.include_usage": _NOT_BOOL,
    "safety": ["strong", 1, [], True, 0.5],
    "safety.strength": ["1.5", True, float("nan"), float("inf"), -float("inf"), -0.5, -1, [], {}, 10**400],
    "safety.vector": [3, True, [], {}, 1.5],
    "safety.compare": _NOT_BOOL,
    "user": [3, [], {}],
    "presence_penalty": [2.5, -3, "0", float("nan"), [], {"a": 1}],
    "frequency_penalty": [2.01, float("inf"), True],
    "repetition_penalty": [0, 5e-324, 0.001, -1, 11, "1", float("nan")],
    "logit_bias": [{"x": 1}, {"1": 101}, {"1": "2"}, {"-1": 0}, [1], "x", 1],
}
CHAT_BAD = {
    **_SHARED_BAD,
    "messages": [[], "hi", {}, None, 1, True],
    "messages.*.role": ["bot", "USER", "", 1, None, ["user"]],
    "messages.*.content": [3, 1.5, True, {}, [1], ["x"], [{"type": "image_url", "image_url": {}}],
                           [{"type": "text"}], [{"type": "text", "text": 3}], "\ud800", "ok \udfff",
                           [{"type": "text", "text": "\ud83d"}]],
    "messages.*.tool_calls": [[{"id": "1"}], [1]],
    "max_completion_tokens": _BAD_INT,
    "logprobs": [1, 0, "yes", "true"],
    "top_logprobs": [21, -1, "0", 1.5, True],
    "tools": [[{"type": "function", "function": {"name": "f"}}], "x", 1],
    "tool_choice": ["required", {"type": "function"}, 1],
    "functions": [[{"name": "f"}], 1],
    "function_call": [{"name": "f"}, "f"],
    "response_format": [{"type": "json_object"}, "text", 1],
}
COMPLETION_BAD = {
    **_SHARED_BAD,
    # 0 is the prompt alone with echo, a policy 400 without it (tests/test_protocol.py covers both)
    "max_tokens": [v for v in _BAD_INT if not (type(v) is int and v == 0)],
    "prompt": ["", [], [""], ["a", ""], [[]], [-1], [1, True], [[1], ["a"]], ["a", [1]], [1.5], ["a"] * 257, 1, None,
               {}, True, "\ud800", ["x\udc00"]],
    "echo": [1, "yes"],
    "suffix": ["", "end", 1],
    "logprobs": [True, False, 21, -1, "2", 1.5],
    "best_of": [2, 0, "1"],
}


def break_field(body: dict[str, Any], path: str, value: Any) -> str:
    """Set ``path`` (dots; ``*`` = the last message) in ``body`` to ``value``; returns the concrete path."""
    parts = path.split(".")
    if parts[0] == "messages" and len(parts) == 3:
        i = len(body["messages"]) - 1
        parts[1] = str(i)
        body["messages"][i][parts[2]] = value
    elif len(parts) == 2:
        parent = body.get(parts[0])
        if not isinstance(parent, dict):
            parent = body[parts[0]] = {}
        parent[parts[1]] = value
    else:
        body[path] = value
    return ".".join(parts)


@st.composite
def broken_bodies(draw, bodies: st.SearchStrategy[tuple[Model, dict[str, Any]]] = BODIES):
    """(model, body, path): a valid body with the one field at ``path`` made invalid."""
    model, body = draw(bodies)
    bad = CHAT_BAD if model is ChatCompletionRequest else COMPLETION_BAD
    path = draw(st.sampled_from(sorted(bad)), label="field")
    value = draw(st.sampled_from(bad[path]), label="value")
    return model, body, break_field(body, path, value)


# ---------------------------------------------------------------- the oracle


def _text_ok(s: Any) -> bool:
    """A str the tokenizer can encode (no lone surrogates)."""
    if not isinstance(s, str):
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _loc_in_body(body: Any, loc: tuple[Any, ...], error_type: str) -> bool:
    """``loc`` is a real place in the body: every step exists, except a last one reported missing."""
    node = body
    for i, key in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            node = node[key]
        else:
            return last and error_type == "missing" and isinstance(node, dict)
    return True


def assert_envelope(err: APIError) -> dict[str, Any]:
    """A 400 in the OpenAI envelope that renders exactly as starlette's JSONResponse does."""
    assert isinstance(err, APIError) and err.status_code == 400
    body = err.body()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(err.message, str) and err.message
    assert err.type == "invalid_request_error" and err.code is None
    assert err.param is None or (isinstance(err.param, str) and err.param)
    json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")  # starlette's JSONResponse.render
    return body


def validation_failure(model: Model, body: Any, exc: ValidationError) -> APIError:
    """Checks a validation failure's mapping to the envelope; returns the APIError."""
    errors = exc.errors()
    assert errors
    err = validation_error_to_api_error(errors)
    assert_envelope(err)
    loc = tuple(errors[0]["loc"])
    if not isinstance(body, dict):
        assert err.param is None, (body, err.param)  # the body itself is wrong, not a field of it
        return err
    assert err.param == ".".join(str(p) for p in loc)
    assert loc and loc[0] in model.model_fields, loc  # never a union branch name or a stray key
    assert _loc_in_body(body, loc, errors[0]["type"]), (loc, errors[0]["type"])
    return err


def check_resolved(model: Model, body: dict, policy, gens: tuple[GenerationInput, ...], spec: SteeringSpec) -> None:
    """The documented invariants of the engine types ``resolve`` hands to a backend: one input per prompt."""
    prompts = body.get("prompt")
    if model is ChatCompletionRequest or isinstance(prompts, str) or isinstance(prompts[0], int):
        prompts = [prompts]
    assert isinstance(gens, tuple) and len(gens) == len(prompts)
    for gen, prompt in zip(gens, prompts, strict=True):
        check_one(model, body, policy, gen, spec, prompt)


def check_one(model: Model, body: dict, policy, gen: GenerationInput, spec: SteeringSpec, prompt: Any) -> None:
    s, vectors, default_vector = policy
    assert isinstance(gen, GenerationInput) and isinstance(spec, SteeringSpec)
    # steering: within policy, a loaded vector whenever it is applied, never silently unsteered
    assert isinstance(spec.strength, float) and math.isfinite(spec.strength)
    assert s.min_strength <= spec.strength <= s.max_strength
    safety = body.get("safety") or {}
    asked = safety.get("strength")
    assert spec.strength == (s.default_strength if asked is None else asked)
    if spec.strength > 0 or safety.get("vector") is not None:
        assert spec.vector in vectors
    else:
        assert spec.vector == (default_vector or "")
    if safety.get("vector") is not None:
        assert spec.vector == safety["vector"]
    assert spec.compare is bool(safety.get("compare", False))
    assert not spec.compare or s.min_strength == 0  # a compare baseline is strength 0: only where policy allows it
    # sampling
    p = gen.sampling
    assert type(gen.n) is int and 1 <= gen.n <= s.max_n
    assert p.max_tokens is None or (type(p.max_tokens) is int and 1 <= p.max_tokens <= s.max_model_len)
    asked_max = body.get("max_completion_tokens") if model is ChatCompletionRequest else None
    assert p.max_tokens == (asked_max if asked_max is not None else body.get("max_tokens"))
    assert math.isfinite(p.temperature) and 0 <= p.temperature <= 2
    assert math.isfinite(p.top_p) and 0 < p.top_p <= 1
    assert p.seed is None or (type(p.seed) is int and -(2**63) <= p.seed < 2**64)
    assert isinstance(p.stop, tuple) and len(p.stop) <= MAX_STOP_SEQUENCES
    assert all(isinstance(x, str) and x and _text_ok(x) for x in p.stop)
    assert type(p.ignore_eos) is bool
    assert p.presence_penalty == (body.get("presence_penalty") or 0.0)
    assert p.frequency_penalty == (body.get("frequency_penalty") or 0.0)
    assert p.repetition_penalty == (1.0 if body.get("repetition_penalty") is None else body["repetition_penalty"])
    assert dict(p.logit_bias) == {int(k): v for k, v in (body.get("logit_bias") or {}).items()}
    if model is ChatCompletionRequest:
        assert p.logprobs == ((body.get("top_logprobs") or 0) if body.get("logprobs") else None)
    else:
        assert p.logprobs == body.get("logprobs")
    # the prompt: exactly one of messages / prompt, all of it valid Unicode for the tokenizer
    if model is ChatCompletionRequest:
        assert gen.prompt is None and gen.messages and len(gen.messages) == len(body["messages"])
        for m in gen.messages:
            assert isinstance(m, ChatMessage) and m.role in ROLES and _text_ok(m.content)
    elif isinstance(prompt, str):
        assert gen.messages is None and gen.prompt_ids is None and _text_ok(gen.prompt) and gen.prompt == prompt
    else:
        assert gen.messages is None and gen.prompt is None and gen.prompt_ids == tuple(prompt) and prompt
        assert all(type(t) is int and t >= 0 for t in gen.prompt_ids)
    if model is CompletionRequest:
        assert gen.echo is bool(body.get("echo")) and not gen.echo_only
        assert p.prompt_logprobs == (p.logprobs if gen.echo else None)


def expected_policy_param(model: Model, body: dict, policy) -> str | None:
    """The README's policy for a schema-valid body: which param a 400 names, or None if served."""
    s, vectors, default_vector = policy
    if (body.get("n") or 1) > s.max_n:
        return "n"
    max_tokens = body.get("max_completion_tokens") if model is ChatCompletionRequest else None
    param = "max_completion_tokens" if max_tokens is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None and max_tokens > s.max_model_len:
        return param
    safety = body.get("safety") or {}
    strength = s.default_strength if safety.get("strength") is None else safety["strength"]
    if not s.min_strength <= strength <= s.max_strength:
        return "safety.strength"
    if safety.get("compare") and s.min_strength > 0:  # the baseline (strength 0) is outside the policy
        return "safety.compare"
    if safety.get("vector") is not None:
        return None if safety["vector"] in vectors else "safety.vector"
    if strength == 0:
        return None
    if not vectors:
        return "safety"
    return None if default_vector is not None else "safety.vector"


def outcome(model: Model, body: Any, policy) -> tuple[str, str | None]:
    """("ok", None), ("invalid", param) or ("policy", param); any other exception fails the test."""
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        return "invalid", validation_failure(model, body, exc).param
    try:
        gens, spec = resolve(req, *policy)
    except APIError as err:
        assert_envelope(err)
        assert err.param in POLICY_PARAMS, err.param
        return "policy", err.param
    check_resolved(model, body, policy, gens, spec)
    return "ok", None


# ---------------------------------------------------------------- properties


@FUZZ
@given(BODIES, policies())
def test_valid_bodies_validate_and_resolve_by_the_documented_policy(model_body, policy) -> None:
    model, body = model_body
    kind, param = outcome(model, body, policy)
    assert kind != "invalid", param
    assert param == expected_policy_param(model, body, policy)


@FUZZ
@given(broken_bodies(), policies())
def test_one_broken_field_is_a_400_naming_that_field(broken, policy) -> None:
    model, body, path = broken
    assert outcome(model, body, policy) == ("invalid", path)


@FUZZ
@given(BODIES, policies(), st.data())
def test_unknown_safety_keys_fail_loudly(model_body, policy, data) -> None:
    model, body = model_body
    key = data.draw(ODD_TEXT.filter(lambda k: k not in SAFETY_KEYS), label="key")
    value = data.draw(JUNK, label="value")
    body["safety"] = {**(body.get("safety") or {}), key: value}
    kind, param = outcome(model, body, policy)
    assert kind == "invalid"
    # a key that is not valid Unicode cannot be named back; pydantic then reports the whole object
    assert param == (f"safety.{key}" if _text_ok(key) else "safety")


@FUZZ
@given(BODIES, policies(), st.dictionaries(ODD_TEXT, JUNK, min_size=1, max_size=3))
def test_unknown_top_level_fields_are_ignored(model_body, policy, extras) -> None:
    model, body = model_body
    extras = {k: v for k, v in extras.items() if k not in model.model_fields}
    assert outcome(model, {**body, **extras}, policy) == outcome(model, body, policy)


@FUZZ
@given(st.sampled_from([ChatCompletionRequest, CompletionRequest]), JUNK, policies())
def test_arbitrary_json_is_served_or_a_400(model: Model, body: Any, policy) -> None:
    outcome(model, body, policy)


@FUZZ
@given(
    BODIES,
    policies(),
    st.dictionaries(st.sampled_from(FIELDS), JUNK, min_size=1, max_size=4),
)
def test_known_fields_with_junk_are_served_or_a_400(model_body, policy, junk) -> None:
    model, body = model_body
    outcome(model, {**body, **junk}, policy)


ERROR_DICTS = st.fixed_dictionaries(
    {},
    optional={
        # loc keys from pydantic are the models' field names or indices; never a lone surrogate (a key that
        # is not valid Unicode fails pydantic's string parsing first, see test_unknown_safety_keys_fail_loudly)
        "loc": st.lists(st.sampled_from(["body", "query", "header"]) | st.text(max_size=8) | st.integers(0, 9),
                        max_size=4).map(tuple),
        "type": st.sampled_from(["missing", "extra_forbidden", "json_invalid", "value_error", "int_type"])
        | st.text(max_size=8),
        "msg": st.text(max_size=30) | st.just("Value error, boom"),
        "input": JSON | st.binary(max_size=8),
    },
)


@FUZZ
@given(st.lists(ERROR_DICTS, max_size=4))
def test_any_validation_error_list_maps_to_one_envelope(errors: list[dict[str, Any]]) -> None:
    err = validation_error_to_api_error(errors)
    assert_envelope(err)
    if errors and errors[0].get("type") != "json_invalid":
        parts = [p for p in errors[0].get("loc", ())]
        if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
            parts = parts[1:]
        assert err.param == (".".join(str(p) for p in parts) or None)
        if len(errors) > 1:
            assert err.message.endswith((" more error)", " more errors)"))


@FUZZ
@given(
    st.text() | st.sampled_from(["\n\n", "\r\n", "\r", "\u2028", "data: [DONE]\n\n", "\ndata: x\n\n", "\x00"]),
    st.floats(0, 4),
    st.sampled_from(["chat", "text"]),
)
def test_sse_framing_survives_any_text(text: str, strength: float, kind: str) -> None:
    """Any generated text (newlines, "data:", "[DONE]", control characters) stays inside one SSE event."""
    meta = ResponseMeta.new(kind, "m")  # type: ignore[arg-type]
    spec = SteeringSpec(strength=strength, vector="refusal")
    line = sse_line({"text": text, **final_chunk(meta, None, safety_info(spec, "activation"))})
    assert line.startswith("data: ") and line.endswith("\n\n") and line.count("\n") == 2
    assert line != SSE_DONE and json.loads(line[len("data: "):])["text"] == text


# ---------------------------------------------------------------- regressions found by the properties above

MSGS = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        (CompletionRequest, {"prompt": "\ud800"}, "prompt"),
        (CompletionRequest, {"prompt": ["ok \udfff"]}, "prompt"),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
        (
            ChatCompletionRequest,
            {"messages": [*MSGS, {"role": "user", "content": [{"type": "text", "text": "a\ud83d"}]}]},
            "messages.1.content",
        ),
        (ChatCompletionRequest, {"messages": MSGS, "stop": ["ok", "\udfff"]}, "stop"),
    ],
)
def test_text_that_is_not_valid_unicode_is_a_400(model: Model, body: dict, param: str) -> None:
    """JSON's \\ud800 escape decodes to a lone surrogate, which the tokenizer cannot encode: it was a 500
    from /v1/completions (and a 400 quoting a tokenizer TypeError from chat)."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    err = validation_error_to_api_error(info.value.errors())
    assert err.param == param and "lone surrogate" in err.message
    assert_envelope(err)


def test_an_escaped_surrogate_pair_is_one_valid_character() -> None:
    body = json.loads('{"prompt": "smile \\ud83d\\ude00"}')
    assert CompletionRequest.model_validate(body).prompt == "smile \U0001f600"


@pytest.mark.parametrize("field", ["frequency_penalty", "tools", "response_format", "logit_bias"])
@pytest.mark.parametrize(
    "value",
    [_deep(5000, "list"), _deep(5000, "dict"), ["x" * 1_000_000], {"k": "v" * 10**6}],
    ids=["deep-list", "deep-dict", "1MB-list", "1MB-dict"],
)
def test_an_unsupported_value_is_quoted_short(field: str, value: Any) -> None:
    """The 'not supported' message quotes the value bounded: a 5000-deep value made repr() raise
    RecursionError (not a validation error: a 500), and a 1 MB value came back whole."""
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"messages": MSGS, field: value})
    err = validation_error_to_api_error(info.value.errors())
    assert err.param == field and len(err.message) < 300
    assert_envelope(err)


# ---------------------------------------------------------------- the same through the app's error handlers


@pytest.fixture(scope="module")
def stub() -> Iterator[TestClient]:
    """The real request models, resolve and error handlers in an app whose 'backend' echoes the
    resolved engine input: what the wire sends (NaN literals, \\ud800 escapes) as the app sees it."""
    app = FastAPI()
    install_error_handlers(app)
    policy = (Settings(max_strength=4.0), {"refusal": "activation"}, "refusal")

    def echo(req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
        gens, spec = resolve(req, *policy)
        texts = [m.content for g in gens for m in g.messages or ()] + [g.prompt or "" for g in gens]
        return {"texts": texts + list(gens[0].sampling.stop), "strength": spec.strength, "n": gens[0].n}

    @app.post("/v1/chat/completions")
    def chat_endpoint(req: ChatCompletionRequest) -> dict[str, Any]:
        return echo(req)

    @app.post("/v1/completions")
    def completions_endpoint(req: CompletionRequest) -> dict[str, Any]:
        return echo(req)

    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@settings(FUZZ, max_examples=150)
@given(
    st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
    BODIES | WIRE_JUNK,
    st.dictionaries(
        st.sampled_from(["safety", "stop", "temperature", "prompt", "messages", "n"]), WIRE_JUNK, max_size=2
    ),
)
def test_http_bodies_get_200_or_a_400_envelope(stub: TestClient, path: str, body: Any, junk: dict) -> None:
    if isinstance(body, tuple):
        body = {**body[1], **junk}
    raw = json.dumps(body)  # ensure_ascii: lone surrogates travel as \ud800 escapes, NaN as NaN
    resp = stub.post(path, content=raw, headers={"content-type": "application/json"})
    assert resp.status_code in (200, 400), resp.text
    payload = resp.json()
    if resp.status_code == 400:
        assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}
        assert payload["error"]["type"] == "invalid_request_error"
    else:
        assert all(_text_ok(t) for t in payload["texts"])
