"""GET /jobs/{id}/events: replay, since=now, Last-Event-ID, live events exactly once, the END event.

Live tests append through the repository from a thread while the client reads; every wait is
bounded (a deadline on the feeding thread, pytest's timeout on the reading side).
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from ci_common.models import JobOutcome, JobStatus, OutputChunk, OutputStream, utcnow
from ci_server.events import OPENING_COMMENT, ResumePoint, Since, resume_point, start_after
from tests.leases import hold_lease, owner_fence
from tests.unit.test_server_support import (
    Server,
    SseEvent,
    make_server,
    parse_sse,
    read_stream,
    server,
)

__all__ = ["server"]

pytestmark = pytest.mark.timeout(30)


def url(job_id: str, query: str = "") -> str:
    return f"/jobs/{job_id}/events" + (f"?{query}" if query else "")


def finished_job(server: Server, *texts: str) -> str:
    job_id = server.submit()
    server.run(job_id, *texts)
    server.finish(job_id)
    return job_id


def in_thread(action: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


# ----------------------------------------------------------------------------- replay
def test_replay_from_start_of_a_finished_job(server: Server) -> None:
    job_id = finished_job(server, "line 1\n", "line 2\nline 3\n")
    events = read_stream(server.client, url(job_id, "since=start"), server.alice.headers)
    assert [(e.seq, e.event) for e in events] == [
        (1, "status"), (2, "status"), (3, "output"), (4, "output"), (5, "end")]
    assert events[0].json == {"status": "queued"}
    assert events[1].json == {"status": "running"}
    assert events[2].json == {"stream": "stdout", "text": "line 1\n"}
    assert events[3].json == {"stream": "stdout", "text": "line 2\nline 3\n"}
    assert events[4].json == {"status": "completed", "exit_code": 0, "success": True,
                              "reason": None, "report": None}


def test_default_is_since_start(server: Server) -> None:
    job_id = finished_job(server, "a\n")
    assert len(read_stream(server.client, url(job_id), server.alice.headers)) == 4


def test_stderr_and_exact_text_survive(server: Server) -> None:
    job_id = server.submit()
    server.repo.mark_running(job_id, "c", utcnow(), fence=owner_fence(server.repo, job_id))
    text = "unicode ✓ and\ttabs\r\nand a line without newline"
    server.repo.append_output(job_id, [OutputChunk(OutputStream.STDERR, text)], 1,
                              fence=owner_fence(server.repo, job_id))
    server.finish(job_id, exit_code=2)
    events = read_stream(server.client, url(job_id), server.alice.headers)
    assert events[2].json == {"stream": "stderr", "text": text}
    assert events[3].json["success"] is False and events[3].json["exit_code"] == 2


def test_response_headers(server: Server) -> None:
    job_id = finished_job(server)
    with server.client.stream("GET", url(job_id), headers=server.alice.headers) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        response.read()


# ----------------------------------------------------------------------------- finished jobs
@pytest.mark.parametrize("query", ["since=now", ""])
def test_a_client_past_everything_still_gets_the_end(server: Server, query: str) -> None:
    job_id = finished_job(server, "out\n")
    headers = dict(server.alice.headers)
    if not query:
        headers["Last-Event-ID"] = "4"  # the END's own id
    events = read_stream(server.client, url(job_id, query), headers)
    assert [(e.seq, e.event) for e in events] == [(4, "end")]


def test_last_event_id_beyond_the_end_still_gets_the_end(server: Server) -> None:
    job_id = finished_job(server)
    events = read_stream(server.client, url(job_id),
                         {**server.alice.headers, "Last-Event-ID": "999"})
    assert [(e.seq, e.event) for e in events] == [(3, "end")]


def test_cancelled_job_ends_with_its_reason(server: Server) -> None:
    job_id = server.submit()
    server.client.post(f"/jobs/{job_id}/cancel", headers=server.alice.headers)
    events = read_stream(server.client, url(job_id, "since=now"), server.alice.headers)
    assert [e.event for e in events] == ["end"]
    assert events[0].json == {"status": "cancelled", "exit_code": None, "success": False,
                              "reason": "cancelled by user", "report": None}


# ----------------------------------------------------------------------------- Last-Event-ID
def test_last_event_id_resumes_after_that_event(server: Server) -> None:
    job_id = finished_job(server, "a\n", "b\n", "c\n")
    events = read_stream(server.client, url(job_id),
                         {**server.alice.headers, "Last-Event-ID": "3"})
    assert [(e.seq, e.event) for e in events] == [(4, "output"), (5, "output"), (6, "end")]
    assert [e.json["text"] for e in events[:2]] == ["b\n", "c\n"]


def test_last_event_id_wins_over_since(server: Server) -> None:
    job_id = finished_job(server, "a\n", "b\n")
    events = read_stream(server.client, url(job_id, "since=now"),
                         {**server.alice.headers, "Last-Event-ID": "1"})
    assert [e.seq for e in events] == [2, 3, 4, 5]
    events = read_stream(server.client, url(job_id, "since=start"),
                         {**server.alice.headers, "Last-Event-ID": "4"})
    assert [e.seq for e in events] == [5]


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "0x10", "1e3"])
def test_bad_last_event_id_is_400(server: Server, value: str) -> None:
    job_id = finished_job(server)
    response = server.client.get(url(job_id), headers={**server.alice.headers,
                                                       "Last-Event-ID": value})
    assert response.status_code == 400
    assert response.json()["detail"].startswith("Last-Event-ID must be a non-negative integer")


@pytest.mark.parametrize("value", [str(2**63), "1" * 4301, "9" * 5000],
                         ids=["2^63", "4301-digits", "5000-digits"])
def test_last_event_id_beyond_any_stored_seq_is_400(server: Server, value: str) -> None:
    job_id = finished_job(server)
    response = server.client.get(url(job_id), headers={**server.alice.headers,
                                                       "Last-Event-ID": value})
    assert response.status_code == 400
    assert response.json() == {"detail": "Last-Event-ID must be a non-negative integer (an "
                                         "event id) no larger than 9223372036854775807"}


def test_the_largest_last_event_id_and_leading_zeros_are_event_ids(server: Server) -> None:
    job_id = finished_job(server, "a\n", "b\n")
    events = read_stream(server.client, url(job_id),
                         {**server.alice.headers, "Last-Event-ID": str(2**63 - 1)})
    assert [(e.seq, e.event) for e in events] == [(5, "end")]
    events = read_stream(server.client, url(job_id),
                         {**server.alice.headers, "Last-Event-ID": "0" * 5000 + "3"})
    assert [e.seq for e in events] == [4, 5]


def test_ownership_is_checked_before_the_resume_point(server: Server) -> None:
    job_id = finished_job(server)
    response = server.client.get(url(job_id, "since=never"),
                                 headers={**server.bob.headers, "Last-Event-ID": "x"})
    assert response.status_code == 404


def test_bad_since_is_422(server: Server) -> None:
    job_id = finished_job(server)
    response = server.client.get(url(job_id, "since=yesterday"), headers=server.alice.headers)
    assert response.status_code == 422
    assert response.json()["detail"].startswith("invalid query.since")


def test_resume_point_decisions() -> None:
    assert resume_point(Since.NOW, None) == ResumePoint(None, Since.NOW)
    assert resume_point(Since.NOW, " 7 ") == ResumePoint(7, Since.NOW)
    assert resume_point(Since.START, "") == ResumePoint(None, Since.START)
    assert start_after(ResumePoint(None, Since.START), 10) == 0
    assert start_after(ResumePoint(None, Since.NOW), 10) == 10
    assert start_after(ResumePoint(4, Since.NOW), 10) == 4
    assert start_after(ResumePoint(40, Since.START), 10) == 10


# ----------------------------------------------------------------------------- live
@contextmanager
def live_stream(server: Server, job_id: str, query: str = "",
                headers: dict[str, str] | None = None) -> Iterator[Iterator[SseEvent]]:
    """An open stream whose starting point is fixed (its opening comment was read)."""
    with server.client.stream("GET", url(job_id, query),
                              headers={**server.alice.headers, **(headers or {})}) as response:
        assert response.status_code == 200
        events = parse_sse(response.iter_lines())
        opening = next(events)
        assert opening.event is None
        assert opening.comments[0].startswith(OPENING_COMMENT)
        yield events


def until_end(events: Iterator[SseEvent]) -> list[SseEvent]:
    """The events up to and including `end`, keep-alive comments skipped."""
    found = []
    for event in events:
        if event.event is None:
            continue
        found.append(event)
        if event.event == "end":
            break
    return found


def test_events_appended_while_streaming_arrive_in_order_exactly_once(server: Server) -> None:
    job_id = server.submit()
    server.run(job_id, "before 0\n", "before 1\n")
    texts = [f"line {i}\n" for i in range(300)]

    def feed() -> None:
        for i, text in enumerate(texts):
            server.output(job_id, text)
            if i % 25 == 0:
                time.sleep(0.003)  # some events travel one by one, some in batches
        server.finish(job_id)

    with live_stream(server, job_id, "since=start") as stream:
        feeder = in_thread(feed)  # appends race with the history read and the live drain
        events = until_end(stream)
        rest = list(stream)
    feeder.join(5)
    assert [e.seq for e in events] == list(range(1, len(texts) + 6))  # queued, running, 2, 300, end
    outputs = [e.json["text"] for e in events if e.event == "output"]
    assert outputs == ["before 0\n", "before 1\n", *texts]
    assert events[-1].event == "end"
    assert rest == []  # the stream closed after the end


def test_since_now_skips_history_and_gets_what_follows(server: Server) -> None:
    job_id = server.submit()
    server.run(job_id, "old\n")
    with live_stream(server, job_id, "since=now") as stream:
        server.output(job_id, "new 1\n", "new 2\n")
        server.finish(job_id)
        events = until_end(stream)
    assert [(e.seq, e.event) for e in events] == [(4, "output"), (5, "output"), (6, "end")]
    assert [e.json.get("text") for e in events[:2]] == ["new 1\n", "new 2\n"]


def test_queued_job_streams_running_then_output(server: Server) -> None:
    job_id = server.submit()
    with live_stream(server, job_id) as stream:
        server.repo.claim_next_job(hold_lease(server.repo, "controller-1"))
        server.run(job_id, "hello\n")
        outcome = JobOutcome(JobStatus.FAILED, None, False, "timed out")
        server.repo.finish_job(job_id, outcome, utcnow(), fence=owner_fence(server.repo, job_id))
        events = until_end(stream)
    # Where it stands, if the relay placed it before the claim (timing; the queue event itself
    # is tested in test_server_relay.py): no id, not a stored event, and before its output.
    queue = [e for e in events if e.event == "queue"]
    assert all(e.id is None for e in queue)
    assert all(e.json in ({"ahead": 0}, {"ahead": None}) for e in queue)
    if queue:
        assert events.index(queue[-1]) < [e.event for e in events].index("output")
    events = [e for e in events if e.event != "queue"]
    assert [e.event for e in events] == ["status", "status", "output", "end"]
    assert events[-1].json == {"status": "failed", "exit_code": None, "success": False,
                               "reason": "timed out", "report": None}


def test_reconnect_with_last_event_id_misses_nothing(server: Server) -> None:
    job_id = server.submit()
    server.run(job_id, *[f"first {i}\n" for i in range(5)])
    with live_stream(server, job_id) as stream:
        seen = [next(stream) for _ in range(4)]  # then the client goes away mid-stream
    server.output(job_id, "while away\n")
    with live_stream(server, job_id, headers={"Last-Event-ID": seen[-1].id or ""}) as stream:
        server.output(job_id, "after\n")
        server.finish(job_id)
        rest = until_end(stream)
    seqs = [e.seq for e in seen] + [e.seq for e in rest]
    assert seqs == list(range(1, len(seqs) + 1))
    assert [e.json["text"] for e in rest if e.event == "output"][-2:] == ["while away\n",
                                                                          "after\n"]


def test_two_clients_each_get_everything(server: Server) -> None:
    job_id = server.submit()
    server.run(job_id)
    relay = server.client.app.state.ci.relay  # type: ignore[attr-defined]
    with live_stream(server, job_id) as first, live_stream(server, job_id, "since=now") as second:
        assert relay.subscriber_count(job_id) == 2
        server.output(job_id, *[f"{i}\n" for i in range(50)])
        server.finish(job_id)
        from_first, from_second = until_end(first), until_end(second)
    assert [e.seq for e in from_first] == list(range(1, 50 + 4))
    assert [e.seq for e in from_second] == list(range(3, 50 + 4))
    assert relay.subscriber_count() == 0  # both unsubscribed when their streams ended


@pytest.fixture
def chatty() -> Iterator[Server]:
    yield from make_server(sse_keepalive_s=0.05)


def test_keepalive_comments_while_quiet(chatty: Server) -> None:
    job_id = chatty.submit()
    chatty.run(job_id)
    with live_stream(chatty, job_id, "since=now") as stream:
        for _ in range(3):
            event = next(stream)
            assert event.event is None  # nothing happened: only comments
            assert event.comments == ["keep-alive"]
        chatty.finish(job_id)
        assert [e.event for e in until_end(stream)] == ["end"]


@pytest.mark.parametrize("history", [0, 50])
def test_closing_the_stream_unsubscribes(server: Server, history: int) -> None:
    job_id = server.submit()
    server.run(job_id, *["x\n"] * history)  # with history, the stream is mid-send when closed
    relay = server.client.app.state.ci.relay  # type: ignore[attr-defined]
    gc.disable()  # the cleanup must not wait for the garbage collector to find the generator
    try:
        with live_stream(server, job_id):
            assert relay.subscriber_count(job_id) == 1
        deadline = time.monotonic() + 5
        while relay.subscriber_count(job_id):
            assert time.monotonic() < deadline, "the subscriber was never removed"
            time.sleep(0.005)
    finally:
        gc.enable()
