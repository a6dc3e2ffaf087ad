"""CIClient's own logic against scripted HTTP answers (httpx.MockTransport).

Reconnect with Last-Event-ID, de-duplication by seq, fail-over between URLs, bounded backoff and
the mapping of error answers. The scripted server is deliberately dumb (it may replay events the
client already has), so the client's guarantees are what is being checked.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from ci_client.client import CIClient, ReconnectPolicy
from ci_client.events import EndEvent, OutputEvent, StatusEvent
from ci_common.errors import (
    AuthenticationError,
    Conflict,
    InvalidInput,
    NotFound,
    RateLimited,
    ServerError,
    ServerUnreachable,
    TooLarge,
)
from ci_common.models import JobStatus
from ci_common.settings import Settings

JOB = "0f3a2c1e-1111-4222-8333-944455556666"
A, B = "http://a.test:8000", "http://b.test:8001"


def sse(seq: int, kind: str, data: dict[str, object]) -> bytes:
    return f"id: {seq}\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def status(seq: int, value: str) -> bytes:
    return sse(seq, "status", {"status": value})


def output(seq: int, text: str) -> bytes:
    return sse(seq, "output", {"stream": "stdout", "text": text})


def end(seq: int, success: bool = True) -> bytes:
    return sse(seq, "end", {"status": "completed", "exit_code": 0 if success else 1,
                            "success": success, "reason": None})


class Chunks(httpx.SyncByteStream):
    """A response body sent chunk by chunk, then optionally broken by an exception."""

    def __init__(self, chunks: list[bytes], then: BaseException | None = None) -> None:
        self.chunks = chunks
        self.then = then

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.then is not None:
            raise self.then


Answer = Callable[[httpx.Request], httpx.Response]


def refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("Connection refused", request=request)


def stream(chunks: list[bytes], then: BaseException | None = None) -> Answer:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              stream=Chunks(chunks, then))
    return answer


def error(status_code: int, detail: object) -> Answer:
    return lambda request: httpx.Response(status_code, json={"detail": detail})


@dataclass
class ScriptedServers:
    """Answers requests from a per-connection script; records what the client sent."""

    script: list[Answer]
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if not self.script:
            raise AssertionError(f"unexpected request {request.method} {request.url}")
        return self.script.pop(0)(request)

    def hosts(self) -> list[str]:
        return [f"{r.url.host}:{r.url.port}" for r in self.requests]


@dataclass
class FakeTime:
    now: float = 0.0
    sleeps: list[float] = field(default_factory=list)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def make_client(script: list[Answer], urls: tuple[str, ...] = (A,),
                policy: ReconnectPolicy | None = None) -> tuple[CIClient, ScriptedServers,
                                                                 FakeTime]:
    servers = ScriptedServers(list(script))
    fake = FakeTime()
    client = CIClient(urls, "ci_testkey", transport=httpx.MockTransport(servers),
                      reconnect=policy, sleep=fake.sleep, clock=fake.clock)
    return client, servers, fake


# ---------------------------------------------------------------------- streaming


def test_reconnects_with_last_event_id_and_shows_each_line_once() -> None:
    drop = httpx.ReadError("connection reset by peer")
    client, servers, fake = make_client([
        stream([status(1, "queued"), status(2, "running"), output(3, "line 1\n")], then=drop),
        # a replica that replays from further back than asked: the client must skip 2 and 3
        stream([status(2, "running"), output(3, "line 1\n"), output(4, "line 2\n"), end(5)]),
    ])
    events = list(client.stream_events(JOB, "start"))
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert [e.text for e in events if isinstance(e, OutputEvent)] == ["line 1\n", "line 2\n"]
    assert isinstance(events[0], StatusEvent) and events[0].status is JobStatus.QUEUED
    assert isinstance(events[-1], EndEvent) and events[-1].end.success is True
    first, second = servers.requests
    assert "last-event-id" not in first.headers
    assert first.url.params["since"] == "start"
    assert second.headers["last-event-id"] == "3"
    assert fake.sleeps == [0.1]


def test_since_now_is_sent_and_a_quiet_stream_end_reconnects() -> None:
    client, servers, _ = make_client([
        stream([output(7, "a\n")]),  # closed cleanly before END: e.g. a replica shutting down
        stream([end(8, success=False)]),
    ])
    events = list(client.stream_events(JOB, "now"))
    assert [e.seq for e in events] == [7, 8]
    assert servers.requests[0].url.params["since"] == "now"
    assert servers.requests[1].headers["last-event-id"] == "7"


def opening(after: int) -> bytes:
    """The server's first message: a comment and the id the stream starts after, no data."""
    return f": streaming events after {after}\nid: {after}\n\n".encode()


def test_since_now_dropped_before_any_event_resumes_where_it_began() -> None:
    drop = httpx.ReadError("connection reset by peer")
    client, servers, _ = make_client([
        stream([opening(12), b": keep-alive\n\n"], then=drop),
        stream([opening(12), output(13, "printed while we were away\n"), end(14)]),
    ])
    events = list(client.stream_events(JOB, "now"))
    assert [e.seq for e in events] == [13, 14]
    assert servers.requests[1].headers["last-event-id"] == "12"


def test_the_end_replayed_at_the_opening_position_is_not_taken_for_a_duplicate() -> None:
    # A job that ended just before `since=now`: the server starts after the END and sends it.
    client, _, _ = make_client([stream([opening(9), end(9)])])
    assert [e.seq for e in client.stream_events(JOB, "now")] == [9]


def test_read_timeout_and_5xx_are_retried_auth_errors_are_not() -> None:
    client, servers, _ = make_client([
        stream([status(1, "queued")], then=httpx.ReadTimeout("timed out")),
        error(503, "restarting"),
        refuse,
        stream([end(2)]),
    ])
    assert [e.seq for e in client.stream_events(JOB)] == [1, 2]
    assert len(servers.requests) == 4

    client, servers, _ = make_client([error(401, "API key has been revoked")])
    with pytest.raises(AuthenticationError, match="^API key has been revoked$"):
        list(client.stream_events(JOB))
    assert len(servers.requests) == 1

    client, servers, _ = make_client([error(404, "no such job")])
    with pytest.raises(NotFound, match=f"^job {JOB} not found$"):
        list(client.stream_events(JOB))


def test_stream_rotates_to_the_next_server_after_a_drop() -> None:
    client, servers, _ = make_client([
        stream([status(1, "queued")], then=httpx.RemoteProtocolError("peer closed")),
        stream([status(2, "running"), end(3)]),
    ], urls=(A, B))
    assert [e.seq for e in client.stream_events(JOB)] == [1, 2, 3]
    assert servers.hosts() == ["a.test:8000", "b.test:8001"]
    assert servers.requests[1].headers["last-event-id"] == "1"


def test_backoff_doubles_to_a_cap_and_gives_up_without_progress() -> None:
    client, servers, fake = make_client([refuse] * 100)
    with pytest.raises(ServerUnreachable) as info:
        list(client.stream_events(JOB))
    assert fake.sleeps[:6] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0])
    assert max(fake.sleeps) == 2.0
    assert 58.0 <= fake.now <= 60.0
    assert f"lost the event stream of job {JOB}" in info.value.message
    assert f"ci wait {JOB}" in info.value.message
    assert len(servers.requests) == len(fake.sleeps) + 1


def test_progress_resets_the_give_up_clock() -> None:
    policy = ReconnectPolicy(initial_delay_s=1.0, max_delay_s=4.0, give_up_after_s=10.0)
    drop = httpx.ReadError("reset")
    # 8 connections, each delivering one new event then failing twice before the next:
    # far longer than 10 s in total, but never 10 s without progress.
    script: list[Answer] = []
    for seq in range(1, 9):
        script += [stream([output(seq, f"{seq}\n")], then=drop), refuse, refuse]
    script.append(stream([end(9)]))
    client, _, fake = make_client(script, policy=policy)
    assert [e.seq for e in client.stream_events(JOB)] == list(range(1, 10))
    assert fake.now > 10.0
    assert set(fake.sleeps) == {1.0, 2.0, 4.0}  # the backoff restarts after each event


def test_a_non_event_stream_answer_is_an_error_not_a_retry() -> None:
    client, servers, _ = make_client([lambda r: httpx.Response(200, text="<html>hi</html>")])
    with pytest.raises(ServerError, match="did not answer with an event stream"):
        list(client.stream_events(JOB))
    assert len(servers.requests) == 1


def test_read_timeout_is_longer_than_the_server_keepalive() -> None:
    client, _, _ = make_client([])
    timeout = client._httpx().timeout  # the event stream's client
    assert timeout.read is not None and timeout.read >= 2 * Settings().sse_keepalive_s


# ---------------------------------------------------------------------- requests


def job_json(status_value: str = "running") -> dict[str, object]:
    return {"id": JOB, "status": status_value, "success": None, "exit_code": None,
            "reason": None, "created_at": "2025-10-12T19:30:00Z", "start_time": None,
            "end_time": None}


def test_requests_fail_over_and_stick_to_the_server_that_answered() -> None:
    ok = lambda r: httpx.Response(200, json=job_json())  # noqa: E731
    client, servers, _ = make_client([refuse, ok, ok], urls=(A, B))
    assert client.get_job(JOB).status is JobStatus.RUNNING
    assert client.get_job(JOB).id == JOB
    assert servers.hosts() == ["a.test:8000", "b.test:8001", "b.test:8001"]
    assert servers.requests[0].headers["authorization"] == "Bearer ci_testkey"


def test_nothing_answers_means_unreachable_naming_the_urls() -> None:
    client, _, _ = make_client([refuse, refuse], urls=(A, B))
    with pytest.raises(ServerUnreachable) as info:
        client.list_jobs()
    assert info.value.message == (
        f"cannot reach the CI server at {A}, {B} (is it running?)")


def test_a_submit_that_may_have_arrived_is_not_sent_again() -> None:
    timeout = lambda r: (_ for _ in ()).throw(httpx.ReadTimeout("slow", request=r))  # noqa: E731
    client, servers, _ = make_client([timeout], urls=(A, B))
    with pytest.raises(ServerUnreachable, match="may or may not have been carried out"):
        client.submit(b"PK...")
    assert len(servers.requests) == 1


def test_submit_sends_the_archive_and_timeout_as_multipart() -> None:
    created = lambda r: httpx.Response(201, json={"id": JOB, "status": "queued"})  # noqa: E731
    client, servers, _ = make_client([created, created])
    assert client.submit(b"ZIPBYTES", timeout=90).id == JOB
    request = servers.requests[0]
    assert (request.method, request.url.path) == ("POST", "/jobs")
    body = request.read()
    assert b'name="archive"; filename="project.zip"' in body and b"ZIPBYTES" in body
    assert b'name="timeout"\r\n\r\n90.0\r\n' in body
    assert b'name="no_cache"' not in body
    client.submit(b"ZIPBYTES", no_cache=True)
    assert b'name="no_cache"\r\n\r\ntrue\r\n' in servers.requests[1].read()


def test_list_jobs_sends_paging() -> None:
    page = {"jobs": [job_json("queued")], "total": 7, "limit": 1, "offset": 2}
    client, servers, _ = make_client([lambda r: httpx.Response(200, json=page)])
    result = client.list_jobs(limit=1, offset=2)
    assert (result.total, result.jobs[0].status) == (7, JobStatus.QUEUED)
    assert dict(servers.requests[0].url.params) == {"limit": "1", "offset": "2"}


@pytest.mark.parametrize(("status_code", "detail", "error_type", "message"), [
    (401, "invalid API key", AuthenticationError, "invalid API key"),
    (401, "user account is deactivated", AuthenticationError, "user account is deactivated"),
    (404, "job not found", NotFound, f"job {JOB} not found"),
    (409, "job already finished", Conflict, "job already finished"),
    (413, "archive is 80.0 MB, over the 50.0 MB limit", TooLarge,
     "archive is 80.0 MB, over the 50.0 MB limit"),
    (429, "too many failed attempts", RateLimited, "too many failed attempts"),
    (400, "missing requirements.txt", InvalidInput, "missing requirements.txt"),
    (422, [{"loc": ["query", "limit"], "msg": "must be <= 200"}], InvalidInput,
     "query.limit: must be <= 200"),
    (500, "boom", ServerError, "the CI server answered 500: boom"),
])
def test_error_answers_map_to_domain_errors(status_code: int, detail: object,
                                            error_type: type[Exception], message: str) -> None:
    client, _, _ = make_client([error(status_code, detail)])
    with pytest.raises(error_type) as info:
        client.cancel(JOB)
    assert str(info.value) == message


def test_an_unexpected_body_is_a_server_error() -> None:
    client, _, _ = make_client([lambda r: httpx.Response(200, json={"hello": 1})])
    with pytest.raises(ServerError, match="not a JobView"):
        client.get_job(JOB)
