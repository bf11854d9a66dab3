"""The OpenAI-compatible FastAPI app. Routes turn wire requests into engine types once (protocol.py),
hand them to the backend, and turn its row events back into OpenAI bodies or SSE chunks."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import aclosing, asynccontextmanager
from dataclasses import replace
from importlib import resources
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import backends
from server import protocol as p
from server import responses as r
from server.backends.base import Backend, Prepared, RowEvent
from server.errors import (
    REQUEST_ID,
    REQUEST_ID_HEADER,
    APIError,
    BodyTooLarge,
    current_request_id,
    error_body,
    install_error_handlers,
    sse_error_line,
)
from server.metrics import Metrics, strength_bucket
from server.settings import Settings

log = logging.getLogger("steer.server")
T = TypeVar("T")
# nginx's "client closed request": what a non-streaming request whose client left is counted as.
CLIENT_CLOSED = 499
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class StartupError(RuntimeError):
    """The server cannot start with these settings (one-line message for the CLI)."""


def create_app(settings: Settings, backend: Backend | None = None, metrics: Metrics | None = None) -> FastAPI:
    metrics = metrics or Metrics()
    if backend is None:
        backend = backends.get(settings.backend)(settings, metrics=metrics)
    if not backend.vector_kinds() and settings.default_strength > 0:
        merged = ", ".join(f"{n}={k:g}" for n, k in backend.merged_vectors().items())
        raise StartupError(
            f"every loaded vector is merged into the weights ({merged}), so no vector is left to apply the "
            "default strength per request: pass --default-strength 0 to serve the merged model as it is, "
            "or load a per-request vector too" if merged else
            "no safety vectors are loaded, so the default strength cannot be applied: "
            "pass --vectors DIR, or --default-strength 0 to serve the unsteered model"
        )
    # Backends settle their default vector at setup; asking here makes one that would only decide on the
    # first request (and raise VectorError there) fail at startup instead.
    backend.default_vector()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        backend.start()
        try:
            yield
        finally:
            backend.shutdown()

    app = FastAPI(title="steer: safety steering server", lifespan=lifespan)
    app.state.backend, app.state.settings, app.state.metrics = backend, settings, metrics
    install_error_handlers(app)
    # add_middleware wraps what is there, so the last added runs first: the id is set before anything
    # can fail, and the metrics see the body limit's 413s.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    auth = _auth_dependency(settings)

    @app.get("/health")
    async def health():
        kernels = backend.runtime_info()["kernels"]
        body = {"status": "ok" if backend.healthy() else backend.status(),
                "kernels": {k: kernels[k] for k in ("dtype", "linear_weights")}}
        return body if backend.healthy() else JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    if settings.playground_enabled():
        page = playground_html()

        # No auth: the page holds no data, and every API call it makes sends the key. Not in the OpenAPI
        # schema: it is a client of the API, not part of it.
        @app.get("/", include_in_schema=False)
        @app.get("/playground", include_in_schema=False)
        async def playground():
            return HTMLResponse(page, headers=PLAYGROUND_HEADERS)

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {
            "object": "list",
            "data": [{"id": backend.model_name, "object": "model", "created": 0, "owned_by": "steer",
                      "max_model_len": backend.max_model_len, "steer": backend.runtime_info()}],
        }

    @app.get("/v1/safety/vectors", dependencies=[Depends(auth)])
    async def vectors():
        return {
            "object": "list",
            "data": backend.vectors_info(),
            "default_vector": backend.default_vector(),
            "model": backend.model_name,
            "model_fingerprint": backend.model_fingerprint(),
            "policy": {
                "default_strength": settings.default_strength,
                "min_strength": settings.min_strength,
                "max_strength": settings.max_strength,
            },
        }

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(req: p.ChatCompletionRequest, request: Request):
        return await _complete(backend, settings, metrics, req, "chat", request)

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(req: p.CompletionRequest, request: Request):
        return await _complete(backend, settings, metrics, req, "text", request)

    return app


# The page loads nothing from anywhere but this server: the browser enforces it (inline script and style,
# fetch to this origin only), so a page edited by mistake cannot pull a script from a CDN either.
PLAYGROUND_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def playground_html() -> str:
    """The playground page, shipped as package data (server/static/playground.html)."""
    return resources.files("server").joinpath("static", "playground.html").read_text(encoding="utf-8")


def _auth_dependency(settings: Settings):
    async def check(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), settings.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    return check


# ---------------------------------------------------------------- middleware (pure ASGI: streaming bodies
# pass through untouched, and the route's receive() still reports the client's disconnect)


def _request_id(scope: Scope) -> str:
    """The client's X-Request-Id when it is a short safe token (it is echoed and logged), else a new id."""
    given = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
    return given if _REQUEST_ID_RE.fullmatch(given) else "req-" + secrets.token_hex(12)


class RequestIdMiddleware:
    """Each request gets an id: in ``REQUEST_ID`` and ``request.state.request_id`` for errors and logs,
    and in the X-Request-Id header of its response (the 500 handler, which Starlette runs outside every
    middleware, sets the header itself)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(raw=list(message.get("headers", [])))
                headers[REQUEST_ID_HEADER] = rid
                message = {**message, "headers": headers.raw}
            await send(message)

        token = REQUEST_ID.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


def route_label(scope: Scope) -> str:
    """The matched route's path template; one label for every unmatched path, so that hostile URLs
    cannot grow the number of series."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else "other"


class MetricsMiddleware:
    """Counts requests by route template and status (Prometheus' own scrapes are not counted)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/metrics":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            status.append(500)  # what the outermost error handler will answer (if nothing was sent yet)
            raise
        finally:
            if status:
                self.metrics.requests.labels(route_label(scope), str(status[0])).inc()


def _content_length(scope: Scope) -> int | None:
    try:
        return int(Headers(scope=scope)["content-length"])
    except (KeyError, ValueError):
        return None


class BodyLimitMiddleware:
    """HTTP 413 for a body over ``limit`` bytes: at once from Content-Length, else counted as the chunks
    of a chunked upload arrive. Nothing is buffered here (the route reads at most limit + one chunk)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.limit:
            await self._refuse(BodyTooLarge(self.limit), scope, receive, send)
            return
        seen, started = 0, False

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # FastAPI re-raises it as the 413 envelope (an HTTPException)
                    raise BodyTooLarge(self.limit)
            return message

        async def send_started(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, send_started)
        except BodyTooLarge as e:
            if started:
                raise
            await self._refuse(e, scope, receive, send)  # read outside a route (none handled it)

    @staticmethod
    async def _refuse(err: BodyTooLarge, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(error_body(err.detail), status_code=err.status_code)
        await response(scope, receive, send)


# ---------------------------------------------------------------- completions


async def _complete(backend: Backend, settings: Settings, metrics: Metrics, req, kind: r.Kind, request: Request):
    if req.model is not None and req.model != backend.model_name:
        raise APIError(
            404, f"model {req.model!r} is not served here; served: {backend.model_name}",
            param="model", code="model_not_found",
        )
    asked = req.safety.vector if req.safety is not None else None
    if asked in backend.merged_vectors():
        raise APIError(
            400, f"safety vector {asked!r} is merged into the served model's weights (at strength "
            f"{backend.merged_vectors()[asked]:g}): it applies to every request and cannot be chosen per request",
            param="safety.vector",
        )
    inputs, spec = p.resolve(req, settings, backend.vector_kinds(), backend.default_vector())
    prepared = [await _prepare(backend, inp, spec, k, len(inputs)) for k, inp in enumerate(inputs)]
    prepared[1:] = [replace(q, follows=True) for q in prepared[1:]]  # the queue cap counts a batch once
    meta = r.ResponseMeta.new(kind, backend.model_name)
    vkind = backend.vector_kinds().get(spec.vector)
    safety = r.safety_info(spec, vkind, backend.applied_strength(spec.vector, spec.strength))
    metrics.prompt_tokens.inc(sum(len(q.prompt_ids) for q in prepared))
    metrics.steered.labels(spec.vector or "none", strength_bucket(spec.strength)).inc()
    if spec.compare:
        metrics.compare.inc()
    endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    if req.stream:
        gen = _stream(backend, metrics, prepared, meta, safety, req.include_usage, endpoint, req.include_baseline)
        return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _collect(backend, metrics, prepared, meta, safety, endpoint, request)


async def _prepare(backend: Backend, inp, spec, k: int, count: int) -> Prepared:
    """Tokenize one prompt of a request; in a batch, an error names the prompt it is about."""
    try:
        return await backend.prepare(inp, spec)
    except APIError as e:
        if count == 1:
            raise
        raise APIError(e.status_code, f"prompt {k}: {e.message}", type=e.type, param=e.param, code=e.code) from None


_DONE = object()


async def _events(backend: Backend, prepared: list[Prepared]) -> AsyncIterator[RowEvent]:
    """Every row event of a request. A batch of prompts runs as one request per prompt, all at once,
    their choices numbered prompt by prompt (prompt k's choice j is k * n + j, as in OpenAI's API);
    closing this closes every prompt's generator (their rows are freed)."""
    if len(prepared) == 1:
        async with aclosing(backend.generate(prepared[0])) as events:
            async for ev in events:
                yield ev
        return
    queue: asyncio.Queue = asyncio.Queue()
    n = prepared[0].inp.n

    async def pump(k: int, prep: Prepared) -> None:
        try:
            async with aclosing(backend.generate(prep)) as events:
                async for ev in events:
                    queue.put_nowait(replace(ev, index=k * n + ev.index))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait(e)
            return
        queue.put_nowait(_DONE)

    # in order: the first prompt's job is admitted (or refused) before the others, which follow it
    tasks = [asyncio.ensure_future(pump(k, prep)) for k, prep in enumerate(prepared)]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is _DONE:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()  # a no-op on a finished one
        await asyncio.gather(*tasks, return_exceptions=True)


class _Rows:
    """Accumulates row texts, finish reasons and token counts for steered and baseline rows. ``echo``: per
    choice, the prompt text its answer starts with (legacy echo); ``echo_only``: the answer is that alone
    (max_tokens 0: the one token generated is dropped)."""

    def __init__(self, n: int, logprobs: bool = False, echo: list[str] | None = None, echo_only: bool = False):
        self.text = {(i, b): "" for i in range(n) for b in (False, True)}
        self.finish: dict[tuple[int, bool], str] = {}
        self.tokens = {(i, b): 0 for i in range(n) for b in (False, True)}
        self.gate: dict[int, bool | None] = {}
        self.lowered: dict[int, bool] = {}
        self.logprobs = {(i, b): r.Logprobs() for i in range(n) for b in (False, True)} if logprobs else None
        self.sent = {(i, b): 0 for i in range(n) for b in (False, True)}  # logprobs already streamed
        self.n, self.echo, self.echo_only, self.started = n, echo, echo_only, set()

    @classmethod
    def of(cls, prepared: list[Prepared]) -> _Rows:
        first = prepared[0].inp
        echo = [q.prompt_text for q in prepared for _ in range(q.inp.n)] if first.echo else None
        return cls(first.n * len(prepared), first.sampling.logprobs is not None, echo, first.echo_only)

    def add(self, ev) -> str:
        """Take one event; returns the text it adds to its row (with the echoed prompt, on a row's first)."""
        key = (ev.index, ev.baseline)
        text = "" if self.echo_only else ev.text
        if key not in self.started:
            self.started.add(key)
            text = (self.echo[ev.index] if self.echo else "") + text
        self.text[key] += text
        self.tokens[key] = ev.n_tokens
        if self.logprobs is not None:
            self.logprobs[key].add(ev.prompt_logprobs)
            if not self.echo_only:
                self.logprobs[key].add(ev.logprobs)
        if ev.finish_reason:
            self.finish[key] = ev.finish_reason
            if not ev.baseline:
                self.gate[ev.index] = ev.gate
                self.lowered[ev.index] = ev.lowered
        return text

    def safety(self, safety: dict, spec, n: int) -> dict:
        """The response's ``safety`` with what steering did to each choice: ``steered`` (a vector acted
        on it: strength > 0 and its gate, if it has one, open, or lowering refusal), ``gate`` (the gate's
        decision; null for a vector without a gate, or where none was decided) and ``lowered`` (a
        two-sided gate judged the prompt benign and subtracted the direction)."""
        acting = spec.strength > 0 and bool(spec.vector)
        per = [{"index": i, "steered": acting and (self.gate.get(i) is not False or self.lowered.get(i, False)),
                "gate": self.gate.get(i), "lowered": self.lowered.get(i, False)} for i in range(n)]
        return {**safety, "choices": per}

    def choices(self, n: int, baseline: bool) -> list[r.Choice]:
        return [r.Choice(self.text[(i, baseline)], self.finish.get((i, baseline), "stop"),
                         self.logprobs[(i, baseline)] if self.logprobs is not None else None) for i in range(n)]

    def unsent_logprobs(self, kind: r.Kind, key: tuple[int, bool]) -> dict | None:
        """The logprobs of the tokens since the last chunk of this row (a chunk is sent only when text
        is, so a token whose text is held back reaches the client with the next chunk)."""
        if self.logprobs is None:
            return None
        start, self.sent[key] = self.sent[key], len(self.logprobs[key].entries)
        return self.logprobs[key].render(kind, start, self.sent[key])

    def usage(self, prompt: int, n: int, baseline: bool) -> r.Usage:
        return r.Usage(prompt, sum(self.tokens[(i, baseline)] for i in range(n)))


class ClientDisconnected(Exception):
    """The client went away before its non-streaming answer was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    # FastAPI has read the whole body before the route runs, so receive() now blocks until the client
    # disconnects: nothing is taken from the body.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await ``work``, unless the client disconnects first: then ``work`` is cancelled (closing the
    backend's generator frees its rows) and ClientDisconnected is raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (watcher, task):
            t.cancel()  # a no-op on a finished task
        await asyncio.wait((task, watcher))  # the generator's cleanup has run before we go on
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


async def _gather(backend: Backend, prepared: list[Prepared], rows: _Rows, t0: float) -> float | None:
    """Every event of a request into ``rows``; returns the time to the first steered token."""
    first = None
    async with aclosing(_events(backend, prepared)) as events:
        async for ev in events:
            if first is None and not ev.baseline:
                first = time.perf_counter() - t0
            rows.add(ev)
    return first


async def _collect(backend, metrics, prepared: list[Prepared], meta, safety, endpoint: str, request: Request):
    t0 = time.perf_counter()
    rows = _Rows.of(prepared)
    n, steering, prompt_tokens = rows.n, prepared[0].steering, sum(len(q.prompt_ids) for q in prepared)
    try:
        first = await _unless_disconnected(request, _gather(backend, prepared, rows, t0))
    except ClientDisconnected:
        log.info("request %s: client disconnected, generation cancelled", current_request_id())
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; the metrics count it
    usage = rows.usage(prompt_tokens, n, False)
    baseline = None
    if steering.compare:
        baseline = (rows.choices(n, True), rows.usage(prompt_tokens, n, True))
    _observe(metrics, endpoint, t0, first, usage.completion_tokens)
    return r.completion_response(meta, rows.choices(n, False), usage, rows.safety(safety, steering, n), baseline)


async def _stream(backend, metrics, prepared: list[Prepared], meta, safety, include_usage: bool, endpoint: str,
                  include_baseline: bool = False) -> AsyncIterator[str]:
    t0 = time.perf_counter()
    rows = _Rows.of(prepared)
    n, first, started = rows.n, None, set()
    steering, prompt_tokens = prepared[0].steering, sum(len(q.prompt_ids) for q in prepared)
    try:
        async with aclosing(_events(backend, prepared)) as events:
            async for ev in events:
                text = rows.add(ev)
                if not text and ev.finish_reason is None:
                    continue
                finish = ev.finish_reason if ev.finish_reason != "cancelled" else None
                if ev.baseline:
                    if include_baseline:
                        role = None if (ev.index, True) in started else "assistant"
                        started.add((ev.index, True))
                        yield r.sse_line(r.baseline_chunk(meta, ev.index, role=role, content=text,
                                                          finish_reason=finish,
                                                          logprobs=rows.unsent_logprobs(meta.kind, (ev.index, True))))
                    continue
                if first is None:
                    first = time.perf_counter() - t0
                lp = rows.unsent_logprobs(meta.kind, (ev.index, False))
                if meta.kind == "chat":
                    role = None if ev.index in started else "assistant"
                    started.add(ev.index)
                    chunk = r.chat_chunk(meta, ev.index, role=role, content=text, finish_reason=finish,
                                         logprobs=lp)
                else:
                    chunk = r.completion_chunk(meta, ev.index, text=text, finish_reason=finish, logprobs=lp)
                yield r.sse_line(chunk)
    except APIError as e:
        yield sse_error_line(e)
        yield r.SSE_DONE
        return
    usage = rows.usage(prompt_tokens, n, False)
    baseline = None
    if steering.compare:
        baseline = (rows.choices(n, True), rows.usage(prompt_tokens, n, True))
    _observe(metrics, endpoint, t0, first, usage.completion_tokens)
    yield r.sse_line(r.final_chunk(meta, usage if include_usage else None, rows.safety(safety, steering, n), baseline))
    yield r.SSE_DONE


def _observe(metrics: Metrics, endpoint: str, t0: float, ttft: float | None, completion_tokens: int) -> None:
    metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
    if ttft is not None:
        metrics.ttft.labels(endpoint).observe(ttft)
    metrics.completion_tokens.inc(completion_tokens)
