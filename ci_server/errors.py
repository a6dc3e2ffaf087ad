"""The one place where errors become HTTP answers: `{"detail": "<one line>"}` with a status code.

    CIError subclass          status   extra header
    NotFound                  404
    InvalidInput (Archive…)   400
    TooLarge                  413
    Conflict, AlreadyExists   409
    AuthenticationError       401      WWW-Authenticate: Bearer
    RateLimited               429      Retry-After (when known)
    NotStarted                503
    DatabaseUnavailable       503
    any other CIError         500
    request validation        422      (FastAPI's own errors, squeezed into one line)
    anything unexpected       500      "internal server error (request id …)"

Every answer carries `X-Request-ID` (ci_server.request_ids); a 500's detail names it too, and
the one log line about the failure, traceback included, starts with it. `RequestBoundary` has
the last word on every request: an unexpected error ends there, answered, so neither Starlette
nor uvicorn logs it a second time; a client that goes away is routine, not an error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ci_common.errors import (
    AlreadyExists,
    AuthenticationError,
    CIError,
    Conflict,
    DatabaseUnavailable,
    InvalidInput,
    NotFound,
    RateLimited,
    TooLarge,
)
from ci_server.request_ids import REQUEST_ID_HEADER, assign_request_id, request_id_of

logger = logging.getLogger(__name__)

class NotStarted(CIError):
    """A request arrived before the lifespan opened the repository (or after it closed it)."""

    default_message = "the server is starting or stopping; try again"


# First match wins, so subclasses come before their bases.
STATUS_BY_ERROR: tuple[tuple[type[CIError], int], ...] = (
    (NotFound, 404),
    (InvalidInput, 400),
    (TooLarge, 413),
    (Conflict, 409),
    (AlreadyExists, 409),
    (AuthenticationError, 401),
    (RateLimited, 429),
    (NotStarted, 503),
    (DatabaseUnavailable, 503),
)
MAX_DETAIL_CHARS = 500
INTERNAL_ERROR = "internal server error"
CLIENT_GONE = "the client closed the connection before the request was complete"


class AddressRateLimited(RateLimited):
    """Too many failed authentications from one client address; says when to retry."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"too many failed authentication attempts; try again in {retry_after_s} s")
        self.retry_after_s = retry_after_s


def status_for(exc: CIError) -> int:
    """The HTTP status code for a domain error."""
    for error_type, status in STATUS_BY_ERROR:
        if isinstance(exc, error_type):
            return status
    return 500


def headers_for(exc: CIError) -> dict[str, str]:
    """Headers an HTTP client needs to react to the error (RFC 6750, RFC 9110)."""
    if isinstance(exc, AuthenticationError):
        return {"WWW-Authenticate": "Bearer"}
    retry_after = getattr(exc, "retry_after_s", None)
    if isinstance(exc, RateLimited) and retry_after is not None:
        return {"Retry-After": str(retry_after)}
    return {}


def one_line(text: object) -> str:
    """Collapse whitespace so a detail is always one line, and keep it short."""
    line = " ".join(str(text).split())
    return line if len(line) <= MAX_DETAIL_CHARS else line[:MAX_DETAIL_CHARS - 1] + "…"


def validation_detail(errors: Sequence[Any]) -> str:
    """FastAPI's list of validation errors as one line, e.g. "invalid query.limit: …"."""
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    detail = f"invalid {where}: {first.get('msg', 'invalid value')}" if where else \
        f"invalid request: {first.get('msg', 'invalid value')}"
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more)"
    return one_line(detail)


def error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": one_line(detail)}, status_code=status, headers=headers)


def with_request_id(detail: str, request_id: str) -> str:
    """A 500's detail: what the user quotes when reporting it leads to the log line."""
    return f"{detail} (request id {request_id})"


async def handle_ci_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CIError)
    status = status_for(exc)
    if status != 500:
        return error_response(status, exc.message, headers_for(exc))
    request_id = request_id_of(request)
    logger.error("request %s: %s %s failed: %s", request_id, request.method, request.url.path,
                 exc.message)
    return error_response(status, with_request_id(exc.message, request_id), headers_for(exc))


async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, validation_detail(exc.errors()))


async def handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers) if exc.headers else None
    return error_response(exc.status_code, str(exc.detail), headers)


def is_client_gone(exc: BaseException) -> bool:
    """Whether an exception only says that the client closed the connection."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_client_gone(inner) for inner in exc.exceptions)
    return isinstance(exc, anyio.BrokenResourceError | anyio.ClosedResourceError | ClientDisconnect)


class ResponseWatch:
    """An ASGI `send` that adds the request id header and notes how far the response got."""

    def __init__(self, send: Send, request_id: str) -> None:
        self._send = send
        self.request_id = request_id
        self.started = False
        self.completed = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            header = (REQUEST_ID_HEADER.lower().encode(), self.request_id.encode())
            message = {**message, "headers": [*message.get("headers", ()), header]}
        elif message["type"] == "http.response.body":
            self.completed = not message.get("more_body", False)
        await self._send(message)


class RequestBoundary:
    """ASGI middleware around the whole app: gives each request its id, and has the last word.

    - The id goes into the scope (for handlers and log lines) and the `X-Request-ID` header.
    - A client that went away is routine: before the response started (an upload cut short) it
      is one INFO line; after it (Ctrl-C on `ci wait`) a DEBUG one. FastAPI's SSE keep-alive
      task can raise BrokenResourceError when that happens (fastapi discussion #15725).
    - Anything else is logged here once, with its traceback and the request id, and answered
      500. It goes no further: Starlette's ServerErrorMiddleware re-raises what it handles, and
      uvicorn would log the same traceback again.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response = ResponseWatch(send, assign_request_id(scope))
        try:
            await self.app(scope, receive, response)
        except Exception as exc:
            await self._end(scope, receive, response, exc)

    async def _end(self, scope: Scope, receive: Receive, response: ResponseWatch,
                   exc: Exception) -> None:
        where = f"request {response.request_id}: {scope.get('method')} {scope.get('path')}"
        if is_client_gone(exc):
            if response.started:
                logger.debug("%s: the client went away mid-response", where)
                return
            logger.info("%s: the client went away before sending the whole request", where)
            # Nobody reads this answer (uvicorn drops it); it keeps the ASGI exchange whole for
            # servers that would complain about a request left unanswered.
            await error_response(400, CLIENT_GONE)(scope, receive, response)
            return
        logger.error("%s failed", where, exc_info=exc)
        if not response.started:
            detail = with_request_id(INTERNAL_ERROR, response.request_id)
            await error_response(500, detail)(scope, receive, response)
        elif not response.completed:
            # Too late for a status: end the body, or uvicorn would log the response left open.
            # An event stream without its `end` event makes the client reconnect, so ending it
            # cleanly hides nothing from it.
            await response({"type": "http.response.body", "body": b"", "more_body": False})


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on an app (create_app calls this once)."""
    app.add_middleware(RequestBoundary)
    app.add_exception_handler(CIError, handle_ci_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
