"""One SSE client's stream of a job's events: history from the database, then live from the relay.

The protocol that gives no gap and no duplicate:
1. register a queue with the relay (from now on, every new event of the job lands in it);
2. read the history after the resume point from the database, in pages, and send it;
3. drain the queue, skipping seqs already sent.
An event committed before step 1 is in the history; one committed after it is in the queue;
one committed in between is in both and sent once. The stream ends after the END event.
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi.sse import ServerSentEvent
from starlette.concurrency import run_in_threadpool

from ci_common.errors import InvalidInput
from ci_common.models import EventKind, JobEvent, JobStatus, OutputStream
from ci_common.repository import MAX_STORED_INT, Repository
from ci_common.wire import (
    SSE_EVENT_END,
    SSE_EVENT_OUTPUT,
    SSE_EVENT_QUEUE,
    SSE_EVENT_STATUS,
    EndData,
    OutputData,
    QueueData,
    StatusData,
)
from ci_server.relay import EventRelay, QueuePosition, Subscription

HISTORY_PAGE_EVENTS = 1000
KEEPALIVE_COMMENT = "keep-alive"
BAD_LAST_EVENT_ID = ("Last-Event-ID must be a non-negative integer (an event id) no larger than "
                     f"{MAX_STORED_INT}")
OPENING_COMMENT = "streaming events after"  # + the seq the stream starts after


class Since(enum.StrEnum):
    """Where a stream starts when the client sends no Last-Event-ID."""

    START = "start"  # replay from seq 1
    NOW = "now"  # only events after the job's latest one


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Either an explicit seq to resume after (Last-Event-ID), or `since`."""

    after_seq: int | None
    since: Since


def resume_point(since: Since, last_event_id: str | None) -> ResumePoint:
    """Decide where to start; a Last-Event-ID header wins over `since`."""
    if last_event_id is None or not last_event_id.strip():
        return ResumePoint(after_seq=None, since=since)
    text = last_event_id.strip()
    if not text.isascii() or not text.isdigit():
        raise InvalidInput(BAD_LAST_EVENT_ID)
    # Measured before int(): Python refuses to convert more than 4,300 digits (ValueError).
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(MAX_STORED_INT)) or int(digits) > MAX_STORED_INT:
        raise InvalidInput(BAD_LAST_EVENT_ID)
    return ResumePoint(after_seq=int(digits), since=since)


def start_after(resume: ResumePoint, last_seq: int) -> int:
    """The seq after which to send events, given the job's latest seq when the stream began.

    Clamped to `last_seq`: a client cannot skip events that do not exist yet.
    """
    if resume.after_seq is not None:
        return min(resume.after_seq, last_seq)
    return 0 if resume.since is Since.START else last_seq


def to_sse(event: JobEvent) -> ServerSentEvent:
    """A stored event as it goes on the wire (see ci_common.wire)."""
    data: StatusData | OutputData | EndData
    if event.kind is EventKind.STATUS:
        data, name = StatusData(status=JobStatus(event.text)), SSE_EVENT_STATUS
    elif event.kind is EventKind.OUTPUT:
        data = OutputData(stream=event.stream or OutputStream.STDOUT, text=event.text)
        name = SSE_EVENT_OUTPUT
    else:
        data, name = EndData.model_validate(json.loads(event.text)), SSE_EVENT_END
    return ServerSentEvent(id=str(event.seq), event=name, raw_data=data.model_dump_json())


def queue_sse(position: QueuePosition) -> ServerSentEvent:
    """A queue position on the wire: no id, so Last-Event-ID stays on the stored events."""
    return ServerSentEvent(event=SSE_EVENT_QUEUE,
                           raw_data=QueueData(ahead=position.ahead).model_dump_json())


async def stream_events(repository: Repository, relay: EventRelay, subscription: Subscription,
                        resume: ResumePoint, keepalive_s: float) -> AsyncIterator[ServerSentEvent]:
    """Yield the job's events from the resume point until (and including) its END event.

    `subscription` must already be registered (step 1). The caller removes it afterwards, from
    code that runs even when the client leaves while this generator is suspended at a yield
    (the route uses a dependency with `yield`; a `finally` in here would wait for the GC).
    """
    job_id = subscription.job_id
    last_seq = await run_in_threadpool(repository.last_event_seq, job_id)
    after = start_after(resume, last_seq)
    sent = after
    # Tells the client (and tests) the stream is live and where it starts; flushes proxies.
    # The id (no data: EventSource dispatches nothing) is where a reconnect must resume, so a
    # `since=now` client whose stream drops before its first event misses nothing.
    yield ServerSentEvent(comment=f"{OPENING_COMMENT} {after}", id=str(after))
    # Read from one event earlier than asked when the client is caught up: if that event is
    # the END of a finished job, the client still learns the outcome.
    async for event in _history(repository, job_id, min(after, max(last_seq - 1, 0))):
        if event.seq <= after and event.kind is not EventKind.END:
            continue
        yield to_sse(event)
        sent = max(sent, event.seq)
        if event.kind is EventKind.END:
            return
    while True:
        if subscription.overflowed and subscription.queue.empty():
            # The relay dropped us while the client lagged: catch up from the database.
            relay.resubscribe(subscription)
            async for event in _history(repository, job_id, sent):
                yield to_sse(event)
                sent = event.seq
                if event.kind is EventKind.END:
                    return
            continue
        live = await _next_event(subscription, keepalive_s)
        if live is None:
            yield ServerSentEvent(comment=KEEPALIVE_COMMENT)
            continue
        if isinstance(live, QueuePosition):
            yield queue_sse(live)
            continue
        if live.seq <= sent:
            continue
        yield to_sse(live)
        sent = live.seq
        if live.kind is EventKind.END:
            return


async def _history(repository: Repository, job_id: str, after_seq: int) -> AsyncIterator[JobEvent]:
    while True:
        page = await run_in_threadpool(repository.list_events, job_id, after_seq,
                                       HISTORY_PAGE_EVENTS)
        for event in page:
            yield event
        if len(page) < HISTORY_PAGE_EVENTS:
            return
        after_seq = page[-1].seq


async def _next_event(subscription: Subscription,
                      timeout_s: float) -> JobEvent | QueuePosition | None:
    """The next queued item, or None after `timeout_s` of quiet (time for a keep-alive)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await subscription.queue.get()
    except TimeoutError:
        return None
