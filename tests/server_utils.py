"""Run an ASGI app under a real uvicorn server in a background thread (for the API test tier)."""

from __future__ import annotations

import threading
import time

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
