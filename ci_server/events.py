"""One SSE client's stream of a job's events: history from the database, then live from the relay.

The protocol that gives no gap and no duplicate:
1. register a queue with the relay (from now on, every new event of the job lands in it);
2. read the history after the resume point from the database, in pages, and send it;
3. drain the queue, skipping seqs already sent.
An event committed before step 1 is in the history; one committed after it is in the queue;
one committed in between is in both and sent once. The stream ends after the END event.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from ci_common.errors import InvalidInput
from ci_common.models import EventKind, JobEvent
from ci_common.repository import MAX_STORED_INT, Repository
from ci_server.relay import EventRelay, Subscription
from ci_server.sse import EncodedBatch, EncodedEvent, comment

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


@dataclass(frozen=True, slots=True)
class Opening:
    """Step 2 begun: the seq the stream starts after, and its first history page, read after
    `first` (see opening)."""

    after: int
    first: int
    page: list[JobEvent]


def opening(repository: Repository, job_id: str, resume: ResumePoint) -> Opening:
    """Where the stream starts, and its first history page (blocking: call from a thread,
    after registering the subscription)."""
    last_seq = repository.last_event_seq(job_id)
    after = start_after(resume, last_seq)
    # Read from one event earlier than asked when the client is caught up: if that event is
    # the END of a finished job, the client still learns the outcome.
    first = min(after, max(last_seq - 1, 0))
    return Opening(after, first, repository.list_events(job_id, first, HISTORY_PAGE_EVENTS))


async def stream_events(repository: Repository, relay: EventRelay, subscription: Subscription,
                        resume: ResumePoint, opened: Opening | None = None,
                        ) -> AsyncGenerator[bytes, None]:
    """Yield the job's events, as SSE bytes, from the resume point until its END event.

    Each chunk holds every event that was pending (one write per watcher per relay batch);
    keep-alive comments come when the relay's ticker says the stream was quiet.
    `subscription` must already be registered (step 1); `opened`, if given, is `opening()`
    read after that (the route does both in one threadpool hop: a thousand watchers joining
    at once paid more for hops, thread wake-ups queueing for the GIL, than for the queries).
    The caller removes the subscription afterwards, from
    code that runs even when the client leaves while this generator is suspended at a yield
    (the route uses a dependency with `yield`).
    """
    job_id = subscription.job_id
    cache = relay.encodings
    if opened is None:
        opened = await run_in_threadpool(opening, repository, job_id, resume)
    after = sent = opened.after
    # Tells the client (and tests) the stream is live and where it starts; flushes proxies.
    # The id (no data: EventSource dispatches nothing) is where a reconnect must resume, so a
    # `since=now` client whose stream drops before its first event misses nothing.
    yield comment(f"{OPENING_COMMENT} {after}", after)
    async for page in _history(repository, job_id, (opened.first, opened.page)):
        chunk = [cache.get(event) for event in page
                 if event.seq > after or event.kind is EventKind.END]
        if chunk:
            yield _join(chunk)
            sent = max(sent, _last_seq(chunk, sent))
            if chunk[-1].is_end:
                return
    while True:
        if subscription.overflowed and subscription.empty():
            # The relay dropped us while the client lagged: catch up from the database.
            relay.resubscribe(subscription)
            async for page in _history(repository, job_id, sent):
                chunk = [cache.get(event) for event in page]
                yield _join(chunk)
                sent = _last_seq(chunk, sent)
                if chunk[-1].is_end:
                    return
            continue
        batch = await subscription.take()
        if not batch:
            if not subscription.overflowed:
                yield comment(KEEPALIVE_COMMENT)
            continue
        if isinstance(batch, EncodedBatch) and batch.whole is not None \
                and batch.first_seq > sent:
            # The common case: exactly what _after would keep, already joined by the relay.
            yield batch.whole
            sent = batch.last_seq
            if batch[-1].is_end:
                return
            continue
        fresh = _after(batch, sent)
        if fresh:
            yield _join(fresh)
            sent = _last_seq(fresh, sent)
            if fresh[-1].is_end:
                return


def _after(batch: list[EncodedEvent], sent: int) -> list[EncodedEvent]:
    """The events of a batch to send: seqs above `sent`, each once, increasing, up to END.

    A batch may repeat a seq (the relay may hand the same row over twice, e.g. on PostgreSQL
    while rows are held back behind an older transaction): never send one twice.
    """
    fresh = []
    for event in batch:
        if event.seq is not None:
            if event.seq <= sent:
                continue
            sent = event.seq
        fresh.append(event)
        if event.is_end:
            break
    return fresh


def _last_seq(events: list[EncodedEvent], default: int) -> int:
    """The seq of the last stored event among `events` (queue positions have none)."""
    for event in reversed(events):
        if event.seq is not None:
            return event.seq
    return default


def _join(events: list[EncodedEvent]) -> bytes:
    return events[0].data if len(events) == 1 else b"".join(event.data for event in events)


async def _history(repository: Repository, job_id: str,
                   start: int | tuple[int, list[JobEvent]]) -> AsyncIterator[list[JobEvent]]:
    """The job's events after a seq, in pages of HISTORY_PAGE_EVENTS (non-empty); `start` is
    that seq, or (that seq, its first page) when already read."""
    after_seq, read = (start, None) if isinstance(start, int) else start
    while True:
        page = read if read is not None else await run_in_threadpool(
            repository.list_events, job_id, after_seq, HISTORY_PAGE_EVENTS)
        read = None
        if page:
            yield page
        if len(page) < HISTORY_PAGE_EVENTS:
            return
        after_seq = page[-1].seq
