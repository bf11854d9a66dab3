"""The HumanEval sandbox's network cut: a network namespace where the machine allows one, else the
Python-level socket guard (forced here by monkeypatching the probe). Each blocking test first shows
that the same program does connect outside the sandbox, so it could fail."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.evaluation import report, sandbox
from server.evaluation.sandbox import SandboxError, build_program, network_isolation, run_program

needs_netns = pytest.mark.skipif(
    network_isolation() != "namespace", reason="no network namespace can be created on this machine"
)

PROBLEM = {
    "prompt": "def add(a: int, b: int) -> int:\n    '''Sum of a and b.'''\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}


@pytest.fixture
def listener():
    """A TCP server of the test process on 127.0.0.1; yields (socket, port)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        srv.setblocking(False)
        yield srv, srv.getsockname()[1]


@pytest.fixture
def guard_only(monkeypatch):
    """Pretend no network namespace can be made: the sandbox falls back to the socket guard."""
    monkeypatch.setattr(sandbox, "_netns_flags", lambda: None)
    monkeypatch.delenv(sandbox.REQUIRE_NETNS_ENV, raising=False)
    assert network_isolation() == "socket-guard"


def _connect_program(port: int) -> str:
    return f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5).close()\n"


def _assert_connects_outside(program: str, srv: socket.socket) -> None:
    """The same program, run by a plain subprocess, reaches the listener (so the test can fail)."""
    proc = subprocess.run([sys.executable, "-I", "-c", program], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    conn, _ = srv.accept()
    conn.close()


def _assert_nothing_accepted(srv: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        srv.accept()


@needs_netns
def test_namespace_blocks_local_tcp(listener):
    srv, port = listener
    program = _connect_program(port)
    _assert_connects_outside(program, srv)
    res = run_program(program, timeout=20)
    assert res.status == "failed" and "Network is unreachable" in res.detail, res
    assert res.seconds < 5  # refused at once, not a timeout
    _assert_nothing_accepted(srv)


@needs_netns
def test_namespace_is_a_different_one():
    ours = os.readlink("/proc/self/ns/net")
    program = f"import os, socket\nassert os.readlink('/proc/self/ns/net') != {ours!r}\n"
    program += "assert [n for _, n in socket.if_nameindex()] == ['lo']\n"
    assert run_program(program).passed


def test_public_network_fails_fast():
    program = """\
import socket
for call in (lambda: socket.getaddrinfo("example.com", 80),
             lambda: socket.create_connection(("1.1.1.1", 80), timeout=30)):
    try:
        call()
    except OSError:
        continue
    raise SystemExit("network reachable")
"""
    res = run_program(program, timeout=20)
    assert res.passed, res
    assert res.seconds < 5


def test_socket_guard_blocks_local_tcp(listener, guard_only):
    srv, port = listener
    program = _connect_program(port)
    _assert_connects_outside(program, srv)
    res = run_program(program, timeout=20)
    assert res.status == "failed" and "network access is disabled in the sandbox" in res.detail, res
    _assert_nothing_accepted(srv)
    for call in ("socket.socket()", "socket.getaddrinfo('localhost', 80)", "_socket.socket()"):
        res = run_program(f"import socket, _socket\n{call}\n")
        assert res.status == "failed" and "PermissionError" in res.detail, (call, res)
    # stdlib modules that subclass socket.socket still import
    assert run_program("import ssl, urllib.request, asyncio, http.client\n").passed


def test_socket_guard_still_runs_humaneval(guard_only):
    assert run_program(build_program(PROBLEM, "    return a + b\n")).passed
    assert run_program(build_program(PROBLEM, "    return a - b\n")).status == "failed"


def test_humaneval_programs_still_pass():
    assert run_program(build_program(PROBLEM, "    return a + b\n")).passed
    res = run_program(build_program(PROBLEM, "def add(a, b):\n    return a * b\n"))
    assert res.status == "failed" and "AssertionError" in res.detail
    # the temp dir stays writable and readable inside the namespace
    assert run_program("open('x.txt', 'w').write('hi')\nassert open('x.txt').read() == 'hi'\n").passed


def test_concurrent_programs_from_threads():
    """The runner calls run_program from a thread pool; unshare in the forked child still works."""
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: run_program(build_program(PROBLEM, c)), ["    return a + b\n"] * 8))
    assert all(r.passed for r in results), results


def test_require_netns(monkeypatch, guard_only):
    monkeypatch.setenv(sandbox.REQUIRE_NETNS_ENV, "1")
    with pytest.raises(SandboxError, match=sandbox.REQUIRE_NETNS_ENV):
        run_program("pass\n")
    monkeypatch.setenv(sandbox.REQUIRE_NETNS_ENV, "0")
    assert run_program("pass\n").passed


@needs_netns
def test_require_netns_satisfied(monkeypatch):
    monkeypatch.setenv(sandbox.REQUIRE_NETNS_ENV, "1")
    assert sandbox.check_network_isolation() == "namespace"
    assert run_program("pass\n").passed


def test_report_line():
    assert report._sandbox_line({"sandbox_network": None}) == []
    assert "network namespace" in report._sandbox_line({"sandbox_network": "namespace"})[0]
    assert "bypassable" in report._sandbox_line({"sandbox_network": "socket-guard"})[0]


def _eperm(flags: int) -> None:
    raise PermissionError(1, "Operation not permitted")


def test_probe_falls_back_when_unshare_is_refused(monkeypatch):
    monkeypatch.setattr(sandbox, "_UNSHARE", _eperm)
    assert sandbox._probe_netns() is None
    monkeypatch.setattr(sandbox, "_UNSHARE", None)
    assert sandbox._probe_netns() is None


def test_unshare_failing_later_is_an_error_not_a_failed_program(monkeypatch):
    monkeypatch.setattr(sandbox, "_netns_flags", lambda: sandbox.CLONE_NEWUSER | sandbox.CLONE_NEWNET)
    monkeypatch.setattr(sandbox, "_UNSHARE", _eperm)
    with pytest.raises(SandboxError, match="could not start"):
        run_program("pass\n")
