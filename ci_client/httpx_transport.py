"""The httpx side of the client's transport seam (see ci_client.transport for when it is used).

Imported only when needed: httpx costs `ci` about 0.1 s to import (issue #10).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx

from ci_client.transport import Answer, ConnectFailed, StreamingAnswer, TransportError


class HttpxTransport:
    """Sends requests through an httpx.Client."""

    def __init__(self, client: httpx.Client) -> None:
        self._client = client

    def send(self, method: str, url: str, headers: Mapping[str, str],
             body: bytes | None) -> Answer:
        with _translated():
            response = self._client.request(method, url, headers=dict(headers), content=body)
        return _answer(response, method, urlsplit(url).path)

    @contextmanager
    def stream(self, method: str, url: str,
               headers: Mapping[str, str]) -> Iterator[StreamingAnswer]:
        with _translated():
            response = self._client.send(
                self._client.build_request(method, url, headers=dict(headers)), stream=True)
        try:
            yield _HttpxStream(response, method, urlsplit(url).path)
        finally:
            response.close()

    def close(self) -> None:
        self._client.close()


class _HttpxStream:
    """An httpx answer read as it arrives (see ci_client.transport.StreamingAnswer)."""

    def __init__(self, response: httpx.Response, method: str, path: str) -> None:
        self._response = response
        self._method = method
        self._path = path
        self.status_code = response.status_code
        self.headers = {name.lower(): value for name, value in response.headers.items()}

    def read(self) -> Answer:
        with _translated():
            self._response.read()
        return _answer(self._response, self._method, self._path)

    def iter_bytes(self) -> Iterator[bytes]:
        with _translated():
            yield from self._response.iter_bytes()


@contextmanager
def _translated() -> Iterator[None]:
    """httpx's transport errors as the seam's (ConnectFailed, TransportError)."""
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise ConnectFailed(describe(exc)) from exc
    except httpx.TransportError as exc:
        raise TransportError(describe(exc)) from exc


def _answer(response: httpx.Response, method: str, path: str) -> Answer:
    return Answer(response.status_code,
                  {name.lower(): value for name, value in response.headers.items()},
                  response.content, method, path)


def describe(exc: httpx.TransportError) -> str:
    """A short name for a transport failure: `read timeout`, `connection refused`, …"""
    if isinstance(exc, httpx.TimeoutException):
        return "read timeout" if isinstance(exc, httpx.ReadTimeout) else "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "cannot connect"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "connection closed by the server"
    return type(exc).__name__
