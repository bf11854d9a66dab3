"""The OpenAI-compatible FastAPI app. Routes turn wire requests into engine types once (protocol.py),
hand them to the backend, and turn its row events back into OpenAI bodies or SSE chunks."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server import backends
from server import protocol as p
from server import responses as r
from server.backends.base import Backend, Prepared
from server.errors import APIError, install_error_handlers, sse_error_line
from server.metrics import Metrics, strength_bucket
from server.settings import Settings

log = logging.getLogger("steer.server")


class StartupError(RuntimeError):
    """The server cannot start with these settings (one-line message for the CLI)."""


def create_app(settings: Settings, backend: Backend | None = None, metrics: Metrics | None = None) -> FastAPI:
    metrics = metrics or Metrics()
    if backend is None:
        backend = backends.get(settings.backend)(settings, metrics=metrics)
    if not backend.vector_kinds() and settings.default_strength > 0:
        raise StartupError(
            "no safety vectors are loaded, so the default strength cannot be applied: "
            "pass --vectors DIR, or --default-strength 0 to serve the unsteered model"
        )

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
    _install_metrics_middleware(app, metrics)
    auth = _auth_dependency(settings)

    @app.get("/health")
    async def health():
        if backend.healthy():
            return {"status": "ok"}
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {
            "object": "list",
            "data": [{"id": backend.model_name, "object": "model", "created": 0, "owned_by": "steer"}],
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
    async def chat(req: p.ChatCompletionRequest):
        return await _complete(backend, settings, metrics, req, "chat")

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(req: p.CompletionRequest):
        return await _complete(backend, settings, metrics, req, "text")

    return app


def _auth_dependency(settings: Settings):
    async def check(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), settings.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    return check


def _install_metrics_middleware(app: FastAPI, metrics: Metrics) -> None:
    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        path = request.url.path
        if path.startswith("/v1/") or path in ("/health",):
            metrics.requests.labels(path, str(response.status_code)).inc()
        return response


async def _complete(backend: Backend, settings: Settings, metrics: Metrics, req, kind: r.Kind):
    if req.model is not None and req.model != backend.model_name:
        raise APIError(
            404, f"model {req.model!r} is not served here; served: {backend.model_name}",
            param="model", code="model_not_found",
        )
    inp, spec = p.resolve(req, settings, backend.vector_kinds(), backend.default_vector())
    prepared = await backend.prepare(inp, spec)
    meta = r.ResponseMeta.new(kind, backend.model_name)
    vkind = backend.vector_kinds().get(spec.vector)
    safety = r.safety_info(spec, vkind)
    metrics.prompt_tokens.inc(len(prepared.prompt_ids))
    metrics.steered.labels(spec.vector or "none", strength_bucket(spec.strength)).inc()
    if spec.compare:
        metrics.compare.inc()
    endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    if req.stream:
        gen = _stream(backend, metrics, prepared, meta, safety, req.include_usage, endpoint)
        return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _collect(backend, metrics, prepared, meta, safety, endpoint)


class _Rows:
    """Accumulates row texts, finish reasons and token counts for steered and baseline rows."""

    def __init__(self, n: int):
        self.text = {(i, b): "" for i in range(n) for b in (False, True)}
        self.finish: dict[tuple[int, bool], str] = {}
        self.tokens = {(i, b): 0 for i in range(n) for b in (False, True)}

    def add(self, ev) -> None:
        key = (ev.index, ev.baseline)
        self.text[key] += ev.text
        self.tokens[key] = ev.n_tokens
        if ev.finish_reason:
            self.finish[key] = ev.finish_reason

    def choices(self, n: int, baseline: bool) -> list[r.Choice]:
        return [r.Choice(self.text[(i, baseline)], self.finish.get((i, baseline), "stop")) for i in range(n)]

    def usage(self, prompt: int, n: int, baseline: bool) -> r.Usage:
        return r.Usage(prompt, sum(self.tokens[(i, baseline)] for i in range(n)))


async def _collect(backend, metrics, prepared: Prepared, meta, safety, endpoint: str):
    t0 = time.perf_counter()
    n, rows, first = prepared.inp.n, _Rows(prepared.inp.n), None
    async with aclosing(backend.generate(prepared)) as events:
        async for ev in events:
            if first is None and not ev.baseline:
                first = time.perf_counter() - t0
            rows.add(ev)
    usage = rows.usage(len(prepared.prompt_ids), n, False)
    baseline = None
    if prepared.steering.compare:
        baseline = (rows.choices(n, True), rows.usage(len(prepared.prompt_ids), n, True))
    _observe(metrics, endpoint, t0, first, usage.completion_tokens)
    return r.completion_response(meta, rows.choices(n, False), usage, safety, baseline)


async def _stream(backend, metrics, prepared: Prepared, meta, safety, include_usage: bool, endpoint: str
                  ) -> AsyncIterator[str]:
    t0 = time.perf_counter()
    n, rows, first, started = prepared.inp.n, _Rows(prepared.inp.n), None, set()
    try:
        async with aclosing(backend.generate(prepared)) as events:
            async for ev in events:
                rows.add(ev)
                if ev.baseline or (not ev.text and ev.finish_reason is None):
                    continue
                if first is None:
                    first = time.perf_counter() - t0
                finish = ev.finish_reason if ev.finish_reason != "cancelled" else None
                if meta.kind == "chat":
                    role = None if ev.index in started else "assistant"
                    started.add(ev.index)
                    chunk = r.chat_chunk(meta, ev.index, role=role, content=ev.text, finish_reason=finish)
                else:
                    chunk = r.completion_chunk(meta, ev.index, text=ev.text, finish_reason=finish)
                yield r.sse_line(chunk)
    except APIError as e:
        yield sse_error_line(e)
        yield r.SSE_DONE
        return
    usage = rows.usage(len(prepared.prompt_ids), n, False)
    baseline = None
    if prepared.steering.compare:
        baseline = (rows.choices(n, True), rows.usage(len(prepared.prompt_ids), n, True))
    _observe(metrics, endpoint, t0, first, usage.completion_tokens)
    yield r.sse_line(r.final_chunk(meta, usage if include_usage else None, safety, baseline))
    yield r.SSE_DONE


def _observe(metrics: Metrics, endpoint: str, t0: float, ttft: float | None, completion_tokens: int) -> None:
    metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
    if ttft is not None:
        metrics.ttft.labels(endpoint).observe(ttft)
    metrics.completion_tokens.inc(completion_tokens)
