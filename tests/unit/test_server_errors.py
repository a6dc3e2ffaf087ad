"""ci_server.errors: the status mapping, one-line details, and the request boundary."""

from __future__ import annotations

import asyncio
import json
import logging

import anyio
import pytest
from starlette.types import Message

from ci_common.errors import (
    AlreadyExists,
    AuthenticationError,
    CIError,
    Conflict,
    InvalidArchive,
    InvalidInput,
    NotFound,
    RateLimited,
    ServerError,
    TooLarge,
)
from ci_server.errors import (
    AddressRateLimited,
    NotStarted,
    RequestBoundary,
    headers_for,
    is_client_gone,
    one_line,
    status_for,
    validation_detail,
)


@pytest.mark.parametrize(("error", "status"), [
    (NotFound(), 404), (InvalidInput(), 400), (InvalidArchive(), 400), (TooLarge(), 413),
    (Conflict(), 409), (AlreadyExists(), 409), (AuthenticationError(), 401),
    (RateLimited(), 429), (AddressRateLimited(7), 429), (NotStarted(), 503),
    (ServerError(), 500), (CIError(), 500),
])
def test_status_for(error: CIError, status: int) -> None:
    assert status_for(error) == status


def test_headers_for() -> None:
    assert headers_for(AuthenticationError()) == {"WWW-Authenticate": "Bearer"}
    assert headers_for(AddressRateLimited(12)) == {"Retry-After": "12"}
    assert headers_for(RateLimited()) == {}
    assert headers_for(NotFound()) == {}


def test_one_line() -> None:
    assert one_line("a\n  b\r\n\tc") == "a b c"
    assert len(one_line("x" * 2000)) == 500


def test_validation_detail() -> None:
    errors = [{"loc": ("query", "limit"), "msg": "Input should be greater than 0"},
              {"loc": ("query", "offset"), "msg": "bad"}]
    assert validation_detail(errors) == \
        "invalid query.limit: Input should be greater than 0 (and 1 more)"
    assert validation_detail([{"loc": (), "msg": "nope"}]) == "invalid request: nope"
    assert validation_detail([]) == "invalid request"


def test_is_client_gone() -> None:
    assert is_client_gone(anyio.BrokenResourceError())
    assert is_client_gone(ExceptionGroup("g", [anyio.BrokenResourceError(),
                                              anyio.ClosedResourceError()]))
    assert not is_client_gone(ExceptionGroup("g", [anyio.BrokenResourceError(), ValueError()]))
    assert not is_client_gone(RuntimeError("boom"))


def run_app(fail: BaseException, start_first: bool, end_body: bool = False,
            headers: list[tuple[bytes, bytes]] | None = None) -> list[Message]:
    """The messages RequestBoundary sends for an app that fails with `fail`."""
    sent: list[Message] = []

    async def app(scope: object, receive: object, send: object) -> None:
        if start_first:
            await send({"type": "http.response.start", "status": 200,  # type: ignore[operator]
                        "headers": []})
        if end_body:
            await send({"type": "http.response.body", "body": b"x"})  # type: ignore[operator]
        raise fail

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/x", "headers": headers or []}
    asyncio.run(RequestBoundary(app)(scope, receive, send))
    return sent


def ours(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "ci_server.errors"]


def body_of(sent: list[Message]) -> dict[str, str]:
    body: dict[str, str] = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    return body


def request_id_header(sent: list[Message]) -> str:
    return dict(sent[0]["headers"])[b"x-request-id"].decode()


def test_client_gone_after_the_response_started_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    gone = ExceptionGroup("tg", [anyio.BrokenResourceError()])
    assert [m["type"] for m in run_app(gone, start_first=True)] == ["http.response.start"]
    assert [r.levelno for r in ours(caplog)] == [logging.DEBUG]


def test_client_gone_before_the_response_started_is_one_info_line(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sent = run_app(ExceptionGroup("tg", [anyio.BrokenResourceError()]), start_first=False)
    assert sent[0]["status"] == 400
    [record] = ours(caplog)
    assert record.levelno == logging.INFO and record.exc_info is None
    assert "GET /x: the client went away" in record.getMessage()


def test_an_unexpected_error_is_answered_500_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    sent = run_app(ZeroDivisionError("boom"), start_first=False)
    request_id = request_id_header(sent)
    assert sent[0]["status"] == 500
    assert body_of(sent) == {"detail": f"internal server error (request id {request_id})"}
    [record] = ours(caplog)
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert record.getMessage() == f"request {request_id}: GET /x failed"


def test_an_error_mid_stream_ends_the_body_and_is_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    sent = run_app(ZeroDivisionError(), start_first=True)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[-1]["more_body"] is False
    assert len([r for r in caplog.records if r.exc_info]) == 1


def test_an_error_after_the_response_ended_sends_nothing_more() -> None:
    sent = run_app(ZeroDivisionError(), start_first=True, end_body=True)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


def test_cancellation_is_not_caught() -> None:
    with pytest.raises(BaseExceptionGroup):
        run_app(BaseExceptionGroup("tg", [asyncio.CancelledError()]), start_first=True)


@pytest.mark.parametrize(("incoming", "kept"), [
    ("abc-123", True), ("lb.7f3a:9_x", True), ("x" * 64, True),
    ("x" * 65, False), ("has space", False), ("-leading", False), ("ünï", False), ("", False),
])
def test_an_incoming_request_id_is_kept_only_when_sane(incoming: str, kept: bool) -> None:
    sent = run_app(ZeroDivisionError(), start_first=False,
                   headers=[(b"x-request-id", incoming.encode("latin-1", "replace"))])
    chosen = request_id_header(sent)
    assert (chosen == incoming) is kept
    assert len(chosen) <= 64
