"""ci_server.relay and the stream protocol, driven directly: fan-out, one reader, overflow."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from ci_common.models import (
    EventKind,
    JobEvent,
    JobOutcome,
    JobStatus,
    OutputChunk,
    OutputStream,
    utcnow,
)
from ci_persistence.memory import InMemoryRepository
from ci_server.events import ResumePoint, Since, stream_events
from ci_server.relay import EventRelay
from tests.leases import owner_fence

pytestmark = pytest.mark.timeout(30)
T = TypeVar("T")
POLL_S = 0.002


class CountingRepository(InMemoryRepository):
    """Records which threads poll and read, to check the relay's cost."""

    def __init__(self) -> None:
        super().__init__()
        self.poll_threads: set[int] = set()
        self.polls = 0
        self.fail_next_polls = 0

    def poll_events(self, cursor: int | None) -> tuple[list[JobEvent], int]:
        self.poll_threads.add(threading.get_ident())
        self.polls += 1
        if self.fail_next_polls and cursor is not None:
            self.fail_next_polls -= 1
            raise RuntimeError("database is locked")
        return super().poll_events(cursor)


def new_job(repo: InMemoryRepository) -> str:
    user = repo.create_user("u", f"u{len(repo.list_users())}@example.com")
    job = repo.create_job(user.id, b"zip", None)
    repo.mark_running(job.id, "c", utcnow(), fence=owner_fence(repo, job.id))
    return job.id


def emit(repo: InMemoryRepository, job_id: str, *texts: str) -> None:
    for text in texts:
        cursor = repo.get_job(job_id).log_cursor + 1
        repo.append_output(job_id, [OutputChunk(OutputStream.STDOUT, text)], cursor,
                           fence=owner_fence(repo, job_id))


def finish(repo: InMemoryRepository, job_id: str) -> None:
    repo.finish_job(job_id, JobOutcome(JobStatus.COMPLETED, 0, True, None), utcnow(),
                    fence=owner_fence(repo, job_id))


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(main(), timeout=20)
    return asyncio.run(bounded())


async def within(coro: Awaitable[T], seconds: float = 5.0) -> T:
    return await asyncio.wait_for(coro, timeout=seconds)


def test_events_reach_only_their_jobs_subscribers() -> None:
    repo = InMemoryRepository()
    job_a, job_b = new_job(repo), new_job(repo)

    async def main() -> tuple[list[str], bool]:
        relay = EventRelay(repo, POLL_S)
        await relay.start()
        try:
            with relay.subscribe(job_a) as sub_a, relay.subscribe(job_b) as sub_b:
                emit(repo, job_a, "a1\n", "a2\n")
                got = [(await within(sub_a.queue.get())).text for _ in range(2)]
                return got, sub_b.queue.empty()
        finally:
            await relay.stop()

    assert run(main) == (["a1\n", "a2\n"], True)


def test_events_before_start_are_not_relayed() -> None:
    repo = InMemoryRepository()
    job_id = new_job(repo)
    emit(repo, job_id, "old\n")

    async def main() -> list[str]:
        relay = EventRelay(repo, POLL_S)
        await relay.start()
        try:
            with relay.subscribe(job_id) as sub:
                emit(repo, job_id, "new\n")
                event = await within(sub.queue.get())
                await asyncio.sleep(0.02)
                later = [sub.queue.get_nowait().text for _ in range(sub.queue.qsize())]
                return [event.text, *later]
        finally:
            await relay.stop()

    assert run(main) == ["new\n"]


def test_one_reader_thread_whatever_the_number_of_clients() -> None:
    repo = CountingRepository()
    job_id = new_job(repo)
    clients = 25

    async def main() -> list[list[int]]:
        relay = EventRelay(repo, POLL_S)
        await relay.start()
        try:
            async def client() -> list[int]:
                seqs = []
                with relay.subscribe(job_id) as subscription:
                    async for event in stream_events(repo, relay, subscription,
                                                     ResumePoint(None, Since.START), 5.0):
                        if event.id is not None and event.comment is None:  # not the opening
                            seqs.append(int(event.id))
                return seqs

            tasks = [asyncio.create_task(client()) for _ in range(clients)]
            while relay.subscriber_count(job_id) < clients:
                await asyncio.sleep(0.001)
            before = repo.polls
            emit(repo, job_id, *[f"{i}\n" for i in range(20)])
            finish(repo, job_id)
            results = await within(asyncio.gather(*tasks))
            # Each change costs the relay at most two polls (one with events, one empty),
            # not one per client.
            assert repo.polls - before <= 2 * 21 + 2
            return results
        finally:
            await relay.stop()

    results = run(main)
    assert all(seqs == list(range(1, 24)) for seqs in results)
    assert len(repo.poll_threads) == 1  # one thread, so one connection for SQLite


def test_a_full_queue_drops_only_that_subscriber() -> None:
    repo = InMemoryRepository()
    job_id = new_job(repo)

    async def main() -> tuple[bool, bool, int, int]:
        relay = EventRelay(repo, POLL_S, queue_size=3)
        slow = relay.add_subscriber(job_id)
        fast = relay.add_subscriber(job_id)
        events = [JobEvent(job_id, seq, EventKind.OUTPUT, "x", OutputStream.STDOUT, utcnow())
                  for seq in range(10, 13)]
        relay.fan_out(events)
        fast.queue.get_nowait()
        fast.queue.get_nowait()
        relay.fan_out([JobEvent(job_id, 13, EventKind.OUTPUT, "y", None, utcnow())])
        return slow.overflowed, fast.overflowed, relay.subscriber_count(job_id), slow.queue.qsize()

    assert run(main) == (True, False, 1, 3)


def test_an_overflowed_stream_catches_up_from_the_database() -> None:
    repo = InMemoryRepository()
    job_id = new_job(repo)

    async def main() -> list[int]:
        relay = EventRelay(repo, POLL_S, queue_size=3)
        await relay.start()
        try:
            subscription = relay.add_subscriber(job_id)
            stream = stream_events(repo, relay, subscription, ResumePoint(None, Since.START), 5.0)
            seqs: list[int] = []
            opening = await within(stream.__anext__())
            assert opening.comment is not None
            # history: queued, running
            for _ in range(2):
                seqs.append(int((await within(stream.__anext__())).id or 0))
            emit(repo, job_id, *[f"{i}\n" for i in range(40)])  # far more than the queue holds
            finish(repo, job_id)
            # The stream is not being read: its queue overflows and the relay drops it.
            while not subscription.overflowed:
                await asyncio.sleep(0.001)
            assert relay.subscriber_count(job_id) == 0
            async for event in stream:
                if event.id is not None:
                    seqs.append(int(event.id))
            return seqs
        finally:
            await relay.stop()

    assert run(main) == list(range(1, 2 + 40 + 2))


def test_relay_survives_a_failing_poll() -> None:
    repo = CountingRepository()
    job_id = new_job(repo)

    async def main() -> list[str]:
        relay = EventRelay(repo, POLL_S)
        await relay.start()
        try:
            with relay.subscribe(job_id) as sub:
                repo.fail_next_polls = 1
                emit(repo, job_id, "after a hiccup\n")
                event = await within(sub.queue.get(), 10)
                return [event.text]
        finally:
            await relay.stop()

    assert run(main) == ["after a hiccup\n"]


def test_start_fails_when_the_repository_does() -> None:
    class Down(InMemoryRepository):
        def change_token(self) -> int:
            raise RuntimeError("unable to open database file")

    async def main() -> None:
        relay = EventRelay(Down(), POLL_S)
        with pytest.raises(RuntimeError, match="unable to open"):
            await relay.start()
        assert not relay.running
        await relay.stop()

    run(main)


def test_stop_is_idempotent_and_ends_the_thread() -> None:
    async def main() -> bool:
        relay = EventRelay(InMemoryRepository(), POLL_S)
        await relay.start()
        assert relay.running
        await relay.stop()
        await relay.stop()
        return relay.running

    assert run(main) is False



def test_queue_positions_are_sent_when_they_change_and_reading_stops_once_started() -> None:
    from ci_server.relay import QueuePosition
    from tests.leases import hold_lease

    repo = InMemoryRepository()
    user = repo.create_user("q", "q@example.com")
    first = repo.create_job(user.id, b"zip", None).id
    watched = repo.create_job(user.id, b"zip", None).id
    fence = hold_lease(repo, "controller-q")

    async def main() -> tuple[list[int | None], int, int]:
        relay = EventRelay(repo, POLL_S)
        await relay.start()
        try:
            with relay.subscribe(watched) as sub:
                seen = [await within(sub.queue.get())]  # where it stands on subscribing
                repo.create_job(user.id, b"zip", None)  # a change, but not to its position
                await asyncio.sleep(0.5)
                assert sub.queue.empty()
                repo.claim_next_job(fence)  # `first` goes: one fewer ahead
                seen.append(await within(sub.queue.get()))
                repo.claim_next_job(fence)  # its own claim: starting
                seen.append(await within(sub.queue.get()))
                reads = relay.queue_reads
                repo.mark_running(watched, "c", utcnow(), fence=fence)
                emit(repo, watched, "output\n")
                await asyncio.sleep(0.5)  # changes, but nothing watched may still wait
                events = [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]
                assert not any(isinstance(e, QueuePosition) for e in events)
                return ([p.ahead for p in seen if isinstance(p, QueuePosition)], reads,
                        relay.queue_reads)
        finally:
            await relay.stop()

    positions, reads_then, reads_after = run(main)
    assert positions == [1, 0, None]
    assert reads_after == reads_then
    assert repo.get_job(first).controller_id == "controller-q"
