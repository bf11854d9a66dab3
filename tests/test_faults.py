"""Fault injection: an exception raised at each stage of the model worker, through the real app and
backend behind a real uvicorn server. Every request fails fast with the documented status and a
generic message quoting its request id, never the exception text; the server recovers or stops
serving as documented (server/backends/transformers.py):

| stage | blast radius | status | afterwards |
|---|---|---|---|
| a row's sampling or text handling | that request | 500 | serving |
| admitting a request into the engine | that request | 500 | serving |
| a forward pass (engine step) | requests in the batch | 503 | serving (3 in a row: worker fault) |
| delivery to a request whose event loop is closed | that request | (nobody listens) | serving |
| inbox handling, delivery, the loop itself | every request | 503 | /health 503, on_fatal (steer serve exits 3) |
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from api_utils import _CHAT, MODEL, Served, msgs, serve, wait
from conftest import make_model

from server.settings import Settings
from steer import engine as engine_mod
from steer.engine import Engine

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
SECRET = "secret-internal-detail"


@pytest.fixture()
def srv(tiny_tokenizer, one_cpu_thread) -> Iterator[Served]:
    """A server of its own (a fresh model), since a fault may take its worker down."""
    settings = Settings(served_model_name=MODEL, default_strength=0.0)
    yield from serve(settings, make_model("qwen2", len(tiny_tokenizer)), tiny_tokenizer, [])


@pytest.fixture()
def fatal(srv: Served) -> threading.Event:
    fired = threading.Event()
    srv.backend.on_fatal = fired.set
    return fired


def _body(max_tokens: int = 8, stream: bool = False, **extra) -> dict:
    return {"model": MODEL, "messages": msgs("hello world"), "max_tokens": max_tokens, "temperature": 0,
            "stream": stream, **extra}


def _post(srv: Served, **kw) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = srv.http.post(_CHAT, json=_body(**kw), timeout=20)
    return r, time.monotonic() - t0


def _assert_generic(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "server_error" and SECRET not in r.text and "Traceback" not in r.text
    assert f"(request id {r.headers['x-request-id']})" in err["message"]
    return err


def _assert_serving(srv: Served) -> None:
    assert httpx.get(f"{srv.srv.base_url}/health").status_code == 200
    r, _ = _post(srv)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def _assert_failed(srv: Served, fatal: threading.Event) -> None:
    assert fatal.wait(5), "on_fatal was not called"
    health = httpx.get(f"{srv.srv.base_url}/health")
    assert health.status_code == 503 and health.json()["status"] == "failed"
    r, took = _post(srv)  # a later request: refused at once
    _assert_generic(r, 503)
    assert took < 2


def _raise(*_a, **_k):
    raise RuntimeError(SECRET)


# ---------------------------------------------------------------- faults confined to one request


def test_row_fault_fails_that_request_only(srv: Served, monkeypatch) -> None:
    sample = engine_mod._sample

    def faulty(logits, p, rng):
        return _raise() if p.seed == 4242 else sample(logits, p, rng)

    monkeypatch.setattr(engine_mod, "_sample", faulty)
    with httpx.Client(base_url=srv.srv.base_url, timeout=20) as other:
        slow = threading.Thread(target=lambda: other.post(_CHAT, json=_body(max_tokens=30)))
        slow.start()
        r, took = _post(srv, seed=4242, temperature=0.7)
        slow.join()
    _assert_generic(r, 500)
    assert took < 5
    _assert_serving(srv)


def test_admit_fault_fails_that_request_only(srv: Served, monkeypatch) -> None:
    add, calls = Engine.add, []

    def faulty(self, seq):
        calls.append(seq)
        return _raise() if len(calls) == 1 else add(self, seq)

    monkeypatch.setattr(Engine, "add", faulty)
    r, took = _post(srv)
    _assert_generic(r, 500)
    assert took < 5
    assert wait(lambda: not srv.backend._live)
    _assert_serving(srv)


def test_step_fault_fails_the_batch_and_the_server_recovers(srv: Served, fatal, monkeypatch) -> None:
    step, failed = Engine.step, []

    def faulty(self):
        if self.running and not failed:  # rows in the batch: they fail; waiting ones would be kept
            failed.append(1)
            _raise()
        return step(self)

    monkeypatch.setattr(Engine, "step", faulty)
    r, took = _post(srv)
    err = _assert_generic(r, 503)
    assert "retry" in err["message"] and took < 5
    _assert_serving(srv)
    assert not fatal.is_set()


def test_step_fault_mid_stream_is_an_sse_error(srv: Served, monkeypatch) -> None:
    step, steps = Engine.step, []

    def faulty(self):
        steps.append(1)
        return _raise() if len(steps) == 4 else step(self)

    monkeypatch.setattr(Engine, "step", faulty)
    with srv.http.stream("POST", _CHAT, json=_body(max_tokens=30, stream=True, ignore_eos=True)) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    err = httpx.Response(200, content=lines[-2].removeprefix("data: ")).json()["error"]
    assert err["type"] == "server_error" and SECRET not in str(lines)
    assert f"(request id {r.headers['x-request-id']})" in err["message"]
    _assert_serving(srv)


def test_a_closed_event_loop_drops_only_that_request(srv: Served) -> None:
    """Delivery to a request whose event loop is gone cancels its rows; the worker goes on."""
    from server.backends.transformers import _Job
    from steer.engine import Sequence
    from steer.types import SamplingParams

    loop = asyncio.new_event_loop()
    loop.close()
    seq = Sequence([5, 6, 7], SamplingParams(max_tokens=200, temperature=0.0))
    srv.backend._inbox.put(_Job([(0, False, seq)], loop, asyncio.Queue(), "req-gone", {seq.id}))
    assert wait(lambda: seq.finish_reason == "cancelled", timeout=5), seq.finish_reason
    assert len(seq.generated) < 10 and not srv.backend._live
    _assert_serving(srv)


# ---------------------------------------------------------------- worker faults: fail everything, stop serving


@pytest.mark.parametrize("stage", ["inbox", "delivery", "loop"])
def test_worker_fault_fails_every_request_at_once(srv: Served, fatal, monkeypatch, stage: str) -> None:
    backend = srv.backend
    if stage == "inbox":
        monkeypatch.setattr(backend, "_admit", _raise)
    elif stage == "delivery":
        monkeypatch.setattr(backend, "_deliver", _raise)
    else:
        monkeypatch.setattr(backend, "_observe", _raise)  # runs once per loop turn
    results: list[tuple[httpx.Response, float]] = []
    threads = [threading.Thread(target=lambda: results.append(_post(srv, max_tokens=50))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, took in results:
        if r.status_code != 503:  # the loop stage may fail before a request is even taken
            assert stage == "loop" and r.status_code == 503, r.text
        _assert_generic(r, 503)
        assert took < 5
    _assert_failed(srv, fatal)


def test_repeated_step_faults_are_a_worker_fault(srv: Served, fatal, monkeypatch) -> None:
    monkeypatch.setattr(Engine, "step", lambda self: _raise())
    for _ in range(3):
        r, _ = _post(srv)
        if r.status_code == 503 and fatal.is_set():
            break
        _assert_generic(r, 503)
    _assert_failed(srv, fatal)
