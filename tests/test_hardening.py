"""Hostile and faulty traffic, API tier: nothing internal reaches a client (request ids instead), bounded
metrics series and request bodies, disconnected non-streaming clients free their rows, and an explicit
default vector. A real uvicorn server on a tiny random model of its own (see api_utils.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from api_utils import (
    _CHAT,
    ERROR_KEYS,
    MODEL,
    Served,
    assert_alive,
    engine_idle,
    metric_value,
    metrics_text,
    msgs,
    serve,
    wait,
)
from conftest import make_model, make_vector

import steer.vectors
from server import cli
from server.backends.transformers import TransformersBackend
from server.errors import APIError
from server.settings import Settings
from steer.vectors import VectorError

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CAP = 64 * 1024  # the server's --max-request-bytes here (small: the tests send bodies around it)
GENERATED_ID = re.compile(r"req-[0-9a-f]{24}")


@pytest.fixture(scope="module")
def hard(tiny_tokenizer, one_cpu_thread) -> Iterator[Served]:
    """A server of its own (own model copy: tests here patch its backend and engine)."""
    model = make_model("qwen2", len(tiny_tokenizer))
    settings = Settings(served_model_name=MODEL, default_strength=0.01, max_request_bytes=CAP)
    yield from serve(settings, model, tiny_tokenizer, [make_vector(model)])


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": msgs("hi"), "max_tokens": 2, "temperature": 0, **extra}


def padded(size: int) -> bytes:
    """A valid chat request of exactly ``size`` bytes (JSON allows trailing whitespace)."""
    raw = json.dumps(chat_body()).encode()
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


def error_of(r: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
    assert body["error"]["type"] == kind
    return body["error"]


# ---------------------------------------------------------------- (4) request ids, nothing internal leaks


def test_unexpected_error_sends_only_a_request_id(
    hard: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken_prepare(inp, steering):
        raise RuntimeError("secret /etc/passwd detail")

    monkeypatch.setattr(hard.backend, "prepare", broken_prepare)
    with caplog.at_level(logging.ERROR, logger="server.errors"):
        r = hard.http.post(_CHAT, json=chat_body())
    err = error_of(r, 500, "server_error")
    assert "secret" not in r.text and "/etc/passwd" not in r.text
    rid = r.headers["x-request-id"]
    assert GENERATED_ID.fullmatch(rid)
    assert rid in err["message"]
    # the detail is in the log, under the same id
    [record] = [rec for rec in caplog.records if rec.name == "server.errors" and rid in rec.getMessage()]
    assert record.exc_info is not None and "secret /etc/passwd detail" in str(record.exc_info[1])
    monkeypatch.undo()
    assert_alive(hard)


def test_server_error_mid_stream_quotes_the_request_id(hard: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    async def failing_generate(prepared):
        raise APIError(500, "generation failed", type="server_error")
        yield  # an async generator, like the real one

    monkeypatch.setattr(hard.backend, "generate", failing_generate)
    with hard.http.stream("POST", _CHAT, json=chat_body(stream=True)) as r:
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        events = [line[len("data: "):] for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    err = json.loads(events[0])["error"]
    assert err["type"] == "server_error" and rid in err["message"]


@pytest.mark.parametrize("given", ["abc.DEF_12-3", "x" * 64])
def test_a_well_formed_client_request_id_is_kept(hard: Served, given: str) -> None:
    ok = hard.http.post(_CHAT, json=chat_body(), headers={"X-Request-Id": given})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == given
    bad = hard.http.post(_CHAT, json=chat_body(max_tokens=-1), headers={"X-Request-Id": given})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == given
    with hard.http.stream("POST", _CHAT, json=chat_body(stream=True), headers={"X-Request-Id": given}) as r:
        assert r.headers["x-request-id"] == given
        r.read()


@pytest.mark.parametrize("given", [None, "", "has space", "x" * 65, "semi;colon", "ünïcode"])
def test_other_requests_get_a_fresh_id(hard: Served, given: str | None) -> None:
    headers = {} if given is None else {"X-Request-Id": given.encode()}  # bytes: sent as they are
    ids = [hard.http.get("/v1/nope", headers=headers).headers["x-request-id"] for _ in range(2)]
    assert all(GENERATED_ID.fullmatch(i) for i in ids) and ids[0] != ids[1]


# ---------------------------------------------------------------- (5a) bounded metrics series


def request_series(api: Served) -> set[tuple[str, str]]:
    found = re.findall(r'^steer_requests_total\{endpoint="([^"]*)",status="([^"]*)"\}', metrics_text(api), re.M)
    return set(found)


def test_random_urls_add_no_metrics_series(hard: Served) -> None:
    hard.http.post(_CHAT, json=chat_body())
    before = request_series(hard)
    assert (_CHAT, "200") in before  # matched routes are labelled by their template
    for i in range(50):
        path = f"/v1/{secrets.token_hex(6)}" if i % 2 else f"/{secrets.token_hex(6)}/x"
        r = hard.http.get(path) if i % 3 else hard.http.post(path, json={})
        assert r.status_code == 404
    added = request_series(hard) - before
    assert added <= {("other", "404")}, added
    assert metric_value(metrics_text(hard), "steer_requests_total", {"endpoint": "other", "status": "404"}) >= 50


# ---------------------------------------------------------------- (5b) request body cap


def chunks(blob: bytes, size: int = 4096) -> Iterator[bytes]:
    for i in range(0, len(blob), size):
        yield blob[i : i + size]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_the_body_cap_is_exact(hard: Served, chunked: bool) -> None:
    def post(size: int) -> httpx.Response:
        blob = padded(size)
        r = hard.http.post(_CHAT, content=chunks(blob) if chunked else blob,
                           headers={"Content-Type": "application/json"})
        assert ("content-length" in r.request.headers) != chunked  # really sent the way the test says
        return r

    at_cap = post(CAP)
    assert at_cap.status_code == 200, at_cap.text
    assert at_cap.json()["choices"][0]["finish_reason"] == "length"
    over = post(CAP + 1)
    err = error_of(over, 413, "invalid_request_error")
    assert str(CAP) in err["message"] and err["param"] is None
    assert GENERATED_ID.fullmatch(over.headers["x-request-id"])
    assert_alive(hard)


def test_open_ended_chunked_body_is_refused_once_over_the_cap(hard: Served) -> None:
    """The bytes are counted as they arrive: the 413 comes while the upload is still going on (the
    server neither waits for the end nor keeps reading)."""
    head = (f"POST {_CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", hard.srv.port), timeout=5) as sock:
        sock.sendall(head)
        for piece in chunks(b" " * (CAP + 4096)):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        reply = sock.recv(65536)  # the terminating chunk is never sent
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert_alive(hard)


# ---------------------------------------------------------------- (5) a bounded queue, (6) nothing blocks the loop


@pytest.fixture()
def one_slot(tiny_tokenizer, one_cpu_thread) -> Iterator[Served]:
    """One batch slot and room for one waiting request."""
    settings = Settings(served_model_name=MODEL, default_strength=0.0, max_batch_size=1, max_queued_requests=1)
    yield from serve(settings, make_model("qwen2", len(tiny_tokenizer)), tiny_tokenizer, [])


def test_a_full_queue_is_429_with_retry_after(one_slot: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    step = one_slot.backend.engine.step

    def slow_step():
        time.sleep(0.01)
        return step()

    monkeypatch.setattr(one_slot.backend.engine, "step", slow_step)
    body = json.dumps(chat_body(max_tokens=200, ignore_eos=True)).encode()
    head = f"POST {_CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    socks = [socket.create_connection(("127.0.0.1", one_slot.srv.port), timeout=5) for _ in range(2)]
    try:
        socks[0].sendall(head.encode() + body)  # takes the slot
        assert wait(lambda: metric_value(metrics_text(one_slot), "steer_running_rows") == 1)  # and is recounted
        socks[1].sendall(head.encode() + body)  # waits for it
        assert wait(lambda: metric_value(metrics_text(one_slot), "steer_queued_requests") == 1)
        r = one_slot.http.post(_CHAT, json=chat_body())
        err = error_of(r, 429, "server_error")
        assert r.headers["retry-after"] == "1" and err["code"] == "queue_full"
    finally:
        for sk in socks:
            sk.close()
    assert wait(lambda: engine_idle(one_slot), timeout=3)
    assert wait(lambda: metric_value(metrics_text(one_slot), "steer_queued_requests") == 0)
    assert_alive(one_slot)


def test_a_batch_of_prompts_counts_once_against_the_queue(one_slot: Served) -> None:
    """Four prompts in one request on a server with one slot and room for one waiting request: the batch is
    one request, admitted whole, not refused at its second prompt."""
    r = one_slot.http.post("/v1/completions", json={"model": MODEL, "prompt": ["a b", "c d", "e f", "g h"],
                                                   "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
    assert wait(lambda: metric_value(metrics_text(one_slot), "steer_queued_requests") == 0)
    assert_alive(one_slot)


def test_a_request_the_worker_has_just_taken_still_counts_against_the_queue(
    one_slot: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race a CI run hit: the worker takes the waiting request out of its inbox and steps before it
    recounts the queue. A request arriving in that window is still refused; the cap holds at every instant."""
    import threading

    engine = one_slot.backend.engine
    step, held, release = engine.step, threading.Event(), threading.Event()

    def step_held_while_a_request_waits():
        if engine.running and engine.pending and not release.is_set():  # the second request is in, uncounted
            held.set()
            release.wait(10)
        return step()

    monkeypatch.setattr(engine, "step", step_held_while_a_request_waits)
    body = json.dumps(chat_body(max_tokens=50, ignore_eos=True)).encode()
    head = f"POST {_CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    socks = [socket.create_connection(("127.0.0.1", one_slot.srv.port), timeout=5) for _ in range(2)]
    unstick = threading.Timer(5, release.set)  # without the fix the third request waits on the held step
    try:
        socks[0].sendall(head.encode() + body)
        assert wait(lambda: metric_value(metrics_text(one_slot), "steer_running_rows") == 1)
        socks[1].sendall(head.encode() + body)
        assert held.wait(5)
        unstick.start()
        r = one_slot.http.post(_CHAT, json=chat_body())
        assert error_of(r, 429, "server_error")["code"] == "queue_full"
    finally:
        unstick.cancel()
        release.set()
        for sk in socks:
            sk.close()
    assert wait(lambda: engine_idle(one_slot), timeout=5)
    assert wait(lambda: metric_value(metrics_text(one_slot), "steer_queued_requests") == 0)
    assert_alive(one_slot)


def test_prompts_are_tokenized_off_the_event_loop(hard: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chat templating runs on the one tokenizer thread; the engine decodes with a tokenizer of its own."""
    import asyncio
    import threading

    tok, seen = hard.backend.tok, []
    render = tok.apply_chat_template

    def spy(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        seen.append((threading.current_thread().name, on_loop))
        return render(*args, **kwargs)

    monkeypatch.setattr(tok, "apply_chat_template", spy)
    assert_alive(hard)
    assert_alive(hard)
    assert len(seen) == 2 and all(name.startswith("steer-tokenize") and not on_loop for name, on_loop in seen)
    assert hard.backend.engine.tok is not tok  # never shared between the two threads


# ---------------------------------------------------------------- (7) disconnects free the rows


def test_client_disconnect_before_a_non_streaming_answer_frees_the_slot(
    hard: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As in test_api's streaming case: slow each step, so 240 steps take >= 1.2 s.
    step = hard.backend.engine.step

    def slow_step():
        time.sleep(0.005)
        return step()

    monkeypatch.setattr(hard.backend.engine, "step", slow_step)
    assert wait(lambda: engine_idle(hard))
    before = metric_value(metrics_text(hard), "steer_engine_step_seconds_count") or 0
    max_tokens = 240  # the context is 256
    body = json.dumps(chat_body(max_tokens=max_tokens, safety={"compare": True})).encode()
    head = f"POST {_CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", hard.srv.port), timeout=5) as sock:
        sock.sendall(head.encode() + body)
        assert wait(lambda: hard.backend.engine.running > 0), "the request never reached the engine"
    # the connection is closed: both rows (steered and baseline) must leave the batch promptly
    assert wait(lambda: engine_idle(hard), timeout=1.0), "the disconnected request still holds its rows"
    text = metrics_text(hard)
    steps = metric_value(text, "steer_engine_step_seconds_count") - before
    assert steps < max_tokens / 2, f"{steps} engine steps: the request ran on after the disconnect"
    assert wait(lambda: (metric_value(metrics_text(hard), "steer_requests_total",
                                      {"endpoint": _CHAT, "status": "499"}) or 0) >= 1)
    t0 = time.monotonic()
    assert_alive(hard)
    assert time.monotonic() - t0 < 5


# ---------------------------------------------------------------- (10) vectors: hashing once, explicit default


def test_vectors_endpoint_does_not_rehash(hard: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class CountingHashlib:
        @staticmethod
        def sha256(*args: Any) -> Any:
            calls.append(1)
            return hashlib.sha256(*args)

    monkeypatch.setattr(steer.vectors, "hashlib", CountingHashlib)
    shas = [hard.http.get("/v1/safety/vectors").json()["data"][0]["sha256"] for _ in range(5)]
    assert len(calls) <= 1, f"{len(calls)} hashes for 5 requests"
    monkeypatch.undo()
    assert set(shas) == {hard.backend.vectors["refusal"].sha256}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer) -> tuple[Path, Path]:
    """A tiny model + tokenizer and two vectors for it ("other", "refusal"), saved as an operator would."""
    root = tmp_path_factory.mktemp("saved")
    model = make_model("qwen2", len(tiny_tokenizer))
    model.save_pretrained(root / "m")
    tiny_tokenizer.save_pretrained(root / "m")
    make_vector(model).save(root / "v")
    make_vector(model, name="other", seed=2).save(root / "v")
    return root / "m", root / "v"


@pytest.mark.parametrize(
    ("requested", "error"),
    [
        ("nope", r"^--default-vector 'nope' is not a loaded vector; loaded: other, refusal$"),
        (None, r"^several vectors are loaded \(other, refusal\): pass --default-vector NAME"),
    ],
)
def test_backend_refuses_to_start_without_a_clear_default(saved, requested: str | None, error: str) -> None:
    model_dir, vector_dir = saved
    settings = Settings(model=str(model_dir), vectors=str(vector_dir), default_vector=requested,
                        linear_weights="plain")
    with pytest.raises(VectorError, match=error):
        TransformersBackend(settings)


def test_backend_serves_the_named_default(saved) -> None:
    model_dir, vector_dir = saved
    # "refusal", not the alphabetically first "other": the name given is used, not the first loaded
    backend = TransformersBackend(Settings(model=str(model_dir), vectors=str(vector_dir), default_vector="refusal",
                                           linear_weights="plain"))
    try:
        assert backend.default_vector() == "refusal"
        assert {v["name"]: v["default"] for v in backend.vectors_info()} == {"other": False, "refusal": True}
    finally:
        backend.shutdown()


def test_cli_reports_a_bad_default_in_one_line(saved, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: served.append(a))
    model_dir, vector_dir = saved
    code = cli.main(["serve", "--model", str(model_dir), "--vectors", str(vector_dir), "--default-vector", "nope",
                     "--linear-weights", "plain"])
    err = capsys.readouterr().err
    assert (code, served) == (1, [])
    assert "Traceback" not in err  # (loading progress bars may come before the error line)
    assert err.splitlines()[-1] == "steer: error: --default-vector 'nope' is not a loaded vector; loaded: other, refusal"
