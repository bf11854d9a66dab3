"""Pure unit tests of settings, the error envelope and the wire protocol: no model, no network."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import pytest
from fastapi import FastAPI
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError
from starlette.testclient import TestClient

from server.backends.base import LogprobEntry
from server.errors import (
    APIError,
    error_body,
    install_error_handlers,
    sse_error_line,
    validation_error_to_api_error,
)
from server.protocol import ChatCompletionRequest, CompletionRequest, resolve, sampling_params
from server.responses import (
    SSE_DONE,
    Choice,
    Logprobs,
    ResponseMeta,
    Usage,
    chat_chunk,
    chat_completion_response,
    completion_chunk,
    completion_response,
    final_chunk,
    safety_info,
    sse_line,
)
from server.settings import Settings, SettingsError, add_cli_arguments, settings_from_args
from steer.types import ChatMessage, SamplingParams, SteeringSpec

MSGS = [{"role": "user", "content": "hi"}]
VECTORS = {"refusal": "activation", "enchtable": "weight"}


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": MSGS, **fields}


def param_of(model: type, body: dict[str, Any]) -> str | None:
    """The `param` a request body's validation failure is reported under."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return validation_error_to_api_error(info.value.errors()).param


def resolve_chat(body: dict[str, Any], settings: Settings | None = None, vectors=VECTORS, default="refusal"):
    (gen,), spec = resolve(ChatCompletionRequest.model_validate(body), settings or Settings(), vectors, default)
    return gen, spec


def api_error(fn, *args) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args)
    assert info.value.status_code == 400
    return info.value


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv("STEER_" + name.upper(), raising=False)


# ---------------------------------------------------------------- settings


def test_settings_defaults() -> None:
    s = Settings()
    assert (s.model, s.backend, s.host, s.port) == (None, "transformers", "127.0.0.1", 8000)
    assert (s.min_strength, s.default_strength, s.max_strength) == (0.0, 1.0, 4.0)
    assert (s.max_batch_size, s.max_model_len, s.max_n) == (16, 2048, 4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"default_strength": 5.0},
        {"min_strength": 2.0},
        {"max_strength": 0.5},
        {"min_strength": -1.0},
        {"default_strength": float("nan")},
        {"max_strength": float("inf")},
        {"port": "http"},
        {"port": 70000},
        {"backend": "onnx"},
        {"max_n": 0},
        {"max_model_len": 0},
        {"no_such_setting": 1},
    ],
)
def test_invalid_settings_raise_one_line_settings_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(SettingsError) as info:
        Settings(**kwargs)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value) and str(info.value)


def test_settings_are_frozen_and_hide_the_api_key() -> None:
    s = Settings(api_key="sekrit")
    with pytest.raises(ValidationError):
        s.port = 1  # type: ignore[misc]
    assert "sekrit" not in repr(s)


def test_env_then_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEER_PORT", "9001")
    monkeypatch.setenv("STEER_MAX_STRENGTH", "2.5")
    monkeypatch.setenv("STEER_BACKEND", "vllm")
    monkeypatch.setenv("STEER_API_KEY", "")  # empty = unset
    s = Settings.from_env(port=9002, host=None)
    assert (s.port, s.max_strength, s.backend, s.host, s.api_key) == (9002, 2.5, "vllm", "127.0.0.1", None)


def test_invalid_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEER_DEFAULT_STRENGTH", "lots")
    with pytest.raises(SettingsError, match="STEER_DEFAULT_STRENGTH"):
        Settings.from_env()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    return parser


def test_cli_flags_cover_every_field_and_default_to_none() -> None:
    ns = _parser().parse_args([])
    assert all(getattr(ns, name) is None for name in Settings.model_fields)
    help_text = _parser().format_help()
    for flag in ("--default-strength", "--max-batch-size", "--served-model-name", "--api-key"):
        assert flag in help_text
    assert "Highest safety strength" in help_text


def test_cli_wins_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEER_PORT", "9001")
    monkeypatch.setenv("STEER_HOST", "0.0.0.0")
    args = ["--port", "9100", "--backend", "vllm", "--default-strength", "0", "--max-n", "2"]
    s = settings_from_args(_parser().parse_args(args))
    assert (s.port, s.host, s.backend, s.default_strength, s.max_n) == (9100, "0.0.0.0", "vllm", 0.0, 2)


def test_cli_rejects_unknown_backend() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--backend", "onnx"])


def test_cli_invalid_range_is_settings_error() -> None:
    with pytest.raises(SettingsError, match="default_strength"):
        settings_from_args(_parser().parse_args(["--default-strength", "9"]))


# ---------------------------------------------------------------- request validation


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [*MSGS, {"content": "x"}]}, "messages.1.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content",
        ),
        (
            {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]},
            "messages.0.tool_calls",
        ),
        (chat(safety={"strenght": 1.0}), "safety.strenght"),
        (chat(safety={"strength": "1.5"}), "safety.strength"),
        (chat(safety={"strength": True}), "safety.strength"),
        (chat(safety={"strength": float("nan")}), "safety.strength"),
        (chat(safety={"strength": float("inf")}), "safety.strength"),
        (chat(safety={"strength": -0.5}), "safety.strength"),
        (chat(safety={"vector": 3}), "safety.vector"),
        (chat(safety={"compare": "yes"}), "safety.compare"),
        (chat(safety={"compare": 1}), "safety.compare"),
        (chat(safety="strong"), "safety"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_tokens="10"), "max_tokens"),
        (chat(max_completion_tokens=0), "max_completion_tokens"),
        (chat(temperature=2.5), "temperature"),
        (chat(temperature=-0.1), "temperature"),
        (chat(temperature=float("nan")), "temperature"),
        (chat(top_p=0), "top_p"),
        (chat(top_p=1.5), "top_p"),
        (chat(n=0), "n"),
        (chat(n=1.5), "n"),
        (chat(seed="7"), "seed"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat(stop=[1]), "stop"),
        (chat(stop=""), "stop"),
        (chat(stream="yes"), "stream"),
        (chat(stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    ],
)
def test_bad_chat_requests_name_the_param(body: dict[str, Any], param: str) -> None:
    assert param_of(ChatCompletionRequest, body) == param


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "required"),
        ("functions", [{"name": "f"}]),
        ("function_call", {"name": "f"}),
        ("response_format", {"type": "json_object"}),
    ],
)
def test_unsupported_chat_features_are_rejected(field: str, value: Any) -> None:
    assert param_of(ChatCompletionRequest, chat(**{field: value})) == field


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(logprobs="yes"), "logprobs"),
        (chat(logprobs=1), "logprobs"),
        (chat(top_logprobs=3), "top_logprobs"),  # without logprobs: true (OpenAI)
        (chat(logprobs=False, top_logprobs=1), "top_logprobs"),
        (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
        (chat(logprobs=True, top_logprobs=-1), "top_logprobs"),
    ],
)
def test_bad_logprobs_name_the_param(body: dict[str, Any], param: str) -> None:
    assert param_of(ChatCompletionRequest, body) == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(presence_penalty=2.5), "presence_penalty"),
        (chat(frequency_penalty=-3), "frequency_penalty"),
        (chat(frequency_penalty="1"), "frequency_penalty"),
        (chat(repetition_penalty=0), "repetition_penalty"),
        (chat(repetition_penalty=5e-324), "repetition_penalty"),  # subnormal: logit / it overflows
        (chat(logit_bias={"x": 1}), "logit_bias"),
        (chat(logit_bias={"-1": 1}), "logit_bias"),
        (chat(logit_bias={"5": 101}), "logit_bias"),
        (chat(logit_bias={"5": True}), "logit_bias"),
        (chat(logit_bias={"5": "1"}), "logit_bias"),
        (chat(logit_bias=[1]), "logit_bias"),
        (chat(logit_bias={str(i): 1 for i in range(1025)}), "logit_bias"),
    ],
)
def test_bad_penalties_and_biases_name_the_param(body: dict[str, Any], param: str) -> None:
    assert param_of(ChatCompletionRequest, body) == param


def test_penalties_and_biases_reach_the_sampling_params() -> None:
    body = chat(presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.2, logit_bias={"7": -100, "3": 2.5})
    p = sampling_params(ChatCompletionRequest.model_validate(body), Settings())
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -1.0, 1.2)
    assert p.logit_bias == ((3, 2.5), (7, -100.0)) and p.adjusts_logits
    assert not sampling_params(ChatCompletionRequest.model_validate(chat(logit_bias={})), Settings()).adjusts_logits


@pytest.mark.parametrize(
    ("body", "k"),
    [(chat(), None), (chat(logprobs=False), None), (chat(logprobs=False, top_logprobs=0), None),
     (chat(logprobs=True), 0), (chat(logprobs=True, top_logprobs=20), 20)],
)
def test_chat_logprobs_reach_the_sampling_params(body: dict[str, Any], k: int | None) -> None:
    assert sampling_params(ChatCompletionRequest.model_validate(body), Settings()).logprobs == k


@pytest.mark.parametrize("k", [None, 0, 5, 20])
def test_completion_logprobs_reach_the_sampling_params(k: int | None) -> None:
    req = CompletionRequest.model_validate({"prompt": "x", "logprobs": k})
    assert sampling_params(req, Settings()).logprobs == k


def test_neutral_and_unknown_fields_are_accepted() -> None:
    req = ChatCompletionRequest.model_validate(
        chat(
            frequency_penalty=0,
            presence_penalty=0.0,
            logit_bias={},
            logprobs=False,
            tools=[],
            tool_choice="none",
            response_format={"type": "text"},
            parallel_tool_calls=False,
            metadata={"a": "b"},
            some_future_field=1,
        )
    )
    assert req.messages[0].content == "hi"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", ""]}, "prompt"),
        ({"prompt": [1, True]}, "prompt"),
        ({"prompt": [[1], [2, -1]]}, "prompt"),
        ({"prompt": [[1], []]}, "prompt"),
        ({"prompt": [1.5]}, "prompt"),
        ({"prompt": ["a", [1]]}, "prompt"),
        ({"prompt": ["a"] * 257}, "prompt"),
        ({"prompt": {"text": "a"}}, "prompt"),
        ({"prompt": "x", "echo": 1}, "echo"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "suffix": "end"}, "suffix"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "logprobs": True}, "logprobs"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "safety": {"strength": "2"}}, "safety.strength"),
    ],
)
def test_bad_completion_requests_name_the_param(body: dict[str, Any], param: str) -> None:
    assert param_of(CompletionRequest, body) == param


@pytest.mark.parametrize(("prompt", "want"), [
    ("a", ("a",)),
    (["a", "b"], ("a", "b")),
    ([1, 2, 3], ((1, 2, 3),)),
    ([[1, 2], [3]], ((1, 2), (3,))),
    (["a"] * 256, ("a",) * 256),
])
def test_every_prompt_shape_of_openai_and_vllm_is_one_input_per_prompt(prompt: Any, want: tuple) -> None:
    """A string, a batch of strings, token ids, a batch of token-id lists: one engine input each, in order,
    all with the request's sampling; echo with logprobs asks for the prompt's logprobs too."""
    req = CompletionRequest.model_validate({"prompt": prompt, "echo": True, "logprobs": 2, "n": 2})
    gens, _ = resolve(req, Settings(), VECTORS, "refusal")
    assert tuple(g.prompt if g.prompt is not None else g.prompt_ids for g in gens) == want
    assert {(g.n, g.echo, g.echo_only, g.sampling.logprobs, g.sampling.prompt_logprobs) for g in gens} == {
        (2, True, False, 2, 2)}


def test_max_tokens_zero_is_echo_alone() -> None:
    """max_tokens 0 is the prompt alone (vLLM's way: one token generated and dropped); without echo a 400."""
    gens, _ = resolve(CompletionRequest.model_validate({"prompt": "a", "echo": True, "max_tokens": 0}), Settings(),
                      VECTORS, "refusal")
    assert gens[0].echo_only and gens[0].sampling.max_tokens == 1 and gens[0].sampling.prompt_logprobs is None
    with pytest.raises(APIError) as info:
        resolve(CompletionRequest.model_validate({"prompt": "a", "max_tokens": 0}), Settings(), VECTORS, "refusal")
    assert info.value.param == "max_tokens" and "0 only with echo" in info.value.message
    echo_off = resolve(CompletionRequest.model_validate({"prompt": "a", "logprobs": 1}), Settings(), VECTORS,
                       "refusal")[0][0]
    assert not echo_off.echo and echo_off.sampling.prompt_logprobs is None


# ---------------------------------------------------------------- resolve


def test_resolve_chat_defaults() -> None:
    gen, spec = resolve_chat(chat())
    assert gen.messages == (ChatMessage(role="user", content="hi"),)
    assert gen.prompt is None and gen.n == 1
    assert gen.sampling == SamplingParams(max_tokens=None, temperature=1.0, top_p=1.0, seed=None, stop=())
    assert spec == SteeringSpec(strength=1.0, vector="refusal", compare=False)


def test_resolve_chat_fields() -> None:
    body = chat(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None},
            {"role": "tool", "content": "42"},
        ],
        max_tokens=10,
        max_completion_tokens=20,
        temperature=0,
        top_p=0.5,
        n=3,
        seed=7,
        stop="END",
        safety={"strength": 2, "vector": "enchtable", "compare": True},
    )
    gen, spec = resolve_chat(body)
    assert [m.content for m in gen.messages] == ["be brief", "a\nb", "", "42"]
    assert gen.sampling == SamplingParams(max_tokens=20, temperature=0.0, top_p=0.5, seed=7, stop=("END",))
    assert gen.sampling.greedy and gen.n == 3
    assert spec == SteeringSpec(strength=2.0, vector="enchtable", compare=True)


def test_resolve_completion() -> None:
    req = CompletionRequest.model_validate({"prompt": ["Once upon"], "max_tokens": 5, "stop": ["\n", "."]})
    (gen,), spec = resolve(req, Settings(default_strength=0.5), VECTORS, "refusal")
    assert gen.prompt == "Once upon" and gen.messages is None
    assert gen.sampling.max_tokens == 5 and gen.sampling.stop == ("\n", ".")
    assert spec.strength == 0.5


def test_omitted_max_tokens_is_left_to_the_backend() -> None:
    # the backend knows the prompt length: it fills in the rest of the context, as vLLM does
    gen, _ = resolve_chat(chat(), Settings(max_model_len=100))
    assert gen.sampling.max_tokens is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(max_tokens=2049), "max_tokens"),
        (chat(max_completion_tokens=5000), "max_completion_tokens"),
        (chat(n=5), "n"),
        (chat(safety={"strength": 4.5}), "safety.strength"),
        (chat(safety={"vector": "nope"}), "safety.vector"),
        (chat(safety={"vector": "nope", "strength": 0}), "safety.vector"),
    ],
)
def test_resolve_policy_errors(body: dict[str, Any], param: str) -> None:
    assert api_error(resolve_chat, body).param == param


def test_strength_range_error_states_the_range() -> None:
    settings = Settings(min_strength=0.5, max_strength=2.0)
    err = api_error(resolve_chat, chat(safety={"strength": 0.25}), settings)
    assert "0.5" in err.message and "2" in err.message and err.type == "invalid_request_error"


def test_compare_is_refused_where_the_policy_forbids_strength_0() -> None:
    """The compare baseline is the unsteered model: a server whose operator set --min-strength above 0
    must not hand it out through the compare toggle (a client could read the unsafe answer beside the
    safe one)."""
    strict = Settings(min_strength=0.5, max_strength=2.0)
    for safety in ({"compare": True}, {"compare": True, "strength": 1.0}, {"compare": True, "vector": "refusal"}):
        err = api_error(resolve_chat, chat(safety=safety), strict)
        assert err.param == "safety.compare" and "0.5" in err.message and "unsteered" in err.message
    _, spec = resolve_chat(chat(safety={"compare": False, "strength": 1.0}), strict)
    assert spec == SteeringSpec(strength=1.0, vector="refusal", compare=False)
    _, spec = resolve_chat(chat(safety={"compare": True}))  # the default policy (min 0) allows it
    assert spec.compare is True


def test_unknown_vector_lists_the_loaded_ones() -> None:
    err = api_error(resolve_chat, chat(safety={"vector": "refusl"}))
    assert "enchtable" in err.message and "refusal" in err.message


def test_no_vectors_loaded_never_serves_unsteered_silently() -> None:
    assert api_error(resolve_chat, chat(), None, {}, None).param == "safety"
    assert api_error(resolve_chat, chat(safety={"strength": 1}), None, {}, None).param == "safety"
    _, spec = resolve_chat(chat(safety={"strength": 0}), None, {}, None)
    assert spec == SteeringSpec(strength=0.0, vector="", compare=False)


def test_no_default_vector_requires_a_choice() -> None:
    assert api_error(resolve_chat, chat(), None, VECTORS, None).param == "safety.vector"
    _, spec = resolve_chat(chat(safety={"vector": "enchtable"}), None, VECTORS, None)
    assert spec.vector == "enchtable"


def test_strength_zero_keeps_default_vector_name() -> None:
    _, spec = resolve_chat(chat(safety={"strength": 0}))
    assert spec == SteeringSpec(strength=0.0, vector="refusal")


# ---------------------------------------------------------------- response builders

META = ResponseMeta(kind="chat", id="chatcmpl-x", model="demo", created=123)
SAFETY = safety_info(SteeringSpec(strength=1.0, vector="refusal"), "activation")


def test_chat_completion_response_shape() -> None:
    body = chat_completion_response(
        META, [Choice("Hello", "stop"), Choice("Hi", "length")], Usage(5, 3), SAFETY
    )
    assert body["id"] == "chatcmpl-x" and body["object"] == "chat.completion"
    assert body["created"] == 123 and body["model"] == "demo"
    assert body["choices"][1] == {
        "index": 1,
        "message": {"role": "assistant", "content": "Hi"},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert body["safety"] == {"strength": 1.0, "vector": "refusal", "kind": "activation"}
    assert "baseline" not in body
    json.dumps(body)


def test_completion_response_with_baseline() -> None:
    meta = ResponseMeta.new("text", "demo")
    assert meta.id.startswith("cmpl-") and meta.created > 0
    body = completion_response(
        meta,
        [Choice("steered", "stop")],
        Usage(4, 2),
        SAFETY,
        baseline=([Choice("vanilla", "length")], Usage(4, 9)),
    )
    assert body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": "steered", "logprobs": None, "finish_reason": "stop"}]
    assert body["baseline"] == {
        "choices": [{"index": 0, "text": "vanilla", "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 9, "total_tokens": 13},
    }


def test_chunks_and_final_chunk() -> None:
    first = chat_chunk(META, 0, role="assistant", content="")
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert chat_chunk(META, 1, finish_reason="stop")["choices"][0]["delta"] == {}
    text = completion_chunk(ResponseMeta("text", "cmpl-y", "demo", 1), 2, text="ab")
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "ab"
    last = final_chunk(META, Usage(1, 2), SAFETY, baseline=([Choice("b", "stop")], Usage(1, 1)))
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 3
    assert last["safety"] == SAFETY and last["baseline"]["choices"][0]["message"]["content"] == "b"
    assert final_chunk(META, None, SAFETY)["usage"] is None


def test_sse_framing() -> None:
    line = sse_line({"a": 1})
    assert line == 'data: {"a": 1}\n\n' and SSE_DONE == "data: [DONE]\n\n"
    err = APIError(500, "boom", type="server_error")
    # a 5xx quotes the request id (none is set outside a request)
    assert json.loads(sse_error_line(err).removeprefix("data: ")) == error_body(
        "boom (request id unknown)", type="server_error")
    assert sse_error_line(err).endswith("\n\n")


def test_safety_info_without_vector() -> None:
    assert safety_info(SteeringSpec(strength=0.0, vector=""), None) == {
        "strength": 0.0,
        "vector": None,
        "kind": None,
    }


# ---------------------------------------------------------------- app-level error envelope


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    def chat_endpoint(req: ChatCompletionRequest) -> dict[str, Any]:
        (gen,), spec = resolve(req, Settings(), VECTORS, "refusal")
        return {"strength": spec.strength, "n": gen.n}

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    @app.get("/teapot")
    def teapot() -> None:
        raise APIError(418, "short and stout", type="teapot_error", code="tea", headers={"X-Tea": "1"})

    return TestClient(app, raise_server_exceptions=False)


def assert_envelope(resp, status: int, param: str | None) -> dict[str, Any]:
    assert resp.status_code == status
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and isinstance(err["message"], str) and err["message"]
    return err


def test_app_valid_request(client: TestClient) -> None:
    resp = client.post("/v1/chat/completions", json=chat(safety={"strength": 2}))
    assert resp.status_code == 200 and resp.json() == {"strength": 2.0, "n": 1}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(safety={"strength": "1.5"}), "safety.strength"),
        (chat(safety={"strenght": 1}), "safety.strenght"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({}, "messages"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(top_logprobs=2), "top_logprobs"),
    ],
)
def test_app_validation_failure_is_400_envelope(client: TestClient, body: dict[str, Any], param: str) -> None:
    err = assert_envelope(client.post("/v1/chat/completions", json=body), 400, param)
    assert err["type"] == "invalid_request_error" and param in err["message"]


def test_app_policy_error_is_400_envelope(client: TestClient) -> None:
    assert_envelope(
        client.post("/v1/chat/completions", json=chat(safety={"strength": 9})), 400, "safety.strength"
    )


def test_app_nan_literal_is_rejected(client: TestClient) -> None:
    # Python's json module (which FastAPI uses) accepts the NaN and Infinity literals.
    for literal in ("NaN", "Infinity", "-Infinity"):
        body = '{"messages": [{"role": "user", "content": "hi"}], "safety": {"strength": LIT}}'.replace(
            "LIT", literal
        )
        resp = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert_envelope(resp, 400, "safety.strength")
    assert not math.isfinite(json.loads("NaN"))


def test_app_malformed_json(client: TestClient) -> None:
    resp = client.post(
        "/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}
    )
    assert assert_envelope(resp, 400, None)["message"] == "request body is not valid JSON"


def test_app_non_object_and_missing_body(client: TestClient) -> None:
    assert_envelope(client.post("/v1/chat/completions", json=[1, 2]), 400, None)
    assert_envelope(client.post("/v1/chat/completions"), 400, None)


def test_app_unknown_route_and_method(client: TestClient) -> None:
    err = assert_envelope(client.get("/v1/nope"), 404, None)
    assert "/v1/nope" in err["message"]
    assert_envelope(client.get("/v1/chat/completions"), 405, None)


def test_app_api_error_keeps_status_type_code_headers(client: TestClient) -> None:
    resp = client.get("/teapot")
    assert resp.json() == {
        "error": {"message": "short and stout", "type": "teapot_error", "param": None, "code": "tea"}
    }
    assert resp.status_code == 418 and resp.headers["x-tea"] == "1"


def test_app_unexpected_error_is_500_without_traceback(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    resp = client.get("/boom")
    err = assert_envelope(resp, 500, None)
    assert err["message"].startswith("internal error (request id ") and "secret" not in resp.text
    assert any(r.exc_info and "secret internals" in str(r.exc_info[1]) for r in caplog.records)


# ---------------------------------------------------------------- logprobs rendering


def _logprobs(chunks: list[bytes]) -> tuple[str, Logprobs]:
    lp = Logprobs()
    lp.add([LogprobEntry(c.decode("utf-8", errors="replace"), c, -float(i), ((c.decode("utf-8", errors="replace"), c,
                                                                               -float(i)),))
            for i, c in enumerate(chunks)])
    return b"".join(chunks).decode("utf-8", errors="replace"), lp


def test_text_offsets_of_tokens_that_split_characters() -> None:
    # a character split over two tokens starts where its first token does; held bytes that the next token
    # does not continue are one U+FFFD of their own
    assert _logprobs([b"a", b"\xe4\xb8", b"\x96", b"b", b"\xf0\x9f", b"\x99", b"\x82x"])[1].offsets == [0, 1, 1, 2, 3, 3, 3]
    assert _logprobs([b"$", b"\x80", b"{", b"lant", b"\xe4", b"\xc3", b"el"])[1].offsets == [0, 1, 2, 3, 7, 8, 9]


@hypothesis_settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=4) | st.sampled_from([b"a", b" the", "世".encode(), "🙂".encode()]), max_size=12))
def test_text_offsets_point_at_each_whole_token_in_the_text(chunks: list[bytes]) -> None:
    text, lp = _logprobs(chunks)
    assert lp.offsets == sorted(lp.offsets) and all(0 <= o <= len(text) for o in lp.offsets)
    for o, c, e in zip(lp.offsets, chunks, lp.entries, strict=True):
        if "\ufffd" not in e.token and c:  # a token of whole characters, which the text then holds at its offset
            assert text[o : o + len(e.token)] == e.token
    legacy = lp.render("text")
    assert legacy["tokens"] == [e.token for e in lp.entries] and legacy["text_offset"] == lp.offsets
    assert all(top == {e.token: e.logprob} for top, e in zip(legacy["top_logprobs"], lp.entries, strict=True))
    chat = lp.render("chat", 1, 3)
    assert [bytes(x["bytes"]) for x in chat["content"]] == chunks[1:3] and chat["refusal"] is None
