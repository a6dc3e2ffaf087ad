"""The httpx side of the client's transport seam (see ci_client.transport for when it is used).

Imported only when needed: httpx costs `ci` about 0.1 s to import (issue #10).
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

import httpx

from ci_client.transport import Answer, ConnectFailed, TransportError


class HttpxTransport:
    """Sends plain requests through an httpx.Client (the one the event stream uses too)."""

    def __init__(self, client: httpx.Client) -> None:
        self._client = client

    def send(self, method: str, url: str, headers: Mapping[str, str],
             body: bytes | None) -> Answer:
        try:
            response = self._client.request(method, url, headers=dict(headers), content=body)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ConnectFailed(describe(exc)) from exc
        except httpx.TransportError as exc:
            raise TransportError(describe(exc)) from exc
        return Answer(response.status_code,
                      {name.lower(): value for name, value in response.headers.items()},
                      response.content, method, urlsplit(url).path)

    def close(self) -> None:
        self._client.close()


def describe(exc: httpx.TransportError) -> str:
    """A short name for a transport failure: `read timeout`, `connection refused`, …"""
    if isinstance(exc, httpx.TimeoutException):
        return "read timeout" if isinstance(exc, httpx.ReadTimeout) else "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "cannot connect"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "connection closed by the server"
    return type(exc).__name__
