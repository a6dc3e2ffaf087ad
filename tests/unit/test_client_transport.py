"""PlainTransport (http.client) against real sockets, and when the client chooses it.

A scripted HTTP/1.1 server on a free port stands in for a replica: it can answer, stall, hang
up, or close an idle kept-alive connection, which is what the client's retry and fail-over
rules must tell apart (ConnectFailed: nothing was sent; TransportError: it may have arrived).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import ci_client.transport as transport_module
from ci_client.client import CIClient
from ci_client.transport import (
    ConnectFailed,
    PlainTransport,
    TransportError,
    choose_plain,
    encode_multipart,
)
from ci_common.errors import ServerUnreachable

Handler = Callable[[BaseHTTPRequestHandler], None]


class Scripted:
    """A local HTTP/1.1 server whose every request is answered by `handle`."""

    def __init__(self, handle: Handler) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        self.connections = 0
        script = self

        class RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def setup(self) -> None:
                script.connections += 1
                super().setup()

            def _any(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                script.requests.append((self.command, self.path, self.rfile.read(size)))
                handle(self)

            do_GET = do_POST = _any  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def answer(status: int = 200, body: object = None, close: bool = False) -> Handler:
    def handle(request: BaseHTTPRequestHandler) -> None:
        data = json.dumps(body).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        if close:
            request.send_header("Connection", "close")
        request.end_headers()
        request.wfile.write(data)
    return handle


def hang_up(request: BaseHTTPRequestHandler) -> None:
    request.close_connection = True
    request.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], Scripted]]:
    started: list[Scripted] = []

    def start(handle: Handler) -> Scripted:
        started.append(Scripted(handle))
        return started[-1]
    yield start
    for server in started:
        server.close()


def free_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


HEADERS = {"Authorization": "Bearer ci_x"}


# ------------------------------------------------------------------ choosing
def test_plain_http_without_a_proxy_skips_httpx() -> None:
    assert choose_plain(["http://a:1", "http://b:2"], {})
    assert choose_plain(["http://a:1"], {"HTTPS_PROXY": "http://proxy:3128", "http_proxy": ""})


@pytest.mark.parametrize(("urls", "environ"), [
    (["http://a:1", "https://b"], {}),  # TLS: httpx, and its SSL context only then
    (["http://a:1"], {"http_proxy": "http://proxy:3128"}),
    (["http://a:1"], {"ALL_PROXY": "socks5://proxy:1080"}),
])
def test_https_or_a_proxy_keeps_httpx(urls: list[str], environ: dict[str, str]) -> None:
    assert not choose_plain(urls, environ)


def test_the_client_picks_its_transport_by_url_and_environment() -> None:
    assert CIClient("http://a:1", "ci_x", environ={})._plain is not None
    assert CIClient("https://a:1", "ci_x", environ={})._plain is None
    assert CIClient("http://a:1", "ci_x", environ={"HTTP_PROXY": "http://p:1"})._plain is None


# ------------------------------------------------------------------ PlainTransport
def test_answers_come_back_whole_over_one_kept_alive_connection(serve: Callable[..., Scripted],
                                                                ) -> None:
    server = serve(answer(200, {"ok": True}))
    transport = PlainTransport(5, 5)
    try:
        for _ in range(3):
            got = transport.send("GET", f"{server.url}/jobs?limit=5", HEADERS, None)
            assert (got.status_code, got.json(), got.is_success) == (200, {"ok": True}, True)
            assert got.headers["content-type"] == "application/json"
        body, content_type = encode_multipart({"timeout": "60.0"},
                                              {"archive": ("p.zip", b"PK\x03\x04", "x/y")})
        transport.send("POST", f"{server.url}/jobs", {**HEADERS, "Content-Type": content_type},
                       body)
    finally:
        transport.close()
    assert server.connections == 1
    assert [r[:2] for r in server.requests] == [("GET", "/jobs?limit=5")] * 3 + [("POST", "/jobs")]
    assert server.requests[-1][2] == body


def test_an_idle_connection_the_server_closed_is_not_reused(serve: Callable[..., Scripted],
                                                           ) -> None:
    server = serve(answer(200, {}))
    transport = PlainTransport(5, 5)
    try:
        transport.send("GET", f"{server.url}/a", HEADERS, None)
        idle = transport._idle[("127.0.0.1", int(server.url.rsplit(":", 1)[1]))][0]
        assert idle.sock is not None
        idle.sock.shutdown(socket.SHUT_RD)  # as after the server's keep-alive timeout: EOF
        assert transport.send("GET", f"{server.url}/b", HEADERS, None).status_code == 200
    finally:
        transport.close()
    assert server.connections == 2


def test_a_get_on_a_connection_closed_as_it_is_reused_goes_again_on_a_new_one(
        serve: Callable[..., Scripted], monkeypatch: pytest.MonkeyPatch) -> None:
    # The race the idle check cannot see: the connection dies after the check passed.
    monkeypatch.setattr(transport_module, "_still_open", lambda sock: True)
    server = serve(answer(200, {}))
    transport = PlainTransport(5, 5)
    try:
        transport.send("GET", f"{server.url}/a", HEADERS, None)
        stale = transport._idle[("127.0.0.1", int(server.url.rsplit(":", 1)[1]))][0]
        assert stale.sock is not None
        stale.sock.close()  # closed under it, past the idle check: the send itself fails
        assert transport.send("GET", f"{server.url}/b", HEADERS, None).status_code == 200
        stale = transport._idle[("127.0.0.1", int(server.url.rsplit(":", 1)[1]))][0]
        assert stale.sock is not None
        stale.sock.close()
        with pytest.raises(TransportError):  # a POST is never sent twice
            transport.send("POST", f"{server.url}/jobs", HEADERS, b"zip")
    finally:
        transport.close()
    assert [r[:2] for r in server.requests] == [("GET", "/a"), ("GET", "/b")]


def test_connection_close_answers_are_not_pooled(serve: Callable[..., Scripted]) -> None:
    server = serve(answer(404, {"detail": "job x not found"}, close=True))
    transport = PlainTransport(5, 5)
    got = transport.send("GET", f"{server.url}/jobs/x", HEADERS, None)
    assert (got.status_code, got.is_success) == (404, False)
    assert got.json()["detail"] == "job x not found"
    assert transport._idle == {}


def test_refused_is_connect_failed() -> None:
    with pytest.raises(ConnectFailed) as caught:
        PlainTransport(5, 5).send("GET", f"{free_url()}/jobs", HEADERS, None)
    assert caught.value.description == "cannot connect"


def test_a_stalled_answer_is_a_read_timeout(serve: Callable[..., Scripted]) -> None:
    release = threading.Event()
    server = serve(lambda request: release.wait(5))
    started = time.monotonic()
    try:
        with pytest.raises(TransportError) as caught:
            PlainTransport(5, 0.3).send("GET", f"{server.url}/jobs", HEADERS, None)
    finally:
        release.set()
    assert not isinstance(caught.value, ConnectFailed)
    assert caught.value.description == "read timeout"
    assert time.monotonic() - started < 3


def test_a_hang_up_before_the_answer_is_not_connect_failed(serve: Callable[..., Scripted]) -> None:
    server = serve(hang_up)
    with pytest.raises(TransportError) as caught:
        PlainTransport(5, 5).send("POST", f"{server.url}/jobs", HEADERS, b"zip")
    assert not isinstance(caught.value, ConnectFailed)
    assert caught.value.description == "connection closed by the server"


# ------------------------------------------------------------------ CIClient over it
def test_a_read_fails_over_to_the_next_server(serve: Callable[..., Scripted]) -> None:
    broken, healthy = serve(hang_up), serve(answer(200, {"jobs": [], "total": 0, "limit": 50,
                                                         "offset": 0}))
    with CIClient([free_url(), broken.url, healthy.url], "ci_x", environ={}) as client:
        assert client.list_jobs().total == 0
        assert client._current == 2  # the one that answered is asked first next time


def test_an_upload_that_may_have_arrived_is_not_sent_again(serve: Callable[..., Scripted]) -> None:
    broken, healthy = serve(hang_up), serve(answer(201, {"id": "j", "status": "queued"}))
    with CIClient([broken.url, healthy.url], "ci_x", environ={}) as client, \
            pytest.raises(ServerUnreachable, match="may or may not have been carried out"):
        client.submit(b"PK")
    assert healthy.requests == []


def test_the_ssl_context_is_made_for_https_only() -> None:
    # httpx's default context loads a CA bundle (tens of ms); plain-http clients never use one.
    def loaded_cas(client: CIClient) -> int:
        context = client._httpx()._transport._pool._ssl_context  # type: ignore[attr-defined]
        return int(context.cert_store_stats()["x509_ca"])

    assert loaded_cas(CIClient("http://a:1", "ci_x", environ={})) == 0
    assert loaded_cas(CIClient("https://a:1", "ci_x", environ={})) > 0
