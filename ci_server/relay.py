"""The event relay: one database reader per replica, fanning job events out to SSE subscribers.

A dedicated thread (so the repository sees one connection, whatever the number of clients)
sleeps in `Repository.wait_for_change`; when the token moved, it pages through
`poll_events(cursor)` and hands each batch to the event loop. There each event is encoded once
(`ci_server.sse`, cached for all watchers) and each subscriber of its job gets the batch's
encoded events appended to its pending list and one wake-up: a watcher writes everything
pending in one chunk, however many events a batch holds. An idle replica makes no query.

Crowds: a job with more than CROWD_WATCHERS watchers is delivered in batches, at most every
crowd_pace_s(watchers) (0.1 s, growing with the audience to 0.5 s: about CROWD_WRITES_PER_S
writes a second per job). While every watched job is such a crowd, the thread also polls at
most that often (a new subscriber ends the gap), instead of once per commit.

Memory per subscriber is bounded: one whose pending list would exceed `queue_size` events (a
client reading slower than its job prints) is dropped and flagged `overflowed`; it then
catches up from the database (in pages) and subscribes again, instead of making the relay
wait or buffer without bound.

Queue positions: while a watched job may still be waiting, the same thread reads the queue
snapshot after a change (at most every QUEUE_REFRESH_S) and offers each subscriber an encoded
`event: queue` (no id) whenever its job's position changed (policy.jobs_ahead: the claim order). A
claim writes no event, but it moves the change token, which is what triggers the read.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from ci_common.models import JobEvent
from ci_common.repository import Repository
from ci_persistence.policy import POLL_BATCH, jobs_ahead
from ci_server.sse import EncodedBatch, EncodedEvent, EncodingCache, encode_position

logger = logging.getLogger(__name__)

SUBSCRIBER_QUEUE_EVENTS = 4096  # pending events per subscriber before it must catch up
ERROR_BACKOFF_S = 1.0  # after a failed poll (database busy or gone), wait before the next
STOP_TIMEOUT_S = 5.0
# A job with more watchers than this gets its events delivered in paced batches (see
# crowd_pace_s and fan_out): writes, not encoding or reading, are what a thousand watchers cost.
CROWD_WATCHERS = 100
CROWD_PACE_S = 0.1  # the shortest pace, up to CROWD_WRITES_PER_S * CROWD_PACE_S watchers (400)
# Above that the pace grows with the audience so that a job's watchers are written to about
# this often a second between them (1,000 watchers: every 0.25 s), up to CROWD_MAX_PACE_S.
# A person reading a log does not need ten updates a second; the replica's CPU is per write.
CROWD_WRITES_PER_S = 4000
CROWD_MAX_PACE_S = 0.5
DEFAULT_KEEPALIVE_S = 15.0  # quiet streams get a comment within 1 to 1.5 times this
# The longest the thread sleeps before looking at the token by itself. The repository wakes
# it on every change and on stop() (interrupt_waits), so this only bounds the cost of a lost
# notification; it is not a polling period.
WAIT_SLICE_S = 30.0
# Queue positions are read at most this often (a read of every waiting job): a client sees a
# new position within this long, and a busy database is not read once per output line.
QUEUE_REFRESH_S = 0.2
# ... and, when the queue is long, spend at most about a tenth of the thread on it: a read of
# 10,000 waiting jobs takes ~0.1 s on SQLite here, and events wait behind it.
QUEUE_READ_SHARE = 0.1
_UNSENT = -1  # no position sent to the subscriber yet


def crowd_pace_s(watchers: int) -> float:
    """The least time between two deliveries to a job's `watchers` (0: deliver at once)."""
    if watchers <= CROWD_WATCHERS:
        return 0.0
    return min(CROWD_MAX_PACE_S, max(CROWD_PACE_S, watchers / CROWD_WRITES_PER_S))


class Subscription:
    """One SSE client's view of one job: encoded events the relay appends, bounded."""

    def __init__(self, job_id: str, maxsize: int = SUBSCRIBER_QUEUE_EVENTS) -> None:
        self.job_id = job_id
        self.maxsize = maxsize
        self.overflowed = False  # set by the relay when it had to drop this subscriber
        self.position: int | None = _UNSENT  # the last queue position offered
        self.may_wait = True  # its job may still be waiting (cleared once seen otherwise)
        self._pending: deque[EncodedEvent] = deque()
        # The relay's batch when it is everything pending (then taken as is, see take_nowait).
        self._whole: EncodedBatch | None = None
        # A wake-up flag and the one future a waiting take() sleeps on: what asyncio.Event does,
        # without its waiter list and loop checks (a thousand watchers wake a few times a
        # second each, and Event.set/wait showed in the profile).
        self._woken = False
        self._waiter: asyncio.Future[None] | None = None
        self._quiet_ticks = 0  # relay ticks (half keep-alive periods) since the last offer

    def offer(self, events: list[EncodedEvent]) -> bool:
        """Append a batch (event loop); False, appending nothing, when it would not fit."""
        if len(self._pending) + len(events) > self.maxsize:
            return False
        self._whole = events if not self._pending and isinstance(events, EncodedBatch) else None
        self._pending.extend(events)
        self._quiet_ticks = 0
        self._wake()
        return True

    def _wake(self) -> None:
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def tick(self) -> None:
        """Half a keep-alive period passed (the relay's ticker): after two with nothing
        offered, wake the stream with nothing, so it sends a keep-alive comment."""
        self._quiet_ticks += 1
        if self._quiet_ticks >= 2:
            self._quiet_ticks = 0
            self._wake()

    def empty(self) -> bool:
        return not self._pending

    def pending(self) -> int:
        return len(self._pending)

    def take_nowait(self) -> list[EncodedEvent]:
        """Everything pending, oldest first (possibly nothing); when that is one relay batch,
        the batch itself, shared with the job's other watchers: not to be changed."""
        whole, self._whole = self._whole, None
        taken = whole if whole is not None and len(whole) == len(self._pending) \
            else list(self._pending)
        self._pending.clear()
        self._woken = False
        return taken

    async def take(self) -> list[EncodedEvent]:
        """Everything pending, waiting for something; [] when a keep-alive is due (or the
        relay dropped this subscriber). No timer per wait: with a thousand watchers and a line
        every few ms, one timer per line per watcher cost more than the writes."""
        if not self._pending and not self._woken:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return self.take_nowait()


class EventRelay:
    """Waits for new events in one thread and fans them out to subscribers, encoded once."""

    def __init__(self, repository: Repository, queue_size: int = SUBSCRIBER_QUEUE_EVENTS,
                 keepalive_s: float = DEFAULT_KEEPALIVE_S) -> None:
        self._repository = repository
        self._queue_size = queue_size
        self._keepalive_s = keepalive_s
        self._ticker: asyncio.Task[None] | None = None
        self._held: dict[str, list[EncodedEvent]] = {}  # paced jobs' events awaiting a flush
        self._last_flush: dict[str, float] = {}  # job id → monotonic time of its last delivery
        self.encodings = EncodingCache()
        self._subscribers: dict[str, set[Subscription]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._hurry = threading.Event()  # a new subscriber: end a gap between polls (see _run)
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._cursor: int | None = None
        self.polls = 0  # poll_events calls made, for tests and metrics
        # _subscribers is changed on the event loop; the thread reads which jobs to place.
        self._subscribers_lock = threading.Lock()
        self._queue_due = threading.Event()  # a change or a new subscriber: place again
        # Jobs with a subscriber that may still wait; empty, a change reads no queue at all.
        self._waiting_jobs: set[str] = set()
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
        self._ticker = asyncio.create_task(self._tick_forever(), name="ci-sse-keepalive")

    async def stop(self) -> None:
        """Stop the thread and wait for it; safe to call twice."""
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        self._hurry.set()
        self._repository.interrupt_waits()
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
        """Register a subscriber; safe from any thread (the events route registers from the
        threadpool, beside its reads): the loop only reads `_subscribers` in single steps
        (membership, `len`, `list(...)`), and every change is made under the lock."""
        subscription = Subscription(job_id, self._queue_size)
        with self._subscribers_lock:
            self._subscribers.setdefault(job_id, set()).add(subscription)
            self._waiting_jobs.add(job_id)
        self._hurry.set()  # its job may have few watchers: events are not to wait for a pace
        if not self._queue_due.is_set():  # its first position, if its job waits
            self._queue_due.set()
            self._repository.interrupt_waits()  # the thread may be asleep for a while
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
                self._waiting_jobs.discard(subscription.job_id)

    def subscriber_count(self, job_id: str | None = None) -> int:
        if job_id is not None:
            return len(self._subscribers.get(job_id, ()))
        return sum(len(s) for s in list(self._subscribers.values()))  # see add_subscriber

    def fan_out(self, events: list[JobEvent]) -> None:
        """Encode each event once and append its job's events to each subscriber (event loop).

        A job watched by more than CROWD_WATCHERS is paced: its events reach the watchers at
        most every crowd_pace_s(watchers) (one timer for all of them), so a line every few ms
        costs each watcher one write per pace, not one per line. The first events after a quiet
        spell go out at once; fewer watchers are never delayed.
        """
        by_job: dict[str, list[JobEvent]] = {}
        for event in events:
            if event.job_id in self._subscribers:
                by_job.setdefault(event.job_id, []).append(event)
        now = time.monotonic()
        for job_id, job_events in by_job.items():
            encoded = [self.encodings.get(event) for event in job_events]
            held = self._held.get(job_id)
            if held is not None:  # a flush is already scheduled: join it
                held.extend(encoded)
                continue
            pace = crowd_pace_s(len(self._subscribers.get(job_id, ())))
            wait = self._last_flush.get(job_id, 0.0) + pace - now
            if pace and wait > 0 and self._loop is not None:
                self._held[job_id] = encoded
                self._loop.call_later(wait, self._flush_held, job_id)
            else:
                self._deliver(job_id, encoded, now)

    def _flush_held(self, job_id: str) -> None:
        encoded = self._held.pop(job_id, None)
        if encoded:
            self._deliver(job_id, encoded, time.monotonic())

    def _deliver(self, job_id: str, encoded: list[EncodedEvent], now: float) -> None:
        self._last_flush[job_id] = now
        encoded = EncodedBatch(encoded)  # joined once for all the job's watchers
        if len(self._last_flush) > 2 * len(self._subscribers) + 100:  # forget quiet jobs
            self._last_flush = {j: t for j, t in self._last_flush.items()
                                if j in self._subscribers}
        for subscription in list(self._subscribers.get(job_id, ())):
            if not subscription.offer(encoded):
                subscription.overflowed = True
                self.remove_subscriber(subscription)
                subscription.offer([])  # wake it: it catches up from the database

    async def _tick_forever(self) -> None:
        """One timer for every stream's keep-alive, instead of one per stream per wait."""
        while True:
            await asyncio.sleep(self._keepalive_s / 2)
            for subscriptions in list(self._subscribers.values()):
                for subscription in list(subscriptions):
                    subscription.tick()

    def fan_out_positions(self, ahead: dict[str, int], placed: set[str]) -> None:
        """Give each subscriber of a placed job its position, when it changed (event loop).

        A job in `placed` but not in `ahead` no longer waits: a subscriber that was told a
        position hears once that it is starting; none is asked about that job again.
        """
        for job_id in placed:
            position = ahead.get(job_id)
            if position is None:
                with self._subscribers_lock:
                    self._waiting_jobs.discard(job_id)
            for subscription in list(self._subscribers.get(job_id, ())):
                if position is None:
                    subscription.may_wait = False
                    if subscription.position in (_UNSENT, None):
                        continue
                elif subscription.position == position:
                    continue
                subscription.position = position
                if not subscription.offer([encode_position(position)]):
                    subscription.overflowed = True
                    self.remove_subscriber(subscription)
                    subscription.offer([])  # wake it: it catches up from the database

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

    # ----------------------------------------------------------------- the waiting thread
    def _wait_s(self) -> float:
        """How long the thread may sleep: until a due queue read is allowed, else a slice."""
        if self._queue_due.is_set():
            return max(0.0, min(WAIT_SLICE_S, self._next_queue_read - time.monotonic()))
        return WAIT_SLICE_S

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
                current = self._repository.wait_for_change(token, self._wait_s())
                if current != token and not self._stop.is_set():
                    polled = time.monotonic()
                    found = self._drain()
                    # Only now: after a failed poll the token must still look unseen. Read
                    # before polling, it moves again for a commit landing during the poll.
                    token = current
                    if self._waiting_jobs:
                        self._queue_due.set()
                    if found:
                        self._keep_pace(polled)
                self._place_waiting_jobs()
                if failing:
                    logger.info("event relay: repository answers again")
                    failing = False
            except Exception as exc:
                if not failing:
                    logger.warning("event relay: polling failed (%s); retrying", exc)
                failing = True
                self._stop.wait(ERROR_BACKOFF_S)

    def _drain(self) -> bool:
        """Poll until everything ready is handed to the loop; whether there was anything."""
        found = False
        while not self._stop.is_set():
            events, cursor = self._repository.poll_events(self._cursor)
            self.polls += 1
            self._cursor = cursor
            if not events:
                return found
            found = True
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self.fan_out, events)
            except RuntimeError:  # the loop closed under us: the app is shutting down
                self._stop.set()
                return found
            # A short page was everything ready: asking again would read nothing (a commit
            # since moved the token, and the next wait returns at once). With a line every
            # 10 ms this halves the relay's queries.
            if len(events) < POLL_BATCH:
                return found
        return found

    def poll_gap_s(self) -> float:
        """How long after a poll that found events the next may wait: the shortest pace
        among the watched jobs, so 0 as soon as one of them has few watchers (or none is
        watched). Events of unwatched jobs are dropped anyway, so when only crowds are
        watched, polling faster than their pace would only read what fan_out then holds."""
        with self._subscribers_lock:
            if not self._subscribers:
                return 0.0
            gap = CROWD_MAX_PACE_S
            for subscribers in self._subscribers.values():
                gap = min(gap, crowd_pace_s(len(subscribers)))
                if not gap:
                    break
            return gap

    def _keep_pace(self, polled: float) -> None:
        """Between two polls, wait out the watched jobs' pace (a new subscriber ends it):
        with a thousand watchers and a line every 10 ms, four reads a second, not a hundred."""
        # Cleared before the gap is reckoned: a subscriber added before the clear counts in
        # the gap (a small job's makes it zero), one added after it ends the wait.
        self._hurry.clear()
        gap = self.poll_gap_s() - (time.monotonic() - polled)
        if gap > 0 and not self._stop.is_set():
            self._hurry.wait(gap)
