"""Running the app under uvicorn with a bounded, graceful shutdown and a fail-fast worker.

uvicorn alone waits without limit for "background tasks" on SIGTERM (a request whose client is gone
but whose rows still decode), and re-raises the signal after shutting down, so the exit status says
"killed". Here:

- the first SIGTERM or SIGINT stops admitting work at once (new requests and ``/health`` get 503, the
  listening sockets close), lets accepted requests finish for up to ``--shutdown-timeout`` seconds,
  then fails the rest with a 503 error to their clients and exits with status 0;
- a second SIGTERM or SIGINT exits at once (status 128 + the signal number);
- a worker fault (see ``server.backends.transformers``) fails every request and exits with status 3,
  so that a supervisor (systemd ``Restart=on-failure``, Kubernetes) starts a fresh process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import uvicorn

log = logging.getLogger("steer.server")

EXIT_WORKER_FAILED = 3
_AFTER_ABORT_S = 2.0  # after the deadline: time for the failed requests' error bodies to go out


class SteerServer(uvicorn.Server):
    """uvicorn.Server with the shutdown policy above. ``exit_code`` is what the process should return."""

    def __init__(self, config: uvicorn.Config, backend, *, shutdown_timeout: float):
        super().__init__(config)
        self.backend, self.shutdown_timeout = backend, shutdown_timeout
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        backend.on_fatal = self._on_worker_fault

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # Not uvicorn's: it records the signal to re-raise after shutdown (exit status "killed").
        if self._draining or self.should_exit:
            log.warning("second %s: exiting now", signal.Signals(sig).name)
            os._exit(128 + sig)
        self._draining = True
        log.info("%s: no new requests; in-flight ones get %.3g s to finish", signal.Signals(sig).name,
                 self.shutdown_timeout)
        self.backend.begin_shutdown()
        if self._loop is None:  # before startup finished: nothing to drain
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        for server in getattr(self, "servers", []):
            server.close()  # stop accepting connections; uvicorn's own shutdown closes them again
        deadline = time.monotonic() + self.shutdown_timeout
        while self.backend.inflight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = self.backend.inflight()
        if left:
            log.warning("shutdown timeout: cancelling %d request(s)", left)
            self.backend.abort_all("the server is shutting down")
            end = time.monotonic() + _AFTER_ABORT_S
            while self.backend.inflight() and time.monotonic() < end:
                await asyncio.sleep(0.05)
        self.should_exit = True

    def _on_worker_fault(self) -> None:
        """Called on the worker thread after it failed every request."""
        log.critical("exiting with status %d so that a supervisor restarts the server", EXIT_WORKER_FAILED)
        self.exit_code = EXIT_WORKER_FAILED
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._exit_after_failure)

    def _exit_after_failure(self) -> None:
        self._draining = True
        self.config.timeout_graceful_shutdown = _AFTER_ABORT_S
        self._loop.call_later(0.5, setattr, self, "should_exit", True)  # let the 503 bodies go out


def serve(app, host: str, port: int, *, shutdown_timeout: float) -> int:
    """Serve ``app`` until shut down; returns the process exit status."""
    config = uvicorn.Config(app, host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=max(1.0, _AFTER_ABORT_S))
    server = SteerServer(config, app.state.backend, shutdown_timeout=shutdown_timeout)
    server.run()
    return server.exit_code
