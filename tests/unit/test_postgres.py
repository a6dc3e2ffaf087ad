"""PostgresRepository under real concurrency: what the contract suite cannot see from one thread.

Each test gets a fresh database on the session's throwaway server (tests/postgres.py); raw
psycopg connections play the other clients (a transaction that commits late, a migrator).
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from ci_common.errors import DatabaseUnavailable, LeaseLost
from ci_common.models import EventKind, JobEvent, JobOutcome, JobStatus, OutputChunk, OutputStream
from ci_common.settings import Settings
from ci_persistence import open_repository
from ci_persistence.pg_connection import CHANGES_CHANNEL
from ci_persistence.pg_migrate import postgres_migrations
from ci_persistence.postgres import PostgresRepository
from tests.leases import hold_lease
from tests.postgres import PostgresServer, free_port

SPAWN = multiprocessing.get_context("spawn")
TIMEOUT_S = 60
PASSED = JobOutcome(status=JobStatus.COMPLETED, exit_code=0, success=True, reason=None)


@pytest.fixture
def repo(postgres_url: str) -> Iterator[PostgresRepository]:
    repository = PostgresRepository(postgres_url)
    yield repository
    repository.close()


def out(text: str) -> OutputChunk:
    return OutputChunk(stream=OutputStream.STDOUT, text=text)


def running_jobs(repo: PostgresRepository, count: int, controller: str = "ctl") -> list[str]:
    user = repo.create_user("Ada", f"ada-{controller}@example.com")
    fence = hold_lease(repo, controller)
    ids = [repo.create_job(user.id, b"zip", None).id for _ in range(count)]
    for _ in ids:
        job = repo.claim_next_job(fence)
        assert job is not None
        repo.mark_running(job.id, "c", datetime.now(UTC), fence=fence)
    return ids


class Relay:
    """What a server's relay does: poll from "now", each event once, until told to stop."""

    def __init__(self, repo: PostgresRepository) -> None:
        self.repo = repo
        self.token = repo.change_token()
        _, self.cursor = repo.poll_events(None)
        self.seen: list[JobEvent] = []

    def poll_for(self, seconds: float) -> list[JobEvent]:
        """Poll whenever the change token moves, for `seconds`; everything seen so far."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            current = self.repo.change_token()
            if current != self.token:
                self.token = current
                while True:
                    events, self.cursor = self.repo.poll_events(self.cursor)
                    self.seen.extend(events)
                    if not events:
                        break
            time.sleep(0.002)
        return self.seen

    def poll_until(self, count: int, timeout_s: float = 10.0) -> list[JobEvent]:
        """Poll until `count` events were seen (or timeout_s), then a little longer: a
        duplicate or a straggler would show."""
        deadline = time.monotonic() + timeout_s
        while len(self.seen) < count and time.monotonic() < deadline:
            self.poll_for(0.02)
        return self.poll_for(0.1)


def by_job(events: list[JobEvent]) -> dict[str, list[int]]:
    seqs: dict[str, list[int]] = defaultdict(list)
    for event in events:
        seqs[event.job_id].append(event.seq)
    return seqs


def insert_event(conn: psycopg.Connection[Any], job_id: str, seq: int, text: str) -> None:
    """An event row as a writer in another process leaves it, NOTIFY included (at commit)."""
    conn.execute("INSERT INTO job_events (job_id, seq, kind, stream, text, created_at) "
                 "VALUES (%s, %s, 'output', 'stdout', %s, now())",
                 (job_id, seq, text.encode()))
    conn.execute("SELECT pg_notify(%s, 'another process')", (CHANGES_CHANNEL,))


# --------------------------------------------------------------------------- poll_events
def test_a_row_that_commits_late_is_not_skipped(repo: PostgresRepository,
                                                postgres_url: str) -> None:
    slow_job, *fast_jobs = running_jobs(repo, 4)
    relay = Relay(repo)
    with psycopg.connect(postgres_url) as slow:
        insert_event(slow, slow_job, 1000, "late\n")  # takes its id now, commits much later

        def write_fast(job_id: str) -> None:
            fence = hold_lease(repo, "ctl")
            for n in range(20):
                repo.append_output(job_id, [out(f"{n}\n")], n + 1, fence=fence)

        writers = [threading.Thread(target=write_fast, args=(job,)) for job in fast_jobs]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(TIMEOUT_S)
        # Everything committed after the slow row took its id waits behind it...
        assert relay.poll_for(0.3) == []
        slow.commit()
    seen = relay.poll_until(1 + 20 * len(fast_jobs))
    # ...and nothing is lost or repeated once it commits.
    assert by_job(seen) == {slow_job: [1000], **{job: list(range(3, 23)) for job in fast_jobs}}


def test_a_transaction_with_an_older_id_committing_first_is_not_skipped_either(
        repo: PostgresRepository, postgres_url: str) -> None:
    # The transaction id is given at the first write, the row id at insert: a transaction can
    # have the older transaction id and the newer row. Filtering by transaction id but paging
    # by row id would hand out its row and step over the other's.
    job_a, job_b = running_jobs(repo, 2)
    relay = Relay(repo)
    with psycopg.connect(postgres_url) as early, psycopg.connect(postgres_url) as late:
        early.execute("SELECT pg_current_xact_id()")  # the older transaction id
        insert_event(late, job_a, 1000, "older row, newer transaction\n")
        insert_event(early, job_b, 1000, "newer row, older transaction\n")
        early.commit()
        first = list(relay.poll_for(0.1))
        late.commit()
    seen = relay.poll_until(2)
    assert by_job(seen) == {job_a: [1000], job_b: [1000]}
    assert [event.job_id for event in first] in ([], [job_b])


def test_a_page_spanning_a_new_digit_in_the_transaction_id_stays_in_order(
        repo: PostgresRepository, postgres_url: str) -> None:
    # Transaction ids sorted as text put '1000' before '999': burn ids up to just below the
    # next power of ten, then write one event per transaction across it and read one page.
    (job,) = running_jobs(repo, 1)
    fence = hold_lease(repo, "ctl")
    _, cursor = repo.poll_events(None)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
        assert row is not None
        boundary = 10 ** len(row[0])
        conn.execute(f"DO $$ BEGIN FOR i IN 1..{boundary - int(row[0]) - 4} LOOP "
                     "PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$")
        written = [repo.append_output(job, [out(f"{n}\n")], n + 1, fence=fence)[0].seq
                   for n in range(8)]
        xids = [int(x) for (x,) in conn.execute(
            "SELECT xid::text FROM job_events WHERE job_id = %s AND seq = ANY(%s)",
            (job, written)).fetchall()]
    assert min(xids) < boundary <= max(xids)  # the page does span the new digit
    events, _ = repo.poll_events(cursor)
    assert [e.seq for e in events if e.job_id == job] == written


def test_a_rollback_does_not_hold_events_back(repo: PostgresRepository,
                                              postgres_url: str) -> None:
    slow_job, fast_job = running_jobs(repo, 2)
    fence = hold_lease(repo, "ctl")
    relay = Relay(repo)
    with psycopg.connect(postgres_url) as slow:
        insert_event(slow, slow_job, 1000, "never\n")
        repo.append_output(fast_job, [out("fast\n")], 1, fence=fence)
        assert relay.poll_for(0.15) == []
        slow.rollback()  # no NOTIFY: the token must move by itself
    seen = relay.poll_until(1)
    assert [(e.job_id, e.text) for e in seen] == [(fast_job, "fast\n")]


def test_each_jobs_events_stay_in_order_while_a_take_over_races_late_writes(
        repo: PostgresRepository, postgres_url: str) -> None:
    gone_jobs = running_jobs(repo, 6, controller="gone")
    gone = repo.get_lease("gone")
    taker = repo.acquire_lease("taker", "h", 2, "t", datetime.now(UTC), 60.0)
    assert gone is not None
    relay = Relay(repo)
    other = PostgresRepository(postgres_url)
    barrier = threading.Barrier(2)
    refused: list[BaseException] = []

    def write_late() -> None:
        barrier.wait(TIMEOUT_S)
        n = 0
        try:
            while True:
                n += 1
                for job_id in reversed(gone_jobs):
                    other.append_output(job_id, [out(f"{n}\n")], n, fence=gone.fence)
        except LeaseLost as exc:
            refused.append(exc)

    writer = threading.Thread(target=write_late)
    writer.start()
    barrier.wait(TIMEOUT_S)
    time.sleep(0.05)
    later = datetime.now(UTC).replace(year=datetime.now(UTC).year + 1)
    done = repo.take_over(gone, taker.fence, False, later)
    writer.join(TIMEOUT_S)
    other.close()
    assert done is not None and sorted(done.failed) == sorted(gone_jobs) and refused
    expected = sum(len(repo.list_events(job_id)) - 2 for job_id in gone_jobs)
    seen = relay.poll_until(expected)
    for job_id in gone_jobs:
        stored = [e.seq for e in repo.list_events(job_id) if e.seq > 2]
        assert by_job(seen)[job_id] == stored  # every one, once, in seq order
        assert repo.list_events(job_id)[-1].kind is EventKind.END


def test_a_take_over_waiting_on_a_late_write_still_ends_the_job_last(
        repo: PostgresRepository, postgres_url: str) -> None:
    # The taker's lease row sorts first, so the take-over locks it (and so gets its
    # transaction id) before it waits for the gone controller's row, which a fenced write in
    # flight holds. A late write landing in that wait must not be ordered after the END.
    [job_id] = running_jobs(repo, 1, controller="gone")
    gone = repo.get_lease("gone")
    taker = repo.acquire_lease("a-taker", "h", 2, "t", datetime.now(UTC), 60.0)
    assert gone is not None and taker.id < gone.id
    relay = Relay(repo)
    other = PostgresRepository(postgres_url)
    outcomes: dict[str, object] = {}

    def call(name: str, action: Any) -> threading.Thread:
        def run() -> None:
            try:
                outcomes[name] = action()
            except LeaseLost as exc:
                outcomes[name] = exc
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    later = datetime.now(UTC).replace(year=datetime.now(UTC).year + 1)
    with psycopg.connect(postgres_url) as in_flight:
        in_flight.execute("SELECT 1 FROM controllers WHERE id = 'gone' FOR KEY SHARE")
        taking = call("take_over", lambda: repo.take_over(gone, taker.fence, False, later))
        time.sleep(0.3)
        writing = call("write", lambda: other.append_output(
            job_id, [out("late\n")], 1, fence=gone.fence))
        time.sleep(0.3)
    taking.join(TIMEOUT_S)
    writing.join(TIMEOUT_S)
    other.close()
    assert outcomes["take_over"] is not None
    stored = [e.seq for e in repo.list_events(job_id) if e.seq > 2]
    assert repo.list_events(job_id)[-1].kind is EventKind.END
    assert by_job(relay.poll_until(len(stored)))[job_id] == stored


# --------------------------------------------------------------------------- change token
def test_change_token_moves_for_another_clients_commit_and_only_then(
        repo: PostgresRepository, postgres_url: str) -> None:
    other = PostgresRepository(postgres_url)
    try:
        before = repo.change_token()
        other.create_user("Bob", "bob@example.com")
        deadline = time.monotonic() + 5
        while repo.change_token() == before and time.monotonic() < deadline:
            time.sleep(0.001)
        moved = repo.change_token()
        assert moved != before
        repo.list_users()
        time.sleep(0.2)  # nothing is held back, nobody writes: it stays put
        assert repo.change_token() == moved
    finally:
        other.close()


# --------------------------------------------------------------------------- claiming
def _claim_all(url: str, name: str, barrier: Any, results: Any) -> None:
    try:
        repo = PostgresRepository(url)
        fence = hold_lease(repo, name)
        barrier.wait(timeout=TIMEOUT_S)
        claimed = []
        while (job := repo.claim_next_job(fence)) is not None:
            claimed.append(job.id)
            repo.append_output(job.id, [out(f"{name}\n")], 1, fence=fence)
            repo.finish_job(job.id, PASSED, datetime.now(UTC), fence=fence)
        repo.close()
        results.put(("ok", name, claimed))
    except BaseException as exc:
        barrier.abort()
        results.put(("error", name, repr(exc)))


def test_two_processes_never_claim_one_job_twice(repo: PostgresRepository,
                                                 postgres_url: str) -> None:
    users = [repo.create_user(f"u{i}", f"u{i}@example.com") for i in range(3)]
    created = {repo.create_job(users[i % 3].id, b"zip", None).id for i in range(90)}
    barrier, results = SPAWN.Barrier(2), SPAWN.Queue()
    processes = [SPAWN.Process(target=_claim_all, args=(postgres_url, name, barrier, results))
                 for name in ("alpha", "beta")]
    for process in processes:
        process.start()
    outcome = [results.get(timeout=TIMEOUT_S) for _ in processes]
    for process in processes:
        process.join(TIMEOUT_S)
    assert all(item[0] == "ok" for item in outcome), outcome
    claimed = [job for item in outcome for job in item[2]]
    assert sorted(claimed) == sorted(created), "a job was claimed twice, or never"
    assert repo.count_queued_jobs() == 0
    for job_id in created:
        assert [e.kind for e in repo.list_events(job_id)] == [
            EventKind.STATUS, EventKind.OUTPUT, EventKind.END]


def test_claiming_threads_take_turns_between_users(repo: PostgresRepository) -> None:
    ada, bob = (repo.create_user(n, f"{n}@example.com") for n in ("ada", "bob"))
    for _ in range(10):
        repo.create_job(ada.id, b"zip", None)
    for _ in range(2):
        repo.create_job(bob.id, b"zip", None)
    fence = hold_lease(repo, "ctl")
    first_four = [repo.claim_next_job(fence) for _ in range(4)]
    assert [job.user_id for job in first_four if job] == [ada.id, bob.id, ada.id, bob.id]


def test_claims_at_the_same_moment_still_take_turns_between_users(
        repo: PostgresRepository, postgres_url: str) -> None:
    """Several controllers claiming at once each see the claims committed before theirs.

    Under READ COMMITTED a claim that only skipped the row another claim had locked would
    count the busy users from before that claim, and take the same user's next job: one
    user's burst would get most slots. Claims are serialised (a transaction-scoped advisory
    lock), so eight at once give both users four each, as eight claims in a row do.
    """
    ada, bob = (repo.create_user(n, f"{n}@example.com") for n in ("ada", "bob"))
    for _ in range(10):
        repo.create_job(ada.id, b"zip", None)  # ada's burst is older: every tie is hers
    for _ in range(10):
        repo.create_job(bob.id, b"zip", None)
    repos = [PostgresRepository(postgres_url) for _ in range(8)]
    fences = [hold_lease(r, f"ctl{i}") for i, r in enumerate(repos)]
    barrier = threading.Barrier(len(repos))
    claimed: list[str] = []

    def claim(index: int) -> None:
        barrier.wait(timeout=TIMEOUT_S)
        job = repos[index].claim_next_job(fences[index])
        assert job is not None
        claimed.append(job.user_id)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(repos))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT_S)
    finally:
        for r in repos:
            r.close()
    assert sorted(claimed) == sorted([ada.id] * 4 + [bob.id] * 4)


# --------------------------------------------------------------------------- migrations
def test_migrations_are_recorded_and_reopening_applies_nothing(
        postgres_server: PostgresServer) -> None:
    name = postgres_server.create_database(template=None)  # empty, as a new install finds it
    url = postgres_server.url(name)
    try:
        repo = open_repository(Settings(database_url=url, db_path="/nonexistent/ci.db"))
        assert isinstance(repo, PostgresRepository)
        latest = postgres_migrations()[-1].version
        assert repo.schema_version == latest
        given = repo.installation_id()
        repo.close()
        again = PostgresRepository(url)
        assert again.schema_version == latest and again.installation_id() == given
        again.close()
        with psycopg.connect(url) as conn:
            versions = conn.execute("SELECT version FROM schema_migrations").fetchall()
        assert [v for (v,) in versions] == list(range(1, latest + 1))
    finally:
        postgres_server.drop_database(name)


def test_several_processes_starting_at_once_migrate_a_new_database_once(
        postgres_server: PostgresServer) -> None:
    names = [postgres_server.create_database(template=None) for _ in range(3)]
    errors: list[BaseException] = []
    installations: dict[str, set[str]] = defaultdict(set)

    def start(url: str, barrier: threading.Barrier) -> None:
        try:
            barrier.wait(TIMEOUT_S)
            repo = PostgresRepository(url)
            installations[url].add(repo.installation_id())
            repo.close()
        except BaseException as exc:
            errors.append(exc)

    try:
        for name in names:
            barrier = threading.Barrier(4)
            threads = [threading.Thread(target=start, args=(postgres_server.url(name), barrier))
                       for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(TIMEOUT_S)
        assert not errors, errors
        assert all(len(ids) == 1 for ids in installations.values())
        assert len({next(iter(ids)) for ids in installations.values()}) == len(names)
    finally:
        for name in names:
            postgres_server.drop_database(name)


# --------------------------------------------------------------------------- faults
def test_an_unreachable_server_is_one_error_naming_the_url_without_its_password() -> None:
    url = f"postgresql://ci:hunter2-secret@127.0.0.1:{free_port()}/ci"
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as refused:
        PostgresRepository(url)
    assert time.monotonic() - started < 5
    message = refused.value.message
    assert f"postgresql://ci@127.0.0.1:{url.rsplit(':', 1)[1]}" in message
    assert "hunter2" not in message and "\n" not in message


def test_a_restarted_server_is_503_material_at_once_and_usable_as_soon_as_it_is_back() -> None:
    """Down: calls fail fast with DatabaseUnavailable (no 30 s pool wait). Back: the very next
    call works (no reconnect backoff left over from the outage)."""
    server = PostgresServer().start()
    try:
        url = server.url(server.create_database(template=None), password="pw-7c1e")
        repo = PostgresRepository(url)
        try:
            user = repo.create_user("Ada", "ada@example.com")
            server.go_down()
            for _ in range(3):  # the broken pooled connection, then direct probes
                started = time.monotonic()
                with pytest.raises(DatabaseUnavailable) as refused:
                    repo.get_user(user.id)
                assert time.monotonic() - started < 5
                assert "pw-7c1e" not in refused.value.message
            time.sleep(3)  # long enough for psycopg-pool's backoff to have grown
            server.come_back()
            started = time.monotonic()
            assert repo.get_user(user.id) == user
            assert time.monotonic() - started < 2
        finally:
            repo.close()
    finally:
        server.stop()
