"""The event relay: one database reader per replica, fanning job events out to SSE subscribers.

A dedicated thread (so the repository sees one connection, whatever the number of clients)
checks `change_token()` every `event_poll_interval_s`; when it moved, it pages through
`poll_events(cursor)` and hands each batch to the event loop, which puts every event on the
queues of that job's subscribers.

A subscriber whose queue is full (a client reading slower than its job prints) is dropped and
flagged `overflowed`: it re-reads what it missed from the database instead of making the relay
wait or buffer without bound.

Queue positions: while a watched job may still be waiting, the same thread reads the queue
snapshot after a change (at most every QUEUE_REFRESH_S) and hands each subscriber a
QueuePosition whenever its job's position changed (policy.jobs_ahead: the claim order). A
claim writes no event, but it moves the change token, which is what triggers the read.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ci_common.models import JobEvent
from ci_common.repository import Repository
from ci_persistence.policy import jobs_ahead

logger = logging.getLogger(__name__)

SUBSCRIBER_QUEUE_EVENTS = 1024
ERROR_BACKOFF_S = 1.0  # after a failed poll (database busy or gone), wait before the next
STOP_TIMEOUT_S = 5.0
# Queue positions are read at most this often (a read of every waiting job): a client sees a
# new position within this long, and a busy database is not read once per output line.
QUEUE_REFRESH_S = 0.2
# ... and, when the queue is long, spend at most about a tenth of the thread on it: a read of
# 10,000 waiting jobs takes ~0.1 s on SQLite here, and events wait behind it.
QUEUE_READ_SHARE = 0.1
_UNSENT = -1  # no position sent to the subscriber yet


@dataclass(frozen=True, slots=True)
class QueuePosition:
    """A job's place in the queue, for its subscribers (not a stored event: no seq)."""

    job_id: str
    ahead: int | None  # waiting jobs claimed before it; None: claimed, starting


class Subscription:
    """One SSE client's view of one job: a bounded queue the relay fills."""

    def __init__(self, job_id: str, maxsize: int = SUBSCRIBER_QUEUE_EVENTS) -> None:
        self.job_id = job_id
        self.queue: asyncio.Queue[JobEvent | QueuePosition] = asyncio.Queue(maxsize=maxsize)
        self.overflowed = False  # set by the relay when it had to drop this subscriber
        self.position: int | None = _UNSENT  # the last position put on the queue
        self.may_wait = True  # its job may still be waiting (cleared once seen otherwise)


class EventRelay:
    """Polls the repository for new events from one thread and fans them out to subscribers."""

    def __init__(self, repository: Repository, poll_interval_s: float,
                 queue_size: int = SUBSCRIBER_QUEUE_EVENTS) -> None:
        self._repository = repository
        self._poll_interval_s = poll_interval_s
        self._queue_size = queue_size
        self._subscribers: dict[str, set[Subscription]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._cursor: int | None = None
        self.polls = 0  # poll_events calls made, for tests and metrics
        # _subscribers is changed on the event loop; the thread reads which jobs to place.
        self._subscribers_lock = threading.Lock()
        self._queue_due = threading.Event()  # a change or a new subscriber: place again
        self._next_queue_read = 0.0  # monotonic time before which no snapshot is read
        self.queue_reads = 0  # queue_snapshot calls made, for tests

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Start the polling thread; returns once its cursor is set ("from now")."""
        if self._thread is not None:
            raise RuntimeError("the relay is already running")
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="ci-event-relay", daemon=True)
        self._thread.start()
        # Subscribers read history after registering; that only closes the gap if the relay's
        # cursor was fixed before the first of them registered.
        await asyncio.to_thread(self._ready.wait)
        if self._start_error is not None:
            self._thread = None
            raise self._start_error

    async def stop(self) -> None:
        """Stop the thread and wait for it; safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        await asyncio.to_thread(thread.join, STOP_TIMEOUT_S)
        if thread.is_alive():
            logger.warning("event relay thread did not stop within %.0f s", STOP_TIMEOUT_S)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ----------------------------------------------------------------- subscribers
    @contextmanager
    def subscribe(self, job_id: str) -> Iterator[Subscription]:
        """Register a queue for a job's new events for the duration of the block (event loop)."""
        subscription = self.add_subscriber(job_id)
        try:
            yield subscription
        finally:
            self.remove_subscriber(subscription)

    def add_subscriber(self, job_id: str) -> Subscription:
        subscription = Subscription(job_id, self._queue_size)
        with self._subscribers_lock:
            self._subscribers.setdefault(job_id, set()).add(subscription)
        self._queue_due.set()  # its first position, if its job waits
        return subscription

    def resubscribe(self, subscription: Subscription) -> None:
        """Take back a subscriber dropped for overflowing, once it has emptied its queue."""
        subscription.overflowed = False
        with self._subscribers_lock:
            self._subscribers.setdefault(subscription.job_id, set()).add(subscription)

    def remove_subscriber(self, subscription: Subscription) -> None:
        with self._subscribers_lock:
            subscribers = self._subscribers.get(subscription.job_id)
            if subscribers is None:
                return
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscribers[subscription.job_id]

    def subscriber_count(self, job_id: str | None = None) -> int:
        if job_id is not None:
            return len(self._subscribers.get(job_id, ()))
        return sum(len(s) for s in self._subscribers.values())

    def fan_out(self, events: list[JobEvent]) -> None:
        """Put each event on its job's subscriber queues (runs on the event loop)."""
        for event in events:
            for subscription in list(self._subscribers.get(event.job_id, ())):
                try:
                    subscription.queue.put_nowait(event)
                except asyncio.QueueFull:
                    subscription.overflowed = True
                    self.remove_subscriber(subscription)

    def fan_out_positions(self, ahead: dict[str, int], placed: set[str]) -> None:
        """Give each subscriber of a placed job its position, when it changed (event loop).

        A job in `placed` but not in `ahead` no longer waits: a subscriber that was told a
        position hears once that it is starting; none is asked about that job again.
        """
        for job_id in placed:
            position = ahead.get(job_id)
            for subscription in list(self._subscribers.get(job_id, ())):
                if position is None:
                    subscription.may_wait = False
                    if subscription.position in (_UNSENT, None):
                        continue
                elif subscription.position == position:
                    continue
                subscription.position = position
                try:
                    subscription.queue.put_nowait(QueuePosition(job_id, position))
                except asyncio.QueueFull:
                    subscription.overflowed = True
                    self.remove_subscriber(subscription)

    def _place_waiting_jobs(self) -> None:
        """Read the queue and hand positions to the loop (thread; after a change, throttled)."""
        now = time.monotonic()
        if not self._queue_due.is_set() or now < self._next_queue_read:
            return
        self._queue_due.clear()
        with self._subscribers_lock:
            placed = {job_id for job_id, subscribers in self._subscribers.items()
                      if any(s.may_wait for s in subscribers)}
        if not placed:
            return
        self._next_queue_read = now + QUEUE_REFRESH_S
        try:
            snapshot = self._repository.queue_snapshot()
        except Exception:
            self._queue_due.set()  # read again once the repository answers
            raise
        ahead = jobs_ahead(snapshot, wanted=placed)
        self.queue_reads += 1
        spent = time.monotonic() - now
        self._next_queue_read = now + max(QUEUE_REFRESH_S, spent / QUEUE_READ_SHARE)
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self.fan_out_positions, ahead, placed)
        except RuntimeError:  # the loop closed under us: the app is shutting down
            self._stop.set()

    # ----------------------------------------------------------------- the polling thread
    def _run(self) -> None:
        try:
            token = self._repository.change_token()
            _, self._cursor = self._repository.poll_events(None)
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        failing = False
        while not self._stop.is_set():
            try:
                current = self._repository.change_token()
                if current != token:
                    self._drain()
                    # Only now: after a failed poll the token must still look unseen. Read
                    # before polling, it moves again for a commit landing during the poll.
                    token = current
                    self._queue_due.set()
                self._place_waiting_jobs()
                if failing:
                    logger.info("event relay: repository answers again")
                    failing = False
            except Exception as exc:
                if not failing:
                    logger.warning("event relay: polling failed (%s); retrying", exc)
                failing = True
                self._stop.wait(ERROR_BACKOFF_S)
                continue
            self._stop.wait(self._poll_interval_s)

    def _drain(self) -> None:
        while not self._stop.is_set():
            events, cursor = self._repository.poll_events(self._cursor)
            self.polls += 1
            self._cursor = cursor
            if not events:
                return
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self.fan_out, events)
            except RuntimeError:  # the loop closed under us: the app is shutting down
                self._stop.set()
                return
