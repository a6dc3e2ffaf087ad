"""ci_server.relay and the stream protocol, driven directly: fan-out, one reader, overflow."""

from __future__ import annotations

import asyncio
import json
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
from ci_server import relay as relay_module
from ci_server.events import ResumePoint, Since, stream_events
from ci_server.relay import EventRelay, Subscription, crowd_pace_s
from tests.leases import owner_fence

pytestmark = pytest.mark.timeout(30)
T = TypeVar("T")


def messages(chunk: bytes) -> list[dict[str, str]]:
    """The SSE messages in a chunk of the stream, each as {field: value} (comments as ':')."""
    found = []
    for block in chunk.decode().split("\n\n"):
        if not block:
            continue
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ") if not line.startswith(":") else (
                ":", "", line[2:])
            fields[name] = value
        found.append(fields)
    return found


def data_ids(chunk: bytes) -> list[int]:
    """The ids of the events (not comments) in a chunk."""
    return [int(m["id"]) for m in messages(chunk) if ":" not in m]


async def next_position(subscription: Subscription) -> int | None:
    """The next queue position relayed to a subscription (stored events before it skipped)."""
    while True:
        for event in await within(subscription.take()):
            if event.seq is None:
                value: int | None = json.loads(messages(event.data)[0]["data"])["ahead"]
                return value


async def texts(subscription: Subscription, count: int) -> list[str]:
    """The output texts of the next `count` events relayed to a subscription."""
    got: list[str] = []
    while len(got) < count:
        for event in await within(subscription.take()):
            got.append(json.loads(messages(event.data)[0]["data"])["text"])
    return got


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
        relay = EventRelay(repo)
        await relay.start()
        try:
            with relay.subscribe(job_a) as sub_a, relay.subscribe(job_b) as sub_b:
                emit(repo, job_a, "a1\n", "a2\n")
                got = await texts(sub_a, 2)
                return got, sub_b.empty()
        finally:
            await relay.stop()

    assert run(main) == (["a1\n", "a2\n"], True)


def test_events_before_start_are_not_relayed() -> None:
    repo = InMemoryRepository()
    job_id = new_job(repo)
    emit(repo, job_id, "old\n")

    async def main() -> list[str]:
        relay = EventRelay(repo)
        await relay.start()
        try:
            with relay.subscribe(job_id) as sub:
                emit(repo, job_id, "new\n")
                first = await texts(sub, 1)
                await asyncio.sleep(0.02)
                later = [json.loads(messages(e.data)[0]["data"])["text"]
                         for e in sub.take_nowait()]
                return [*first, *later]
        finally:
            await relay.stop()

    assert run(main) == ["new\n"]


def test_one_reader_thread_whatever_the_number_of_clients() -> None:
    repo = CountingRepository()
    job_id = new_job(repo)
    clients = 25

    async def main() -> list[list[int]]:
        relay = EventRelay(repo)
        await relay.start()
        try:
            async def client() -> list[int]:
                seqs = []
                with relay.subscribe(job_id) as subscription:
                    async for chunk in stream_events(repo, relay, subscription,
                                                     ResumePoint(None, Since.START)):
                        seqs.extend(data_ids(chunk))
                return seqs

            tasks = [asyncio.create_task(client()) for _ in range(clients)]
            while relay.subscriber_count(job_id) < clients:
                await asyncio.sleep(0.001)
            before = repo.polls
            emit(repo, job_id, *[f"{i}\n" for i in range(20)])
            finish(repo, job_id)
            results = await within(asyncio.gather(*tasks))
            # Each change costs the relay one poll (a short page is everything ready), not
            # one per client nor an extra empty one.
            assert repo.polls - before <= 21 + 2
            return results
        finally:
            await relay.stop()

    results = run(main)
    assert all(seqs == list(range(1, 24)) for seqs in results)
    assert len(repo.poll_threads) == 1  # one thread, so one connection for SQLite


def test_each_event_is_encoded_once_for_all_its_watchers() -> None:
    repo = InMemoryRepository()
    job_id = new_job(repo)
    clients = 50

    async def main() -> tuple[list[list[int]], int]:
        relay = EventRelay(repo)
        await relay.start()
        try:
            async def client(since: Since) -> list[int]:
                seqs: list[int] = []
                with relay.subscribe(job_id) as subscription:
                    async for chunk in stream_events(repo, relay, subscription,
                                                     ResumePoint(None, since)):
                        seqs.extend(data_ids(chunk))
                return seqs

            tasks = [asyncio.create_task(client(Since.START)) for _ in range(clients)]
            while relay.subscriber_count(job_id) < clients:
                await asyncio.sleep(0.001)
            emit(repo, job_id, *[f"{i}\n" for i in range(30)])
            while relay.encodings.encoded < 2 + 30:
                await asyncio.sleep(0.001)
            late = [asyncio.create_task(client(Since.NOW)) for _ in range(clients)]
            while relay.subscriber_count(job_id) < 2 * clients:
                await asyncio.sleep(0.001)
            emit(repo, job_id, *[f"{i}\n" for i in range(30, 40)])
            finish(repo, job_id)
            results = await within(asyncio.gather(*tasks, *late))
            return results, relay.encodings.encoded
        finally:
            await relay.stop()

    results, encoded = run(main)
    total = 2 + 40 + 1  # queued, running, output, end
    assert all(seqs == list(range(1, total + 1)) for seqs in results[:clients])
    for seqs in results[clients:]:  # "from now": a tail of the job, in order, no duplicate
        assert seqs == list(range(seqs[0], total + 1)) and seqs[0] >= 2 + 30
    assert encoded == total  # once each, whatever the number of watchers


def test_an_idle_relay_makes_no_repository_queries() -> None:
    """Waiting costs nothing: over a second of quiet the relay calls the repository not once."""
    calls: list[str] = []

    class Instrumented(InMemoryRepository):
        def __getattribute__(self, name: str) -> object:
            if name in ("change_token", "wait_for_change", "poll_events", "list_events",
                        "last_event_seq"):
                calls.append(name)
            return super().__getattribute__(name)

    repo = Instrumented()
    job_id = new_job(repo)

    async def main() -> tuple[int, int]:
        relay = EventRelay(repo)
        await relay.start()
        try:
            with relay.subscribe(job_id) as sub:
                emit(repo, job_id, "one\n")
                await texts(sub, 1)
                await asyncio.sleep(0.05)
                before = len(calls)
                await asyncio.sleep(1.0)
                idle = len(calls) - before
                emit(repo, job_id, "two\n")  # and it still wakes at once
                assert await texts(sub, 1) == ["two\n"]
                return idle, len(calls) - before
        finally:
            await relay.stop()

    idle, after = run(main)
    assert idle == 0
    assert after > 0  # the instrument counts: the change above was read through it


def test_a_full_queue_drops_only_that_subscriber() -> None:
    repo = InMemoryRepository()
    job_id = new_job(repo)

    async def main() -> tuple[bool, bool, int, int]:
        relay = EventRelay(repo, queue_size=3)
        slow = relay.add_subscriber(job_id)
        fast = relay.add_subscriber(job_id)
        events = [JobEvent(job_id, seq, EventKind.OUTPUT, "x", OutputStream.STDOUT, utcnow())
                  for seq in range(10, 13)]
        relay.fan_out(events)
        assert len(fast.take_nowait()) == 3
        relay.fan_out([JobEvent(job_id, 13, EventKind.OUTPUT, "y", None, utcnow())])
        return slow.overflowed, fast.overflowed, relay.subscriber_count(job_id), slow.pending()

    assert run(main) == (True, False, 1, 3)


def test_an_overflowed_stream_catches_up_from_the_database() -> None:
    repo = InMemoryRepository()
    job_id = new_job(repo)

    async def main() -> list[int]:
        relay = EventRelay(repo, queue_size=3)
        await relay.start()
        try:
            subscription = relay.add_subscriber(job_id)
            stream = stream_events(repo, relay, subscription, ResumePoint(None, Since.START))
            seqs: list[int] = []
            opening = await within(stream.__anext__())
            assert messages(opening)[0][":"].startswith("streaming events after")
            seqs.extend(data_ids(await within(stream.__anext__())))  # history: queued, running
            assert seqs == [1, 2]
            emit(repo, job_id, *[f"{i}\n" for i in range(40)])  # far more than the queue holds
            finish(repo, job_id)
            # The stream is not being read: its queue overflows and the relay drops it.
            while not subscription.overflowed:
                await asyncio.sleep(0.001)
            assert relay.subscriber_count(job_id) == 0
            async for chunk in stream:
                seqs.extend(data_ids(chunk))
            return seqs
        finally:
            await relay.stop()

    assert run(main) == list(range(1, 2 + 40 + 2))


def test_relay_survives_a_failing_poll() -> None:
    repo = CountingRepository()
    job_id = new_job(repo)

    async def main() -> list[str]:
        relay = EventRelay(repo)
        await relay.start()
        try:
            with relay.subscribe(job_id) as sub:
                repo.fail_next_polls = 1
                emit(repo, job_id, "after a hiccup\n")
                return await texts(sub, 1)
        finally:
            await relay.stop()

    assert run(main) == ["after a hiccup\n"]


def test_start_fails_when_the_repository_does() -> None:
    class Down(InMemoryRepository):
        def change_token(self) -> int:
            raise RuntimeError("unable to open database file")

    async def main() -> None:
        relay = EventRelay(Down())
        with pytest.raises(RuntimeError, match="unable to open"):
            await relay.start()
        assert not relay.running
        await relay.stop()

    run(main)


def test_stop_is_idempotent_and_ends_the_thread() -> None:
    async def main() -> bool:
        relay = EventRelay(InMemoryRepository())
        await relay.start()
        assert relay.running
        await relay.stop()
        await relay.stop()
        return relay.running

    assert run(main) is False



def test_a_crowded_job_is_paced_in_order_and_a_quiet_one_is_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Above CROWD_WATCHERS, events close together reach the watchers in one batch per pace."""
    monkeypatch.setattr(relay_module, "CROWD_WATCHERS", 2)
    repo = InMemoryRepository()
    crowded, quiet = new_job(repo), new_job(repo)

    def event(job_id: str, seq: int) -> JobEvent:
        return JobEvent(job_id, seq, EventKind.OUTPUT, f"{seq}\n", OutputStream.STDOUT, utcnow())

    async def main() -> tuple[list[list[int]], list[list[int]]]:
        relay = EventRelay(repo)
        relay._loop = asyncio.get_running_loop()  # fan_out is driven by hand here
        many = [relay.add_subscriber(crowded) for _ in range(3)]
        few = relay.add_subscriber(quiet)
        batches: list[list[int]] = []
        single: list[list[int]] = []
        relay.fan_out([event(crowded, 10), event(quiet, 10)])  # after quiet: at once
        batches.append([e.seq for e in many[0].take_nowait()])
        single.append([e.seq for e in few.take_nowait()])
        relay.fan_out([event(crowded, 11), event(quiet, 11)])
        relay.fan_out([event(crowded, 12)])
        assert many[0].empty()  # held for the pace
        single.append([e.seq for e in few.take_nowait()])
        for subscription in many:
            got = await within(subscription.take())
            if subscription is many[0]:
                batches.append([e.seq for e in got])
        return batches, single

    batches, single = run(main)
    assert batches == [[10], [11, 12]]
    assert single == [[10], [11]]


def test_the_pace_grows_with_the_audience_within_bounds() -> None:
    """Few watchers are never delayed; a crowd gets fewer writes the larger it is, capped."""
    assert crowd_pace_s(1) == crowd_pace_s(100) == 0.0
    assert crowd_pace_s(101) == crowd_pace_s(400) == 0.1
    assert crowd_pace_s(1000) == pytest.approx(0.25)
    assert crowd_pace_s(2000) == crowd_pace_s(1_000_000) == 0.5


def test_the_relay_polls_at_a_crowds_pace_only_while_every_watched_job_is_a_crowd(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_module, "CROWD_WATCHERS", 2)
    repo = InMemoryRepository()
    crowded, quiet = new_job(repo), new_job(repo)
    relay = EventRelay(repo)
    assert relay.poll_gap_s() == 0.0  # nobody watches: nothing to pace
    crowd = [relay.add_subscriber(crowded) for _ in range(3)]
    assert relay.poll_gap_s() == crowd_pace_s(3) > 0
    lone = relay.add_subscriber(quiet)
    assert relay.poll_gap_s() == 0.0  # its watcher is not to wait for the crowd's pace
    relay.remove_subscriber(lone)
    relay.remove_subscriber(crowd[0])
    assert relay.poll_gap_s() == 0.0  # two watchers are no crowd


def test_queue_positions_are_sent_when_they_change_and_reading_stops_once_started() -> None:
    from tests.leases import hold_lease

    repo = InMemoryRepository()
    user = repo.create_user("q", "q@example.com")
    first = repo.create_job(user.id, b"zip", None).id
    watched = repo.create_job(user.id, b"zip", None).id
    fence = hold_lease(repo, "controller-q")

    async def main() -> tuple[list[int | None], int, int]:
        relay = EventRelay(repo)
        await relay.start()
        try:
            with relay.subscribe(watched) as sub:
                seen = [await next_position(sub)]  # where it stands on subscribing
                repo.create_job(user.id, b"zip", None)  # a change, but not to its position
                await asyncio.sleep(0.5)
                assert sub.empty()
                repo.claim_next_job(fence)  # `first` goes: one fewer ahead
                seen.append(await next_position(sub))
                repo.claim_next_job(fence)  # its own claim: starting
                seen.append(await next_position(sub))
                reads = relay.queue_reads
                repo.mark_running(watched, "c", utcnow(), fence=fence)
                emit(repo, watched, "output\n")
                await asyncio.sleep(0.5)  # changes, but nothing watched may still wait
                assert all(e.seq is not None for e in sub.take_nowait())  # no position
                return seen, reads, relay.queue_reads
        finally:
            await relay.stop()

    positions, reads_then, reads_after = run(main)
    assert positions == [1, 0, None]
    assert reads_after == reads_then
    assert repo.get_job(first).controller_id == "controller-q"


def test_a_seq_handed_over_twice_in_one_batch_is_sent_once() -> None:
    repo = InMemoryRepository()
    job_id = new_job(repo)

    def event(seq: int) -> JobEvent:
        return JobEvent(job_id, seq, EventKind.OUTPUT, f"{seq}\n", OutputStream.STDOUT, utcnow())

    async def main() -> list[int]:
        relay = EventRelay(repo)
        await relay.start()
        try:
            subscription = relay.add_subscriber(job_id)
            stream = stream_events(repo, relay, subscription, ResumePoint(None, Since.NOW))
            await within(stream.__anext__())  # the opening comment
            relay.fan_out([event(3), event(4), event(4), event(3), event(5)])
            return data_ids(await within(stream.__anext__()))
        finally:
            await relay.stop()

    assert run(main) == [3, 4, 5]
