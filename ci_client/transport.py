"""How the client sends a request and reads its answer, whole or as a stream.

    Transport                                  the seam: two methods
    ├── send(method, url, headers, body) → Answer          a whole answer
    ├── stream(method, url, headers) → StreamingAnswer     its head, then its body as it comes
    ├── PlainTransport   the standard library's http.client: plain http:// without a proxy
    └── HttpxTransport   httpx (ci_client.httpx_transport): https://, proxies, test transports

Importing httpx costs `ci` about as much as its whole start-up budget (issue #10); http.client
is mostly loaded with the standard library anyway. So a command that only talks plain HTTP to
its servers (`ci list`, `ci submit test` with its event stream, `ci wait`, `ci show`…) uses
PlainTransport, and httpx is imported only where it earns its cost: TLS (and so an SSL
context, created only for https URLs), proxies from the environment and tests that hand the
client an httpx transport. `choose_plain` is that decision, a pure function. Both read an event
stream's bytes the same way (ci_client.events.iter_sse).

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")
STREAM_READ_BYTES = 65536  # at most this much of a stream per read; less as soon as it arrives

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


class StreamingAnswer(Protocol):
    """An answer whose head has arrived and whose body is read as it comes."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]:
        """Names in lower case."""
        ...

    def read(self) -> Answer:
        """The rest of the body, whole (for an error answer); TransportError if it breaks."""
        ...

    def iter_bytes(self) -> Iterator[bytes]:
        """The body in pieces as they arrive, until it ends; TransportError if it breaks
        (`read timeout` after the read timeout without a byte)."""
        ...


class Transport(Protocol):
    """Sends one request and reads its answer, whole or as a stream."""

    def send(self, method: str, url: str, headers: Mapping[str, str],
             body: bytes | None) -> Answer:
        """The answer to one request; TransportError (ConnectFailed) when there is none."""
        ...

    def stream(self, method: str, url: str,
               headers: Mapping[str, str]) -> AbstractContextManager[StreamingAnswer]:
        """The answer to one body-less request, open while the context lasts; TransportError
        (ConnectFailed) when none came."""
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
        origin, target, path = _split(url)

        def exchange(conn: http.client.HTTPConnection) -> Answer:
            response = _request(conn, method, target, headers, body)
            content = _reading(conn, response.read)
            if response.will_close:
                conn.close()
            else:
                with self._lock:
                    self._idle.setdefault(origin, []).append(conn)
            return Answer(response.status, _headers(response), content, method, path)

        return self._on_connection(origin, method, exchange)

    @contextmanager
    def stream(self, method: str, url: str,
               headers: Mapping[str, str]) -> Iterator[StreamingAnswer]:
        origin, target, path = _split(url)

        def start(conn: http.client.HTTPConnection) -> tuple[http.client.HTTPConnection,
                                                             http.client.HTTPResponse]:
            return conn, _request(conn, method, target, headers, None)

        conn, response = self._on_connection(origin, method, start)
        try:
            yield _PlainStream(conn, response, method, path)
        finally:
            # Never back to the pool: a stream may be left anywhere (an END event, Ctrl-C).
            # The response first: with `Connection: close` it holds the socket, not conn.
            response.close()
            conn.close()

    def _on_connection(self, origin: tuple[str, int], method: str,
                       attempt: Callable[[http.client.HTTPConnection], T]) -> T:
        """`attempt` on an idle kept-alive connection if there is one, else on a new one."""
        conn = self._take_idle(origin)
        if conn is not None and method == "GET":
            try:
                return attempt(conn)
            except TransportError as exc:
                # The server may close an idle connection just as it is reused; a GET is
                # safe to send once more, on a new one (as urllib3 does).
                if exc.description == "read timeout":
                    raise
                conn = None
        return attempt(conn or self._connect(origin))

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
        host, port = origin
        conn = http.client.HTTPConnection(host, port, timeout=self._connect_timeout_s)
        try:
            # An ASCII host as bytes: getaddrinfo then skips the IDNA codec, whose import
            # (encodings.idna, stringprep, unicodedata) would cost every `ci` command about a
            # millisecond (issue #10). The rest is what HTTPConnection.connect does.
            address = (host.encode() if host.isascii() else host, port)
            sock = socket.create_connection(address,  # type: ignore[arg-type]  # bytes work
                                            self._connect_timeout_s)
        except TimeoutError as exc:
            raise ConnectFailed("timeout") from exc
        except OSError as exc:  # refused, unreachable, unknown host (socket.gaierror)
            raise ConnectFailed("cannot connect") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self._read_timeout_s)  # the connect timeout was for connecting
        conn.sock = sock
        return conn


class _PlainStream:
    """An answer read from its http.client connection as it arrives (see StreamingAnswer)."""

    def __init__(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse,
                 method: str, path: str) -> None:
        self._conn = conn
        self._response = response
        self._method = method
        self._path = path
        self.status_code = response.status
        self.headers = _headers(response)

    def read(self) -> Answer:
        content = _reading(self._conn, self._response.read)
        return Answer(self.status_code, self.headers, content, self._method, self._path)

    def iter_bytes(self) -> Iterator[bytes]:
        while True:
            # read1: what has arrived, without waiting to fill a buffer (each line matters
            # as soon as it comes); b"" once a chunked body ends properly, IncompleteRead
            # when the connection drops mid-stream.
            chunk = _reading(self._conn, lambda: self._response.read1(STREAM_READ_BYTES))
            if not chunk:
                return
            yield chunk


def _split(url: str) -> tuple[tuple[str, int], str, str]:
    """(host, port), the request target and the path of an http:// URL."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"PlainTransport sends to http:// URLs only, not {url!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return (parts.hostname, parts.port or 80), target, parts.path


def _request(conn: http.client.HTTPConnection, method: str, target: str,
             headers: Mapping[str, str], body: bytes | None) -> http.client.HTTPResponse:
    """Send the request and read the answer's head."""
    def send_and_wait() -> http.client.HTTPResponse:
        conn.request(method, target, body=body, headers=dict(headers))
        return conn.getresponse()
    return _reading(conn, send_and_wait)


def _reading(conn: http.client.HTTPConnection, read: Callable[[], T]) -> T:
    """`read()`, with a failure closing the connection and becoming a TransportError."""
    try:
        return read()
    except TimeoutError as exc:
        conn.close()
        raise TransportError("read timeout") from exc
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise TransportError("connection closed by the server") from exc


def _headers(response: http.client.HTTPResponse) -> dict[str, str]:
    """The answer's headers, names in lower case, repeated ones joined with commas."""
    headers: dict[str, str] = {}
    for name, value in response.getheaders():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def _still_open(sock: socket.socket) -> bool:
    """An idle kept-alive connection is usable only while it has nothing to read: a readable
    one was closed by the server (its keep-alive ran out) or holds stray bytes."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable
