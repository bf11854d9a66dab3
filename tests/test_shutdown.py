"""Graceful, bounded shutdown and fail-fast worker faults, on a real `steer serve` process.

The server runs the tiny checkpoint through tests/serve_with_faults.py, which only slows each engine
step (so a request is still running when the signal arrives) or injects a worker fault.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _server(tiny_dir, *args: str, step_delay: float = 0.0, fault: str = "") -> Iterator[tuple[subprocess.Popen, str]]:
    port = _free_port()
    env = dict(os.environ, STEER_TEST_STEP_DELAY=str(step_delay), STEER_TEST_FAULT=fault, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(HERE / "serve_with_faults.py"), "--model", str(tiny_dir), "--default-strength", "0",
           "--port", str(port), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _body(max_tokens: int, stream: bool) -> dict:
    return {"messages": [{"role": "user", "content": "hello world"}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}


def _stream_until_first_chunk(client: httpx.Client, url: str, max_tokens: int):
    """Open a streaming request and read its first chunk; returns (response, line iterator)."""
    r = client.send(client.build_request("POST", f"{url}/v1/chat/completions", json=_body(max_tokens, True)),
                    stream=True)
    assert r.status_code == 200
    lines = r.iter_lines()
    assert next(line for line in lines if line).startswith("data: {")
    return r, lines


def _rest(lines) -> list[str]:
    return [line for line in lines if line]


def _wait_exit(proc: subprocess.Popen, timeout: float) -> tuple[int, float, str]:
    t0 = time.monotonic()
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, time.monotonic() - t0, out


def test_sigterm_lets_in_flight_requests_finish_then_exits_0(tiny_dir) -> None:
    with _server(tiny_dir, "--shutdown-timeout", "20", step_delay=0.02) as (proc, url), httpx.Client(timeout=30) as c:
        r, lines = _stream_until_first_chunk(c, url, 80)  # ~1.6 s of decoding left
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no new work: the listener is closed
            c.post(f"{url}/v1/chat/completions", json=_body(4, False), timeout=2)
        rest = _rest(lines)
        r.close()
        code, took, out = _wait_exit(proc, 15)
    assert rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in rest[-3].replace(" ", ""), rest[-3:]
    assert code == 0, out
    assert took < 5, out


def test_shutdown_timeout_cancels_the_rest_with_an_error_and_exits_0(tiny_dir) -> None:
    with _server(tiny_dir, "--shutdown-timeout", "0.5", step_delay=0.05) as (proc, url), httpx.Client(timeout=30) as c:
        r, lines = _stream_until_first_chunk(c, url, 200)  # ~10 s of decoding left: cannot finish
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest = _rest(lines)
        took_stream = time.monotonic() - t0
        r.close()
        code, _, out = _wait_exit(proc, 15)
        took = time.monotonic() - t0
    assert rest[-1] == "data: [DONE]"
    err = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert err["type"] == "server_error" and "shutting down" in err["message"]
    assert took_stream < 3, f"the stream ended {took_stream:.1f} s after SIGTERM"
    assert code == 0 and took < 6, (code, took, out)
    assert "Traceback" not in out


def test_second_signal_exits_at_once(tiny_dir) -> None:
    with _server(tiny_dir, "--shutdown-timeout", "60", step_delay=0.05) as (proc, url), httpx.Client(timeout=30) as c:
        r, _ = _stream_until_first_chunk(c, url, 200)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None, "the first SIGTERM must wait for the in-flight request"
        proc.send_signal(signal.SIGINT)
        code, took, out = _wait_exit(proc, 10)
        r.close()
    assert code == 128 + signal.SIGINT and took < 2, (code, took, out)


def test_worker_fault_fails_requests_with_503_and_exits_non_zero(tiny_dir) -> None:
    with _server(tiny_dir, fault="delivery") as (proc, url), httpx.Client(timeout=30) as c:
        t0 = time.monotonic()
        r = c.post(f"{url}/v1/chat/completions", json=_body(8, False))
        assert r.status_code == 503 and "injected" not in r.text
        assert "request id" in r.json()["error"]["message"]
        code, _, out = _wait_exit(proc, 15)
        took = time.monotonic() - t0
    assert code == 3, out
    assert took < 8 and "supervisor" in out
