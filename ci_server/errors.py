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
    anything unexpected       500      "internal server error" (traceback to the log only)

A client that goes away mid-stream is not an error: `IgnoreClientGone` keeps the log quiet.
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


async def handle_ci_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CIError)
    status = status_for(exc)
    if status == 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, exc.message)
    return error_response(status, exc.message, headers_for(exc))


async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, validation_detail(exc.errors()))


async def handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers) if exc.headers else None
    return error_response(exc.status_code, str(exc.detail), headers)


async def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("%s %s failed", request.method, request.url.path)
    return error_response(500, "internal server error")


def is_client_gone(exc: BaseException) -> bool:
    """Whether an exception only says that the client closed the connection."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_client_gone(inner) for inner in exc.exceptions)
    return isinstance(exc, anyio.BrokenResourceError | anyio.ClosedResourceError | ClientDisconnect)


class IgnoreClientGone:
    """ASGI middleware: a client leaving after the response started is routine, not a crash.

    FastAPI's SSE keep-alive task can raise BrokenResourceError when the client disconnects
    while an event is being sent (fastapi discussion #15725); uvicorn would log a traceback
    for every `ci wait` interrupted with Ctrl-C.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except BaseException as exc:
            if not (started and is_client_gone(exc)):
                raise
            logger.debug("%s: client went away mid-response", scope.get("path"))


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on an app (create_app calls this once)."""
    app.add_middleware(IgnoreClientGone)
    app.add_exception_handler(CIError, handle_ci_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
    app.add_exception_handler(Exception, handle_unexpected)
