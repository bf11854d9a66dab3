"""One error envelope for every failure: ``{"error": {"message", "type", "param", "code"}}``.

Exceptions map to the envelope by type, never by message text. Validation failures are 400 (OpenAI
clients expect 400, not FastAPI's 422), and a traceback is logged, never sent: a 5xx body is a generic
message with the request id, and the log line with the detail carries the same id.
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
INVALID_JSON_MESSAGE = "request body is not valid JSON"
# The first element of a FastAPI validation loc says where the value came from, not which field it is.
_LOC_SOURCES = ("body", "query", "path", "header", "cookie")


# The id of the request being served (set by the app's request-id middleware); errors and logs quote it.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("steer_request_id", default=None)


REQUEST_ID_HEADER = "X-Request-Id"


def current_request_id() -> str:
    return REQUEST_ID.get() or "unknown"


def request_id_of(request: Request) -> str:
    """The id the middleware gave ``request`` (the contextvar is already reset where Starlette's
    outermost middleware runs the 500 handler, the request's state is not)."""
    return getattr(request.state, "request_id", None) or current_request_id()


def with_request_id(message: str, rid: str) -> str:
    """A 5xx message always carries the request id, so a user's report can be matched to the log."""
    return message if rid in message else f"{message} (request id {rid})"


class BodyTooLarge(StarletteHTTPException):
    """The request body is over ``--max-request-bytes``. An HTTPException because FastAPI re-raises those
    when they come out of reading the body (any other error there becomes a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than {limit} bytes (the server's --max-request-bytes)")


class APIError(Exception):
    """A failure to report to the client with an HTTP status and the OpenAI error envelope."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers) if headers else None

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = INVALID_REQUEST, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def sse_error_line(err: APIError) -> str:
    """One Server-Sent Events line reporting a failure after the stream has started."""
    body = err.body()
    if err.status_code >= 500:
        body["error"]["message"] = with_request_id(err.message, current_request_id())
    return f"data: {json.dumps(body)}\n\n"


def validation_error_to_api_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """Turn pydantic/FastAPI validation errors into one 400 naming the first offending field."""
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, INVALID_JSON_MESSAGE)
    param = _param_from_loc(first.get("loc", ()))
    message = _describe(first, param)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return APIError(400, message, param=param)


def _param_from_loc(loc: Sequence[Any]) -> str | None:
    parts = list(loc)
    if parts and parts[0] in _LOC_SOURCES:
        parts = parts[1:]
    return ".".join(str(p) for p in parts) or None


def _describe(err: Mapping[str, Any], param: str | None) -> str:
    kind = err.get("type")
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if param is None:
        if kind == "missing":
            return "request body is required"
        if isinstance(err.get("input"), bytes | bytearray):
            # FastAPI hands over raw bytes when the Content-Type is not JSON (e.g. curl -d's default).
            return "request body must be a JSON object sent with 'Content-Type: application/json'"
        return f"request body: {msg}"
    if kind == "missing":
        return f"'{param}' is required"
    if kind == "extra_forbidden":
        return f"unknown field '{param}'"
    return f"'{param}': {msg}"


def _json_response(
    status_code: int, body: dict[str, Any], headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(status_code=status_code, content=body, headers=dict(headers) if headers else None)


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    body = exc.body()
    if exc.status_code >= 500:
        body["error"]["message"] = with_request_id(exc.message, request_id_of(request))
    return _json_response(exc.status_code, body, exc.headers)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    err = validation_error_to_api_error(exc.errors())
    return _json_response(err.status_code, err.body())


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = str(exc.detail)
    if exc.status_code in (404, 405):  # say which route, the bare "Not Found" helps nobody
        message = f"{message}: {request.method} {request.url.path}"
    kind = INVALID_REQUEST
    if exc.status_code >= 500:
        kind, message = SERVER_ERROR, with_request_id(message, request_id_of(request))
    return _json_response(exc.status_code, error_body(message, type=kind), exc.headers)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The detail (paths, values, library internals) goes to the log only; the client gets the id to
    # quote, which finds the log line.
    rid = request_id_of(request)
    logger.error("request %s: unhandled error on %s %s", rid, request.method, request.url.path, exc_info=exc)
    body = error_body(f"internal error (request id {rid})", type=SERVER_ERROR)
    # Starlette sends this response from outside every middleware, so the id header is set here.
    return _json_response(500, body, {REQUEST_ID_HEADER: rid})


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure in ``app`` through the error envelope."""
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    # Starlette sends this from its outermost middleware and then re-raises for the server to log.
    app.add_exception_handler(Exception, _on_unexpected)
