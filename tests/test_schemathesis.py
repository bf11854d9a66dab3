"""Schema-driven fuzzing (schemathesis) of the real app: the server's own /openapi.json, served by a real
uvicorn server on the tiny random model (conftest's ``api`` fixture), every operation, positive and
negative generation. Every request goes through the real app, error handlers and backend.

The checks: no 5xx ever (schemathesis' ``not_a_server_error``); every 4xx is the OpenAI error envelope;
a 200 stream is well-formed SSE ending in [DONE] with no in-band server error; and every response
arrives in full within REQUEST_TIMEOUT (no hangs). Small on purpose (a few hundred requests); the big
run is bench/fuzz.py.

Cost control: a body that sends neither max_tokens nor max_completion_tokens gets ``max_tokens:
MAX_TOKENS`` added before it is sent (omitted, the server would fill the tiny model's whole 256-token
context); everything else is sent as generated.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from api_utils import (
    API_KEY,
    DEFAULT_STRENGTH,
    MAX_N,
    MAX_STRENGTH,
    MAX_TOKENS,
    MODEL,
    Served,
    assert_alive,
    msgs,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from test_fuzz_protocol import broken_bodies, request_bodies

from server.protocol import ChatCompletionRequest, CompletionRequest

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

REQUEST_TIMEOUT = 30.0  # seconds for one whole response; longer is a hang
STREAM_EVENTS = 100_000  # more than any stream within the context (n <= MAX_N rows x the context's tokens)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Examples per operation and generation mode; operations without parameters have one request only.
EXAMPLES = {"/v1/chat/completions": 90, "/v1/completions": 60}
OPERATIONS = {
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("GET", "/v1/safety/vectors"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
}
ERROR_KEYS = {"message", "type", "param", "code"}


def _is_stream(response: schemathesis.Response) -> bool:
    return response.headers.get("content-type", [""])[0].startswith("text/event-stream")  # header -> values


def _in_band_error(response: schemathesis.Response) -> bool:
    """A 200 stream that reports a failure in an SSE event."""
    return response.status_code == 200 and _is_stream(response) and '"error": {' in response.text


def error_envelope(ctx, response, case) -> None:
    """A schemathesis check: 4xx bodies are the OpenAI envelope; 200 streams are well-formed SSE."""
    status = response.status_code
    if 400 <= status < 600:
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"error"}, body
        err = body["error"]
        assert isinstance(err, dict) and set(err) == ERROR_KEYS, err
        assert isinstance(err["message"], str) and err["message"], err
        assert isinstance(err["type"], str) and err["type"], err
        assert status != 400 or err["type"] == "invalid_request_error", err
        assert err["param"] is None or (isinstance(err["param"], str) and err["param"]), err
        assert "Traceback" not in err["message"], err
    elif status == 200 and _is_stream(response):
        assert not response.stream_cut_short, "the client stopped reading the stream (over STREAM_EVENTS or the timeout)"
        events = [line[len("data: "):] for line in response.text.split("\n\n") if line]
        assert events and events[-1] == "[DONE]", events[-3:]
        for ev in events[:-1]:
            payload = json.loads(ev)
            assert "error" not in payload, payload  # an in-band error after the 200


class Run:
    """Sends generated cases and keeps the tally the assertions and the summary read."""

    def __init__(self, api: Served) -> None:
        self.api = api
        self.session = requests.Session()
        self.statuses: Counter[str] = Counter()
        self.slowest = 0.0

    def send(self, case) -> None:
        body = case.body
        if isinstance(body, dict) and "max_tokens" not in body and "max_completion_tokens" not in body:
            case.body = {**body, "max_tokens": MAX_TOKENS}
        t0 = time.monotonic()
        try:
            resp = case.call(base_url=self.api.srv.base_url, session=self.session, headers=AUTH,
                             timeout=REQUEST_TIMEOUT)
        except requests.Timeout:
            pytest.fail(f"no response within {REQUEST_TIMEOUT:g} s (a hang):\n{case.as_curl_command(headers=AUTH)}")
        elapsed = time.monotonic() - t0
        self.slowest = max(self.slowest, elapsed)
        assert elapsed < REQUEST_TIMEOUT, f"{elapsed:.1f} s for {case.as_curl_command(headers=AUTH)}"
        self.statuses[f"{case.operation.method.upper()} {case.operation.path} {resp.status_code}"] += 1
        case.validate_response(resp, checks=[not_a_server_error, error_envelope], headers=AUTH)


@pytest.fixture(scope="module")
def schema(api: Served):
    loaded = schemathesis.openapi.from_url(f"{api.srv.base_url}/openapi.json")
    # schemathesis stops reading an event stream after 20 events by default (and reports it cut short);
    # read whole streams, so that the check below sees every event and the closing [DONE]
    loaded.config.max_stream_events = STREAM_EVENTS
    return loaded


def test_the_fuzzed_operations_are_all_of_them(schema) -> None:
    ops = {(op.method.upper(), op.path) for op in (r.ok() for r in schema.get_all_operations())}
    assert ops == OPERATIONS  # a new route is fuzzed too: add it here (and to EXAMPLES if it takes input)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_generated_requests_get_no_5xx_and_no_hang(api: Served, schema, mode: GenerationMode) -> None:
    run = Run(api)
    for op in (r.ok() for r in schema.get_all_operations()):
        takes_input = op.path in EXAMPLES
        if mode is GenerationMode.NEGATIVE and not takes_input:
            continue  # nothing to make invalid

        @settings(
            max_examples=EXAMPLES.get(op.path, 1),
            deadline=None,
            database=None,
            phases=[Phase.generate],  # no shrinking against a live server: the failure prints a curl line
            suppress_health_check=list(HealthCheck),
        )
        @given(op.as_strategy(generation_mode=mode))
        def fuzz(case) -> None:
            run.send(case)

        fuzz()
    total = sum(run.statuses.values())
    print(f"\n{mode.value}: {total} requests, slowest {run.slowest:.2f} s, "
          f"statuses {dict(sorted(run.statuses.items()))}")
    assert total >= sum(EXAMPLES.values()) // 2  # the generator really produced requests
    assert_alive(api)


# ---------------------------------------------------------------- the protocol's own strategies, served

SERVED_BODIES = request_bodies(
    max_tokens=MAX_TOKENS,
    max_n=MAX_N,
    max_strength=MAX_STRENGTH,
    vectors=("refusal",),
    models=st.sampled_from([None, MODEL]),
    require_max_tokens=True,
    text_size=12,
)
ENDPOINT = {ChatCompletionRequest: "/v1/chat/completions", CompletionRequest: "/v1/completions"}


def _post(api: Served, path: str, body: Any) -> httpx.Response:
    try:
        return api.http.post(path, content=json.dumps(body), headers={"content-type": "application/json"},
                             timeout=REQUEST_TIMEOUT)
    except httpx.TimeoutException:
        pytest.fail(f"no response within {REQUEST_TIMEOUT:g} s (a hang): POST {path} {json.dumps(body)[:2000]}")


def _too_long(resp: httpx.Response) -> bool:
    """The one 400 a schema-valid body within the limits may get: prompt + max_tokens over the context."""
    return resp.status_code == 400 and "context" in resp.json()["error"]["message"]


@settings(max_examples=80, deadline=None, database=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(SERVED_BODIES)
def test_bodies_within_the_limits_are_served(api: Served, model_body) -> None:
    """Every body the protocol accepts, within this server's limits, is a 200 that echoes the request:
    its strength, n choices, a baseline iff compare, and a stream that ends in [DONE]."""
    model, body = model_body
    resp = _post(api, ENDPOINT[model], body)
    if _too_long(resp):
        return
    assert resp.status_code == 200, resp.text
    safety = body.get("safety") or {}
    prompts = body.get("prompt")  # a batch: n choices per prompt
    batch = len(prompts) if isinstance(prompts, list) and not isinstance(prompts[0], int) else 1
    n = (body.get("n") or 1) * batch
    if body.get("stream"):
        events = [e.removeprefix("data: ") for e in resp.text.split("\n\n") if e]
        assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1]), events[-3:]
        final = json.loads(events[-2])
        assert {c["index"] for e in events[:-2] for c in json.loads(e)["choices"]} <= set(range(n))
    else:
        final = resp.json()
        assert [c["index"] for c in final["choices"]] == list(range(n))
    strength = safety.get("strength")
    assert final["safety"]["strength"] == (DEFAULT_STRENGTH if strength is None else strength)
    assert ("baseline" in final) == bool(safety.get("compare"))


@settings(max_examples=80, deadline=None, database=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(broken_bodies(SERVED_BODIES))
def test_one_broken_field_is_a_400_naming_it_over_http(api: Served, broken) -> None:
    model, body, path = broken
    resp = _post(api, ENDPOINT[model], body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert set(err) == ERROR_KEYS and err["param"] == path and err["type"] == "invalid_request_error", err


# ---------------------------------------------------------------- bugs fuzzing found (regression tests)


@pytest.mark.parametrize("temperature", [1e-40, 1e-320, 5e-324])
def test_tiny_temperature_is_served_as_greedy(api: Served, temperature: float) -> None:
    body = {"model": MODEL, "messages": msgs("hi"), "max_tokens": 2, "temperature": temperature}
    resp = api.http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("top_p", [1e-46, 5e-324])
def test_tiny_top_p_keeps_the_top_token(api: Served, top_p: float) -> None:
    body = {"model": MODEL, "messages": msgs("hi"), "max_tokens": 2, "temperature": 1.0, "top_p": top_p}
    resp = api.http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text


def test_context_overflow_names_max_completion_tokens(api: Served) -> None:
    body = {"model": MODEL, "messages": msgs("hi"), "max_completion_tokens": 250}
    resp = api.http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "max_completion_tokens", resp.text
