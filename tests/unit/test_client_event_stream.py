"""The event stream against a real local HTTP server, read through http.client (what `ci`
uses for plain http, without httpx) and through httpx (https, proxies), and `iter_sse`, the one
reader of SSE bytes both transports share.

The server speaks chunked HTTP/1.1 as the real one does and is deliberately dumb: it replays
events the client already has, cuts a connection in the middle of a message, stalls. Every
event must still reach the caller exactly once, in order.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from ci_client.client import CIClient, ReconnectPolicy
from ci_client.events import (
    EndEvent,
    JobStreamEvent,
    OutputEvent,
    QueueEvent,
    ServerSentEvent,
    iter_sse,
)
from ci_common.errors import NotFound, ServerError, ServerUnreachable

JOB = "0f3a2c1e-1111-4222-8333-944455556666"


def message(seq: int, kind: str, data: dict[str, object]) -> bytes:
    return f"id: {seq}\r\nevent: {kind}\r\ndata: {json.dumps(data)}\r\n\r\n".encode()


def job_events(lines: int) -> list[bytes]:
    """status queued, status running, `lines` output lines, end: seqs 1 … lines + 3."""
    events = [message(1, "status", {"status": "queued"}),
              message(2, "status", {"status": "running"})]
    events += [message(seq, "output", {"stream": "stdout", "text": f"line {seq - 2} ✓\n"})
               for seq in range(3, lines + 3)]
    events.append(message(lines + 3, "end", {"status": "completed", "exit_code": 0,
                                             "success": True, "reason": None}))
    return events


# What one connection does: (the request's Last-Event-ID or None, the handler) → nothing.
Script = Callable[["Stream", int | None], None]


class Stream(BaseHTTPRequestHandler):
    """Writes a chunked text/event-stream answer; each connection follows the next script."""

    protocol_version = "HTTP/1.1"
    server: EventServer

    def do_GET(self) -> None:  # noqa: N802
        last = self.headers.get("Last-Event-ID")
        self.server.requests.append((self.path, dict(self.headers.items())))
        self.server.scripts.pop(0)(self, None if last is None else int(last))

    def start(self, status: int = 200, content_type: str = "text/event-stream") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def finish_body(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def drop(self) -> None:
        """Cut the connection as a dying replica does: no end of the chunked body."""
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, *args: object) -> None:
        pass


class EventServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, scripts: list[Script]) -> None:
        super().__init__(("127.0.0.1", 0), Stream)
        self.scripts = scripts
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.released = threading.Event()  # lets stalled handlers go at the end

    def handle_error(self, request: object, client_address: object) -> None:
        # The client hanging up (a read timeout, the END event) is part of these tests.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@pytest.fixture
def serve() -> Iterator[Callable[[list[Script]], EventServer]]:
    started: list[EventServer] = []

    def start(scripts: list[Script]) -> EventServer:
        server = EventServer(scripts)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return server
    yield start
    for server in started:
        server.released.set()
        server.shutdown()
        server.server_close()


def seqs(events: Iterable[JobStreamEvent]) -> list[int]:
    """The events' seqs (these streams have no queue events, which have none)."""
    return [event.seq for event in events if not isinstance(event, QueueEvent)]


class FakeTime:
    """The reconnect backoff's clock: sleeps advance it at once."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


Connect = Callable[..., tuple[CIClient, FakeTime]]


@pytest.fixture(params=["http.client", "httpx"])
def connect(request: pytest.FixtureRequest) -> Connect:
    """A client of one server URL over plain http, through http.client (what `ci` uses) or
    through httpx (what https and proxies use): both must read a stream alike."""
    def make(url: str, read_timeout_s: float = 5.0,
             policy: ReconnectPolicy | None = None) -> tuple[CIClient, FakeTime]:
        fake = FakeTime()
        transport = None if request.param == "http.client" else httpx.HTTPTransport()
        client = CIClient(url, "ci_testkey", transport, environ={},
                          read_timeout_s=read_timeout_s, reconnect=policy, sleep=fake.sleep,
                          clock=fake.clock)
        assert (client._plain is not None) == (request.param == "http.client")
        return client, fake
    return make


# ------------------------------------------------------------------ the stream
def test_a_dropped_stream_resumes_after_its_last_event_without_duplicates_or_loss(
        serve: Callable[[list[Script]], EventServer], connect: Connect) -> None:
    events = job_events(10)  # seqs 1 … 13

    def opening_then_drop_mid_message(handler: Stream, last: int | None) -> None:
        handler.start()
        handler.chunk(b"id: 0\r\n\r\n")  # the opening message: where the stream starts
        for data in events[:5]:
            handler.chunk(data)
        handler.chunk(events[5][:20])  # half of seq 6: must not reach the caller
        handler.drop()

    def replay_then_end_early(handler: Stream, last: int | None) -> None:
        assert last is not None
        handler.start()
        for data in events[last - 3:9]:  # replays seqs the client has, then stops at 9
            handler.chunk(data)
        handler.chunk(b": keep-alive\r\n\r\n")
        handler.finish_body()  # a clean end, but before the job's END event

    def the_rest(handler: Stream, last: int | None) -> None:
        assert last is not None
        handler.start()
        handler.chunk(b"".join(events[last:]))  # all at once: several messages in a chunk
        handler.finish_body()

    server = serve([opening_then_drop_mid_message, replay_then_end_early, the_rest])
    client, fake = connect(server.url)
    with client:
        got = list(client.stream_events(JOB, "start"))
    assert seqs(e for e in got if not isinstance(e, OutputEvent)) == [1, 2, 13]
    assert "".join(e.text for e in got if isinstance(e, OutputEvent)) == "".join(
        f"line {n} ✓\n" for n in range(1, 11))
    assert seqs(got) == list(range(1, 14))
    assert isinstance(got[-1], EndEvent) and got[-1].end.success
    assert [path for path, _ in server.requests] == [f"/jobs/{JOB}/events?since=start"] * 3
    assert [headers.get("Last-Event-ID") for _, headers in server.requests] == [None, "5", "9"]
    assert all(headers["Accept"] == "text/event-stream"
               and headers["Authorization"] == "Bearer ci_testkey"
               for _, headers in server.requests)
    assert fake.sleeps == [0.1, 0.1]  # each reconnect after progress starts the backoff anew


def test_a_since_now_stream_dropped_before_any_event_resumes_where_it_opened(
        serve: Callable[[list[Script]], EventServer], connect: Connect) -> None:
    events = job_events(1)

    def opening_only(handler: Stream, last: int | None) -> None:
        handler.start()
        handler.chunk(b"id: 2\r\n\r\n")
        handler.drop()

    def from_last(handler: Stream, last: int | None) -> None:
        assert last is not None
        handler.start()
        handler.chunk(b"".join(events[last:]))
        handler.finish_body()

    server = serve([opening_only, from_last])
    client, _ = connect(server.url)
    with client:
        assert seqs(client.stream_events(JOB, "now")) == [3, 4]
    assert [headers.get("Last-Event-ID") for _, headers in server.requests] == [None, "2"]


def test_keep_alive_comments_hold_a_quiet_stream_open(
        serve: Callable[[list[Script]], EventServer], connect: Connect) -> None:
    events = job_events(1)

    def quiet_for_a_while(handler: Stream, last: int | None) -> None:
        handler.start()
        handler.chunk(events[0])
        for _ in range(8):  # 0.8 s without an event, a comment every 0.1 s
            handler.server.released.wait(0.1)
            handler.chunk(b":\r\n\r\n")
        handler.chunk(b"".join(events[1:]))
        handler.finish_body()

    server = serve([quiet_for_a_while])
    client, fake = connect(server.url, read_timeout_s=0.4)
    with client:
        assert seqs(client.stream_events(JOB)) == [1, 2, 3, 4]
    assert (len(server.requests), fake.sleeps) == (1, [])


def test_a_silent_stream_is_a_read_timeout_and_is_given_up_in_the_end(
        serve: Callable[[list[Script]], EventServer], connect: Connect) -> None:
    def stall(handler: Stream, last: int | None) -> None:
        handler.start()
        handler.chunk(b": hello\r\n\r\n")
        handler.server.released.wait(10)

    server = serve([stall] * 10)
    policy = ReconnectPolicy(initial_delay_s=0.1, max_delay_s=2.0, give_up_after_s=1.0)
    client, fake = connect(server.url, read_timeout_s=0.3, policy=policy)
    with client, pytest.raises(ServerUnreachable) as info:
        list(client.stream_events(JOB))
    assert f"(read timeout from {server.url})" in info.value.message
    assert f"`ci wait {JOB}` picks up from here" in info.value.message
    assert len(server.requests) == len(fake.sleeps) + 1 == 4


def test_error_answers_to_a_stream_request(serve: Callable[[list[Script]], EventServer],
                                            connect: Connect) -> None:
    def not_found(handler: Stream, last: int | None) -> None:
        body = json.dumps({"detail": "job not found"}).encode()
        handler.send_response(404)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    server = serve([not_found])
    client, _ = connect(server.url)
    with client, pytest.raises(NotFound, match=f"job {JOB} not found"):
        list(client.stream_events(JOB))

    def unavailable(handler: Stream, last: int | None) -> None:
        handler.start(503, "text/plain")
        handler.finish_body()

    def html(handler: Stream, last: int | None) -> None:
        handler.start(200, "text/html")
        handler.chunk(b"<html>hi</html>")
        handler.finish_body()

    server = serve([unavailable, html])
    client, fake = connect(server.url)
    with client, pytest.raises(ServerError, match="did not answer with an event stream"):
        list(client.stream_events(JOB))
    assert (len(server.requests), fake.sleeps) == (2, [0.1])  # a 503 is retried, HTML is not


def test_nothing_listening_is_unreachable_after_the_backoff(connect: Connect) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client, _ = connect(url, policy=ReconnectPolicy(give_up_after_s=1.0))
    with client, pytest.raises(ServerUnreachable, match=f"cannot connect from {url}"):
        list(client.stream_events(JOB))


# ------------------------------------------------------------------ iter_sse
STREAM = ("id: 0\r\n\r\n"
          ": keep-alive\r\n\r\n"
          "id: 1\r\nevent: output\r\ndata: {\"text\": \"héllo ✓\"}\r\n\r\n"
          "event: queue\ndata: {\"ahead\": 2}\n\n"
          "id: 2\revent: end\rdata: a\rdata:b\r\r"
          "id: 3\r\nevent: output\r\ndata: unfinished").encode()
EXPECTED = [ServerSentEvent("message", "", "0"),
            ServerSentEvent("message", "", "0"),  # a blank line after an id (as httpx_sse)
            ServerSentEvent("output", '{"text": "héllo ✓"}', "1"),
            ServerSentEvent("queue", '{"ahead": 2}', "1"),  # the id set earlier stays
            ServerSentEvent("end", "a\nb", "2")]


def test_iter_sse_reads_messages_whatever_the_line_endings() -> None:
    assert list(iter_sse([STREAM])) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_iter_sse_does_not_care_where_the_chunks_are_cut(size: int) -> None:
    # Cuts fall inside CRLFs and inside multi-byte UTF-8 characters.
    chunks = [STREAM[i:i + size] for i in range(0, len(STREAM), size)]
    assert list(iter_sse(chunks)) == EXPECTED
