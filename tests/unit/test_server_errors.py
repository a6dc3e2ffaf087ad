"""ci_server.errors: the status mapping, one-line details, and the client-gone filter."""

from __future__ import annotations

import asyncio

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
    IgnoreClientGone,
    NotStarted,
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


def run_app(fail: BaseException, start_first: bool) -> list[Message]:
    sent: list[Message] = []

    async def app(scope: object, receive: object, send: object) -> None:
        if start_first:
            await send({"type": "http.response.start", "status": 200,  # type: ignore[operator]
                        "headers": []})
        raise fail

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(IgnoreClientGone(app)({"type": "http", "path": "/x"}, receive, send))
    return sent


def test_client_gone_after_the_response_started_is_swallowed() -> None:
    gone = ExceptionGroup("tg", [anyio.BrokenResourceError()])
    assert [m["type"] for m in run_app(gone, start_first=True)] == ["http.response.start"]


def test_client_gone_before_the_response_started_propagates() -> None:
    with pytest.raises(ExceptionGroup):
        run_app(ExceptionGroup("tg", [anyio.BrokenResourceError()]), start_first=False)


def test_real_errors_propagate_even_mid_stream() -> None:
    with pytest.raises(ZeroDivisionError):
        run_app(ZeroDivisionError(), start_first=True)
