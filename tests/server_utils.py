"""Run an ASGI app under a real uvicorn server in a background thread (for the API test tier)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn


class ServerThread:
    """``with ServerThread(app) as srv:`` serves ``app`` on 127.0.0.1 at ``srv.port`` (a free port).

    The port is chosen by the OS (bind to port 0) and read back from the listening socket, so there is
    no window in which another process can take it. Entering waits until ``GET /health`` answers 200;
    leaving asks uvicorn to exit (which runs the app's lifespan shutdown) and joins the thread.
    """

    def __init__(self, app, *, startup_timeout: float = 30.0) -> None:
        # timeout_graceful_shutdown: a request stuck in the app (a bug under test) must not hang teardown
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", timeout_graceful_shutdown=2
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.startup_timeout = startup_timeout
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn exited during startup (see the log above)")
            if time.monotonic() > deadline:
                self.__exit__()
                raise TimeoutError("uvicorn did not start in time")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        while True:
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                raise TimeoutError("/health did not answer 200 in time")
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        if self.thread.is_alive():
            raise RuntimeError("uvicorn did not shut down within 30 s")


def free_port() -> int:
    """A port free now (for a server in another process, which must be told its port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(cmd: list[str], port: int, *, timeout: float = 240, env: dict | None = None) -> Iterator[str]:
    """``with server_process(cmd, port) as url:`` runs a server command (``steer serve``, vLLM's own server)
    in its own process, waits until ``GET /health`` answers 200, yields its base URL, and stops it.

    vLLM servers get a 1 GiB KV cache and one OpenMP thread: the test models are tiny, and vLLM pins
    torch's thread count process-wide, which is why vLLM never runs inside the test process."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
