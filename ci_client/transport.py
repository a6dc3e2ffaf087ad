"""How the client sends one plain request (everything but the event stream), and gets its answer.

    Transport.send(method, url, headers, body) → Answer       the seam, one method
    ├── PlainTransport   the standard library's http.client: plain http:// without a proxy
    └── HttpxTransport   httpx (ci_client.httpx_transport): https://, proxies, test transports

Importing httpx costs `ci` about as much as its whole start-up budget (issue #10); http.client
is mostly loaded with the standard library anyway. So a command that only talks plain HTTP to
its servers (`ci list`, the upload of `ci submit test`, `ci show`…) uses PlainTransport, and
httpx is imported only where it earns its cost: TLS (and so an SSL context, created only for
https URLs), proxies from the environment, the event stream (httpx_sse) and tests that hand
the client an httpx transport. `choose_plain` is that decision, a pure function.

Errors, each with a short `description` for messages:

    TransportError        the request failed on the way (reset, closed, read timeout)
    └── ConnectFailed     nothing reached the server (refused, unknown host, connect timeout):
                          always safe to try another server URL
"""

from __future__ import annotations

import http.client
import os
import select
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

# Any of these may route plain-http requests through a proxy: then httpx, which honours them
# (and NO_PROXY), sends the request, as it always did.
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")


class TransportError(Exception):
    """A request failed on the way; `description` names how (`read timeout`, …)."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class ConnectFailed(TransportError):
    """No connection to the server: the request never left, trying elsewhere is safe."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete HTTP answer: status, headers (names in lower case) and body."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes
    method: str  # of the request, for messages
    path: str

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not."""
        import json  # noqa: PLC0415 - only answers with a body need it

        return json.loads(self.content)


class Transport(Protocol):
    """Sends one request and reads its whole answer."""

    def send(self, method: str, url: str, headers: Mapping[str, str],
             body: bytes | None) -> Answer:
        """The answer to one request; TransportError (ConnectFailed) when there is none."""
        ...

    def close(self) -> None:
        """Release its connections."""
        ...


def choose_plain(urls: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Whether PlainTransport can serve these servers: all plain http, and no proxy set."""
    return (all(url.startswith("http://") for url in urls)
            and not any(environ.get(name) for name in PROXY_VARIABLES))


def encode_multipart(fields: Mapping[str, str],
                     files: Mapping[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type (fields first, then the files)."""
    boundary = os.urandom(16).hex()
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                     .encode() + value.encode() + b"\r\n")
    for name, (filename, content, content_type) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                     f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'.encode()
                     + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class PlainTransport:
    """http.client over kept-alive connections, one pool per host; safe to share by threads."""

    def __init__(self, connect_timeout_s: float, read_timeout_s: float) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._idle: dict[tuple[str, int], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def send(self, method: str, url: str, headers: Mapping[str, str],
             body: bytes | None) -> Answer:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"PlainTransport sends to http:// URLs only, not {url!r}")
        origin = (parts.hostname, parts.port or 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn = self._take_idle(origin)
        if conn is not None and method == "GET":
            try:
                return self._exchange(conn, origin, method, target, headers, body, parts.path)
            except TransportError as exc:
                # The server may close an idle connection just as it is reused; a GET is
                # safe to send once more, on a new one (as urllib3 does).
                if exc.description == "read timeout":
                    raise
                conn = None
        return self._exchange(conn or self._connect(origin), origin, method, target, headers,
                              body, parts.path)

    def _exchange(self, conn: http.client.HTTPConnection, origin: tuple[str, int], method: str,
                  target: str, headers: Mapping[str, str], body: bytes | None,
                  path: str) -> Answer:
        try:
            conn.request(method, target, body=body, headers=dict(headers))
            response = conn.getresponse()
            content = response.read()
        except TimeoutError as exc:
            conn.close()
            raise TransportError("read timeout") from exc
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise TransportError("connection closed by the server") from exc
        answer_headers: dict[str, str] = {}
        for name, value in response.getheaders():
            key = name.lower()
            answer_headers[key] = f"{answer_headers[key]}, {value}" if key in answer_headers \
                else value
        if response.will_close:
            conn.close()
        else:
            with self._lock:
                self._idle.setdefault(origin, []).append(conn)
        return Answer(response.status, answer_headers, content, method, path)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def _take_idle(self, origin: tuple[str, int]) -> http.client.HTTPConnection | None:
        while True:
            with self._lock:
                pool = self._idle.get(origin)
                conn = pool.pop() if pool else None
            if conn is None:
                return None
            if conn.sock is not None and _still_open(conn.sock):
                return conn
            conn.close()

    def _connect(self, origin: tuple[str, int]) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(*origin, timeout=self._connect_timeout_s)
        try:
            conn.connect()
        except TimeoutError as exc:
            conn.close()
            raise ConnectFailed("timeout") from exc
        except OSError as exc:  # refused, unreachable, unknown host (socket.gaierror)
            conn.close()
            raise ConnectFailed("cannot connect") from exc
        assert conn.sock is not None
        conn.sock.settimeout(self._read_timeout_s)  # the connect timeout was for connecting
        return conn


def _still_open(sock: socket.socket) -> bool:
    """An idle kept-alive connection is usable only while it has nothing to read: a readable
    one was closed by the server (its keep-alive ran out) or holds stray bytes."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable
