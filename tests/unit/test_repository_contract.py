"""The Repository contract (ci_common/repository.py), checked against every implementation."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ci_common.errors import AlreadyExists, ControllerIdInUse, LeaseLost, NotFound
from ci_common.models import (
    ControllerLease,
    EnvKey,
    EnvState,
    EventKind,
    Fence,
    Job,
    JobOutcome,
    JobStatus,
    OutputChunk,
    OutputStream,
    PruneResult,
    SlowTest,
    TakeOver,
    TestReport,
    User,
)
from ci_common.repository import MAX_STORED_INT, Repository
from ci_common.settings import format_size
from ci_common.wire import EndData
from ci_persistence import InMemoryRepository, SqliteRepository
from ci_persistence.migrate import load_migrations
from ci_persistence.postgres import PostgresRepository
from ci_persistence.waiting import SAFETY_RECHECK_S
from tests.leases import hold_lease, owner_fence

CTRL = "controller-1"
PASSED = JobOutcome(status=JobStatus.COMPLETED, exit_code=0, success=True, reason=None)
TIMED_OUT = JobOutcome(status=JobStatus.FAILED, exit_code=None, success=False, reason="timed out")


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Repository]:
    if request.param == "memory":
        repository: Repository = InMemoryRepository()
    elif request.param == "sqlite":
        repository = SqliteRepository(str(tmp_path / "ci.db"))
    else:  # a server is started only when a PostgreSQL test runs
        repository = PostgresRepository(request.getfixturevalue("postgres_url"))
    yield repository
    repository.close()


@pytest.fixture
def user(repo: Repository) -> User:
    return repo.create_user("Ada", "ada@example.com")


def out(text: str, stream: OutputStream = OutputStream.STDOUT) -> OutputChunk:
    return OutputChunk(stream=stream, text=text)


def new_jobs(repo: Repository, user: User, count: int) -> list[Job]:
    """Jobs with distinct created_at, so 'oldest first' is unambiguous."""
    jobs = []
    for _ in range(count):
        jobs.append(repo.create_job(user.id, b"PK-zip", None))
        time.sleep(0.002)
    return jobs


def running_job(repo: Repository, user: User) -> Job:
    job = repo.create_job(user.id, b"zip", None)
    assert repo.claim_next_job(hold_lease(repo, CTRL)) is not None
    return repo.mark_running(job.id, "container-1", datetime.now(UTC),
                             fence=owner_fence(repo, job.id))


def is_aware_utc(when: datetime | None) -> bool:
    return when is not None and when.utcoffset() == timedelta(0)


# --------------------------------------------------------------------------- installation
def test_installation_id_is_random_per_database_and_stable(repo: Repository,
                                                           tmp_path: Path) -> None:
    first = repo.installation_id()
    assert len(first) == 32 and int(first, 16) >= 0
    assert repo.installation_id() == first
    other = SqliteRepository(str(tmp_path / "other.db"))
    try:
        assert other.installation_id() != first
    finally:
        other.close()


def test_installation_id_survives_reopening_and_is_given_to_an_old_database(
        tmp_path: Path) -> None:
    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path)  # a database as schema version 1 left it
    for statement in load_migrations()[0].statements:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    upgraded = SqliteRepository(path)
    given = upgraded.installation_id()
    upgraded.close()
    reopened = SqliteRepository(path)
    try:
        assert reopened.installation_id() == given
    finally:
        reopened.close()


# --------------------------------------------------------------------------- lifecycle
def test_close_twice_is_safe(repo: Repository) -> None:
    repo.close()
    repo.close()


def test_change_token_is_stable_without_writes_and_moves_after_each_write(
    repo: Repository, user: User
) -> None:
    assert repo.change_token() == repo.change_token()
    seen = [repo.change_token()]
    job = repo.create_job(user.id, b"zip", None)
    seen.append(repo.change_token())
    repo.claim_next_job(hold_lease(repo, CTRL))
    seen.append(repo.change_token())
    repo.append_output(job.id, [out("line\n")], 1, fence=owner_fence(repo, job.id))
    seen.append(repo.change_token())
    repo.finish_job(job.id, PASSED, datetime.now(UTC), fence=owner_fence(repo, job.id))
    seen.append(repo.change_token())
    repo.set_user_active(user.id, False)
    seen.append(repo.change_token())
    assert len(set(seen)) == len(seen)
    repo.get_job(job.id)
    repo.list_events(job.id)
    assert repo.change_token() == seen[-1]


# --------------------------------------------------------------------------- users
def test_create_and_get_user(repo: Repository) -> None:
    user = repo.create_user("Ada", "Ada@Example.com")
    assert uuid.UUID(user.id).version == 4
    assert (user.name, user.email, user.is_active) == ("Ada", "Ada@Example.com", True)
    assert is_aware_utc(user.created_at)
    assert repo.get_user(user.id) == user
    assert repo.get_user_by_email("ada@example.COM") == user


def test_duplicate_email_is_refused_case_insensitively(repo: Repository, user: User) -> None:
    with pytest.raises(AlreadyExists):
        repo.create_user("Other", "ada@example.com")
    with pytest.raises(AlreadyExists):
        repo.create_user("Other", "ADA@EXAMPLE.COM")
    assert repo.list_users() == [user]


def test_missing_users_raise_not_found(repo: Repository) -> None:
    with pytest.raises(NotFound):
        repo.get_user(str(uuid.uuid4()))
    with pytest.raises(NotFound):
        repo.get_user_by_email("nobody@example.com")
    with pytest.raises(NotFound):
        repo.set_user_active(str(uuid.uuid4()), False)


def test_list_users_oldest_first(repo: Repository) -> None:
    created = [repo.create_user(f"u{i}", f"u{i}@example.com") for i in range(4)]
    assert repo.list_users() == created


def test_set_user_active(repo: Repository, user: User) -> None:
    off = repo.set_user_active(user.id, False)
    assert off.is_active is False
    assert repo.get_user(user.id).is_active is False
    assert repo.set_user_active(user.id, True).is_active is True


# --------------------------------------------------------------------------- API keys
def test_create_list_and_revoke_keys(repo: Repository, user: User) -> None:
    other = repo.create_user("Bob", "bob@example.com")
    k1 = repo.create_api_key(user.id, "laptop", "a" * 64, "ci_aaaaaaaa")
    k2 = repo.create_api_key(other.id, "ci", "b" * 64, "ci_bbbbbbbb")
    k3 = repo.create_api_key(user.id, "desktop", "c" * 64, "ci_cccccccc")
    assert (k1.user_id, k1.user_email, k1.name, k1.prefix) == (
        user.id, "ada@example.com", "laptop", "ci_aaaaaaaa")
    assert k1.is_active and k1.last_used_at is None and is_aware_utc(k1.created_at)
    assert repo.list_api_keys(user.id) == [k1, k3]
    assert repo.list_api_keys() == [k1, k2, k3]
    assert repo.list_api_keys(str(uuid.uuid4())) == []
    revoked = repo.revoke_api_key(k1.id)
    assert revoked.is_active is False and revoked.id == k1.id
    assert [k.is_active for k in repo.list_api_keys(user.id)] == [False, True]


def test_key_errors(repo: Repository, user: User) -> None:
    with pytest.raises(NotFound):
        repo.create_api_key(str(uuid.uuid4()), "x", "d" * 64, "ci_dddddddd")
    with pytest.raises(NotFound):
        repo.revoke_api_key(str(uuid.uuid4()))
    repo.create_api_key(user.id, "x", "e" * 64, "ci_eeeeeeee")
    with pytest.raises(AlreadyExists):
        repo.create_api_key(user.id, "y", "e" * 64, "ci_eeeeeeee")


def test_find_keys_by_prefix_returns_hash_and_owner_active_or_not(
    repo: Repository, user: User
) -> None:
    key = repo.create_api_key(user.id, "k", "f" * 64, "ci_same0000")
    twin = repo.create_api_key(user.id, "k2", "0" * 64, "ci_same0000")
    repo.create_api_key(user.id, "k3", "1" * 64, "ci_other000")
    repo.revoke_api_key(twin.id)
    repo.set_user_active(user.id, False)
    found = {stored.key.id: stored for stored in repo.find_keys_by_prefix("ci_same0000")}
    assert set(found) == {key.id, twin.id}
    assert found[key.id].key_hash == "f" * 64
    assert found[twin.id].key.is_active is False
    assert found[key.id].user.id == user.id and found[key.id].user.is_active is False
    assert repo.find_keys_by_prefix("ci_nothing0") == []


def test_touch_api_key(repo: Repository, user: User) -> None:
    key = repo.create_api_key(user.id, "k", "2" * 64, "ci_touch000")
    when = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    repo.touch_api_key(key.id, when)
    repo.touch_api_key(str(uuid.uuid4()), when)  # ignored
    [stored] = repo.find_keys_by_prefix("ci_touch000")
    assert stored.key.last_used_at == when
    assert repo.list_api_keys(user.id)[0].last_used_at == when


# --------------------------------------------------------------------------- jobs
def test_create_job_stores_archive_and_first_event(repo: Repository, user: User) -> None:
    job = repo.create_job(user.id, b"PK\x03\x04 archive bytes", 12.5)
    assert uuid.UUID(job.id).version == 4
    assert job.status is JobStatus.QUEUED and job.user_id == user.id
    assert (job.archive_size, job.timeout_seconds) == (len(b"PK\x03\x04 archive bytes"), 12.5)
    assert job.controller_id is None and job.container_id is None and not job.cancel_requested
    assert (job.log_cursor, job.output_bytes, job.dropped_bytes) == (0, 0, 0)
    assert job.success is None and job.exit_code is None and job.end_time is None
    assert is_aware_utc(job.created_at)
    assert repo.get_archive(job.id) == b"PK\x03\x04 archive bytes"
    [event] = repo.list_events(job.id)
    assert (event.seq, event.kind, event.text, event.stream) == (
        1, EventKind.STATUS, "queued", None)
    assert repo.get_job(job.id) == job


def test_job_errors(repo: Repository, user: User) -> None:
    with pytest.raises(NotFound):
        repo.create_job(str(uuid.uuid4()), b"zip", None)
    job = repo.create_job(user.id, b"zip", None)
    other = repo.create_user("Eve", "eve@example.com")
    with pytest.raises(NotFound):
        repo.get_job(str(uuid.uuid4()))
    with pytest.raises(NotFound):
        repo.get_job(job.id, user_id=other.id)
    assert repo.get_job(job.id, user_id=user.id).id == job.id
    with pytest.raises(NotFound):
        repo.get_archive(str(uuid.uuid4()))
    for call in (lambda: repo.mark_running(str(uuid.uuid4()), "c", datetime.now(UTC),
                                           fence=owner_fence(repo, str(uuid.uuid4()))),
                 lambda: repo.release_job(str(uuid.uuid4()),
                                          fence=owner_fence(repo, str(uuid.uuid4()))),
                 lambda: repo.append_output(str(uuid.uuid4()), [out("x")], 1,
                                            fence=owner_fence(repo, str(uuid.uuid4()))),
                 lambda: repo.finish_job(str(uuid.uuid4()), PASSED, datetime.now(UTC),
                                         fence=owner_fence(repo, str(uuid.uuid4()))),
                 lambda: repo.request_cancel(str(uuid.uuid4()), user.id),
                 lambda: repo.request_cancel(job.id, other.id)):
        with pytest.raises(NotFound):
            call()
    assert repo.get_job(job.id).cancel_requested is False


def test_list_and_count_jobs_newest_first(repo: Repository, user: User) -> None:
    other = repo.create_user("Bob", "bob@example.com")
    mine = new_jobs(repo, user, 5)
    repo.create_job(other.id, b"zip", None)
    newest_first = [job.id for job in reversed(mine)]
    assert [job.id for job in repo.list_jobs(user.id)] == newest_first
    assert [job.id for job in repo.list_jobs(user.id, limit=2, offset=1)] == newest_first[1:3]
    assert repo.list_jobs(user.id, limit=10, offset=5) == []
    assert repo.count_jobs(user.id) == 5
    assert repo.count_jobs(other.id) == 1
    assert repo.count_jobs(str(uuid.uuid4())) == 0


def test_list_and_count_jobs_of_one_status(repo: Repository, user: User) -> None:
    other = repo.create_user("Bob", "bob@example.com")
    first, second, third = new_jobs(repo, user, 3)
    repo.request_cancel(first.id, user.id)
    repo.request_cancel(third.id, user.id)
    repo.request_cancel(repo.create_job(other.id, b"zip", None).id, other.id)
    cancelled = repo.list_jobs(user.id, status=JobStatus.CANCELLED)
    assert [job.id for job in cancelled] == [third.id, first.id]
    assert [job.id for job in repo.list_jobs(user.id, limit=1, offset=1,
                                             status=JobStatus.CANCELLED)] == [first.id]
    assert [job.id for job in repo.list_jobs(user.id, status=JobStatus.QUEUED)] == [second.id]
    assert repo.list_jobs(user.id, status=JobStatus.RUNNING) == []
    assert repo.count_jobs(user.id, status=JobStatus.CANCELLED) == 2
    assert repo.count_jobs(user.id, status=JobStatus.QUEUED) == 1
    assert repo.count_jobs(user.id, status=JobStatus.FAILED) == 0
    assert repo.count_jobs(user.id) == 3


def test_list_jobs_takes_any_offset_up_to_the_stored_int_limit(repo: Repository,
                                                               user: User) -> None:
    new_jobs(repo, user, 1)
    assert repo.list_jobs(user.id, limit=500, offset=MAX_STORED_INT) == []


# --------------------------------------------------------------------------- cancel
def test_cancel_queued_unclaimed_job_finishes_it_at_once(repo: Repository, user: User) -> None:
    job = repo.create_job(user.id, b"zip", None)
    cancelled = repo.request_cancel(job.id, user.id)
    assert cancelled.status is JobStatus.CANCELLED
    assert (cancelled.reason, cancelled.success, cancelled.exit_code) == (
        "cancelled by user", False, None)
    assert is_aware_utc(cancelled.end_time)
    events = repo.list_events(job.id)
    assert [(e.seq, e.kind) for e in events] == [(1, EventKind.STATUS), (2, EventKind.END)]
    assert EndData.model_validate_json(events[-1].text) == EndData(
        status=JobStatus.CANCELLED, exit_code=None, success=False, reason="cancelled by user")
    assert repo.claim_next_job(hold_lease(repo, CTRL)) is None
    assert repo.count_queued_jobs() == 0


def test_cancel_claimed_or_running_job_only_sets_the_flag(repo: Repository, user: User) -> None:
    claimed = repo.create_job(user.id, b"zip", None)
    assert repo.claim_next_job(hold_lease(repo, CTRL)) is not None
    after = repo.request_cancel(claimed.id, user.id)
    assert after.status is JobStatus.QUEUED and after.cancel_requested
    assert after.controller_id == CTRL
    running = running_job(repo, user)
    after = repo.request_cancel(running.id, user.id)
    assert after.status is JobStatus.RUNNING and after.cancel_requested
    assert repo.last_event_seq(running.id) == 2  # no event: the controller stops it
    assert {j.id for j in repo.list_controller_jobs(CTRL)} == {claimed.id, running.id}


def test_cancel_terminal_job_changes_nothing(repo: Repository, user: User) -> None:
    job = running_job(repo, user)
    done = repo.finish_job(job.id, PASSED, datetime.now(UTC), fence=owner_fence(repo, job.id))
    assert repo.request_cancel(job.id, user.id) == done
    assert repo.last_event_seq(job.id) == 3


def test_release_of_a_cancel_requested_job_cancels_it(repo: Repository, user: User) -> None:
    job = repo.create_job(user.id, b"zip", None)
    repo.claim_next_job(hold_lease(repo, CTRL))
    repo.request_cancel(job.id, user.id)
    released = repo.release_job(job.id, fence=owner_fence(repo, job.id))
    assert released.status is JobStatus.CANCELLED and released.reason == "cancelled by user"
    assert repo.list_events(job.id)[-1].kind is EventKind.END


# --------------------------------------------------------------------------- claim
def test_claim_on_empty_queue_returns_none(repo: Repository) -> None:
    assert repo.claim_next_job(hold_lease(repo, CTRL)) is None


def test_claim_oldest_first_and_never_twice(repo: Repository, user: User) -> None:
    jobs = new_jobs(repo, user, 3)
    assert repo.count_queued_jobs() == 3
    claimed = [repo.claim_next_job(hold_lease(repo, CTRL)) for _ in range(3)]
    assert [job.id for job in claimed if job] == [job.id for job in jobs]
    assert all(job is not None and job.controller_id == CTRL
               and job.status is JobStatus.QUEUED for job in claimed)
    assert repo.claim_next_job(hold_lease(repo, "controller-2")) is None
    assert repo.count_queued_jobs() == 0


def test_count_jobs_by_status_counts_every_users_jobs(repo: Repository, user: User) -> None:
    assert repo.count_jobs_by_status() == dict.fromkeys(JobStatus, 0)
    finished = running_job(repo, user)
    repo.finish_job(finished.id, PASSED, datetime.now(UTC), fence=owner_fence(repo, finished.id))
    running_job(repo, user)
    bob = repo.create_user("Bob", "bob@example.com")
    new_jobs(repo, bob, 2)
    counts = repo.count_jobs_by_status()
    assert counts == {JobStatus.QUEUED: 2, JobStatus.RUNNING: 1, JobStatus.COMPLETED: 1,
                      JobStatus.FAILED: 0, JobStatus.CANCELLED: 0}
    assert repo.count_queued_jobs() == 2  # queue depth: only the unclaimed ones


def test_claim_is_fair_between_users(repo: Repository, user: User) -> None:
    bob = repo.create_user("Bob", "bob@example.com")
    ada_jobs = new_jobs(repo, user, 3)
    bob_jobs = new_jobs(repo, bob, 2)
    order = [repo.claim_next_job(hold_lease(repo, CTRL)) for _ in range(5)]
    assert [job.id for job in order if job] == [
        ada_jobs[0].id, bob_jobs[0].id, ada_jobs[1].id, bob_jobs[1].id, ada_jobs[2].id]


def test_finished_jobs_do_not_count_against_fairness(repo: Repository, user: User) -> None:
    bob = repo.create_user("Bob", "bob@example.com")
    bob_running = repo.create_job(bob.id, b"zip", None)
    assert repo.claim_next_job(hold_lease(repo, CTRL)).id == bob_running.id  # type: ignore[union-attr]
    first = repo.create_job(user.id, b"zip", None)
    repo.claim_next_job(hold_lease(repo, CTRL))
    repo.finish_job(first.id, PASSED, datetime.now(UTC), fence=owner_fence(repo, first.id))
    ada_next = new_jobs(repo, user, 1)[0]
    bob_next = new_jobs(repo, bob, 1)[0]
    # Ada's finished job is not busy, so she has fewer busy jobs than Bob and goes first; were
    # it counted, they would be level and Bob, served longer ago, would.
    assert repo.claim_next_job(hold_lease(repo, CTRL)).id == ada_next.id  # type: ignore[union-attr]
    assert repo.claim_next_job(hold_lease(repo, CTRL)).id == bob_next.id  # type: ignore[union-attr]


def test_a_tie_goes_to_the_user_served_least_recently(repo: Repository, user: User) -> None:
    """Round robin among users as busy: not to the oldest job, which a long burst always has."""
    bob = repo.create_user("Bob", "bob@example.com")
    ada_jobs = new_jobs(repo, user, 3)
    bob_jobs = new_jobs(repo, bob, 2)
    fence = hold_lease(repo, CTRL)
    claimed = [repo.claim_next_job(fence) for _ in range(3)]
    assert [job.id for job in claimed if job] == [ada_jobs[0].id, bob_jobs[0].id, ada_jobs[1].id]
    done = ada_jobs[0].id
    repo.finish_job(done, PASSED, datetime.now(UTC), fence=owner_fence(repo, done))
    # One busy job each now; Ada was claimed last, so Bob's turn, though her job is older.
    assert repo.claim_next_job(fence).id == bob_jobs[1].id  # type: ignore[union-attr]
    assert repo.claim_next_job(fence).id == ada_jobs[2].id  # type: ignore[union-attr]


def test_claim_skips_cancelled_jobs(repo: Repository, user: User) -> None:
    cancelled, waiting = new_jobs(repo, user, 2)
    repo.request_cancel(cancelled.id, user.id)
    assert repo.claim_next_job(hold_lease(repo, CTRL)).id == waiting.id  # type: ignore[union-attr]
    assert repo.claim_next_job(hold_lease(repo, CTRL)) is None


def test_release_job_returns_it_to_the_queue(repo: Repository, user: User) -> None:
    job = repo.create_job(user.id, b"zip", None)
    repo.claim_next_job(hold_lease(repo, CTRL))
    released = repo.release_job(job.id, fence=owner_fence(repo, job.id))
    assert released.controller_id is None and released.status is JobStatus.QUEUED
    assert repo.count_queued_jobs() == 1
    assert repo.list_controller_jobs(CTRL) == []
    assert repo.claim_next_job(hold_lease(repo, "controller-2")).id == job.id  # type: ignore[union-attr]


def test_release_of_running_or_finished_job_changes_nothing(repo: Repository, user: User) -> None:
    job = running_job(repo, user)
    assert repo.release_job(job.id, fence=owner_fence(repo, job.id)) == repo.get_job(job.id)
    assert repo.get_job(job.id).controller_id == CTRL


# --------------------------------------------------------------------------- controller side
def test_mark_running_records_start_and_is_idempotent(repo: Repository, user: User) -> None:
    job = repo.create_job(user.id, b"zip", None)
    repo.claim_next_job(hold_lease(repo, CTRL))
    start = datetime(2030, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    running = repo.mark_running(job.id, "container-a", start, fence=owner_fence(repo, job.id))
    assert running.status is JobStatus.RUNNING
    assert (running.container_id, running.start_time) == ("container-a", start)
    again = repo.mark_running(job.id, "container-b", start + timedelta(seconds=5),
                              fence=owner_fence(repo, job.id))
    assert again.container_id == "container-b" and again.start_time == start
    assert [(e.seq, e.kind, e.text) for e in repo.list_events(job.id)] == [
        (1, EventKind.STATUS, "queued"), (2, EventKind.STATUS, "running")]


def test_list_controller_jobs(repo: Repository, user: User) -> None:
    a, b, c = new_jobs(repo, user, 3)
    repo.claim_next_job(hold_lease(repo, CTRL))
    repo.claim_next_job(hold_lease(repo, CTRL))
    repo.claim_next_job(hold_lease(repo, "controller-2"))
    repo.mark_running(a.id, "c", datetime.now(UTC), fence=owner_fence(repo, a.id))
    assert [job.id for job in repo.list_controller_jobs(CTRL)] == [a.id, b.id]
    repo.finish_job(a.id, PASSED, datetime.now(UTC), fence=owner_fence(repo, a.id))
    assert [job.id for job in repo.list_controller_jobs(CTRL)] == [b.id]
    assert [job.id for job in repo.list_controller_jobs("controller-2")] == [c.id]


def test_finish_job_once_first_outcome_wins(repo: Repository, user: User) -> None:
    job = running_job(repo, user)
    end = datetime(2030, 1, 1, tzinfo=UTC)
    done = repo.finish_job(job.id, TIMED_OUT, end, fence=owner_fence(repo, job.id))
    assert (done.status, done.reason, done.success, done.exit_code, done.end_time) == (
        JobStatus.FAILED, "timed out", False, None, end)
    assert repo.finish_job(job.id, PASSED, datetime.now(UTC),
                           fence=owner_fence(repo, job.id)) == done
    events = repo.list_events(job.id)
    assert [e.kind for e in events].count(EventKind.END) == 1
    assert EndData.model_validate_json(events[-1].text).to_outcome() == TIMED_OUT
    assert repo.list_controller_jobs(CTRL) == []


def test_finish_job_stores_the_test_report_on_the_job_and_its_end_event(
        repo: Repository, user: User) -> None:
    job = running_job(repo, user)
    report = TestReport(passed=40, failed=2, errors=1, skipped=3, duration_s=3.25,
                        failing=("tests/t.py::test_a", "tests/t.py::TestB::test_c ✓"),
                        slowest=(SlowTest("tests/t.py::test_slow", 1.5),))
    outcome = JobOutcome(JobStatus.COMPLETED, 1, False, None, report=report)
    done = repo.finish_job(job.id, outcome, datetime.now(UTC), fence=owner_fence(repo, job.id))
    assert done.report == report == repo.get_job(job.id).report
    assert repo.list_jobs(user.id)[0].report == report
    end = EndData.model_validate_json(repo.list_events(job.id)[-1].text)
    assert end.to_outcome() == outcome
    plain = running_job(repo, user)
    assert repo.finish_job(plain.id, PASSED, datetime.now(UTC),
                           fence=owner_fence(repo, plain.id)).report is None


def test_finish_job_refuses_a_non_terminal_outcome(repo: Repository, user: User) -> None:
    job = running_job(repo, user)
    with pytest.raises(ValueError):
        repo.finish_job(job.id, JobOutcome(JobStatus.RUNNING, None, False, None),
                        datetime.now(UTC), fence=owner_fence(repo, job.id))
    assert repo.get_job(job.id).status is JobStatus.RUNNING


# --------------------------------------------------------------------------- output
def test_append_output_assigns_seqs_and_stores_cursor(repo: Repository, user: User) -> None:
    job = running_job(repo, user)
    new = repo.append_output(job.id, [out("a\n"), out("é\n", OutputStream.STDERR)], 7,
                             fence=owner_fence(repo, job.id))
    assert [(e.seq, e.kind, e.stream, e.text) for e in new] == [
        (3, EventKind.OUTPUT, OutputStream.STDOUT, "a\n"),
        (4, EventKind.OUTPUT, OutputStream.STDERR, "é\n")]
    after = repo.get_job(job.id)
    assert (after.log_cursor, after.output_bytes) == (7, 2 + 3)  # é is two UTF-8 bytes
    assert repo.append_output(job.id, [], 9, fence=owner_fence(repo, job.id)) == []
    assert repo.get_job(job.id).log_cursor == 9
    more = repo.append_output(job.id, [out("b\n")], 10, fence=owner_fence(repo, job.id))
    assert [e.seq for e in more] == [5]
    assert repo.last_event_seq(job.id) == 5


def test_output_keeps_every_character(repo: Repository, user: User) -> None:
    job = running_job(repo, user)
    text = "nul \x00 here, tab \t, é, 😀, \x1b[31mred\x1b[0m\n"
    [event] = repo.append_output(job.id, [out(text)], 1, fence=owner_fence(repo, job.id))
    assert event.text == text
    assert repo.list_events(job.id)[-1].text == text
    assert repo.get_job(job.id).output_bytes == len(text.encode("utf-8"))


def test_append_output_to_a_finished_job_is_ignored(repo: Repository, user: User) -> None:
    job = running_job(repo, user)
    repo.finish_job(job.id, PASSED, datetime.now(UTC), fence=owner_fence(repo, job.id))
    assert repo.append_output(job.id, [out("late\n")], 3, fence=owner_fence(repo, job.id)) == []
    assert repo.get_job(job.id).log_cursor == 0
    assert repo.last_event_seq(job.id) == 3


def test_keep_bytes_drops_the_head_and_keeps_one_marker(repo: Repository, user: User) -> None:
    job = running_job(repo, user)
    line = "x" * 99 + "\n"  # 100 bytes
    repo.append_output(job.id, [out(line)] * 3, 1, keep_bytes=250,
                       fence=owner_fence(repo, job.id))  # seqs 3, 4, 5
    capped = repo.get_job(job.id)
    assert (capped.output_bytes, capped.dropped_bytes) == (200, 100)
    events = repo.list_events(job.id)
    marker = events[2]
    assert (marker.seq, marker.kind, marker.stream) == (3, EventKind.OUTPUT, OutputStream.STDOUT)
    assert marker.text.startswith("[ci] … ") and marker.text.endswith("\n")
    assert f"{format_size(100)} of earlier output dropped" in marker.text
    assert f"log limit {format_size(250)}" in marker.text
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    # more output: the same marker is updated, the oldest kept lines go
    repo.append_output(job.id, [out("y" * 99 + "\n")] * 2, 2, keep_bytes=250,
                       fence=owner_fence(repo, job.id))
    events = repo.list_events(job.id)
    assert [e.seq for e in events] == [1, 2, 3, 6, 7]
    assert sum(1 for e in events if e.text.startswith("[ci] …")) == 1
    assert f"{format_size(300)} of earlier output dropped" in events[2].text
    assert [e.text[0] for e in events[3:]] == ["y", "y"]
    after = repo.get_job(job.id)
    assert (after.output_bytes, after.dropped_bytes, after.log_cursor) == (200, 300, 2)


def test_keep_bytes_uses_utf8_sizes_and_handles_a_huge_chunk(repo: Repository, user: User) -> None:
    job = running_job(repo, user)
    repo.append_output(job.id, [out("é" * 50)], 1, keep_bytes=1000,
                       fence=owner_fence(repo, job.id))  # 100 bytes
    assert repo.get_job(job.id).output_bytes == 100
    repo.append_output(job.id, [out("z" * 5000)], 2, keep_bytes=1000,
                       fence=owner_fence(repo, job.id))
    after = repo.get_job(job.id)
    assert after.output_bytes <= 1000
    assert after.output_bytes + after.dropped_bytes == 5100
    outputs = [e for e in repo.list_events(job.id) if e.kind is EventKind.OUTPUT]
    assert len(outputs) == 1 and outputs[0].text.startswith("[ci] …")
    assert format_size(5100) in outputs[0].text
    repo.append_output(job.id, [out("tail\n")], 3, keep_bytes=1000, fence=owner_fence(repo, job.id))
    assert [e.text for e in repo.list_events(job.id)][-1] == "tail\n"
    assert repo.get_job(job.id).output_bytes == 5


def test_skipped_bytes_count_as_dropped_in_the_marker(repo: Repository, user: User) -> None:
    job = running_job(repo, user)
    line = "x" * 99 + "\n"  # 100 bytes
    repo.append_output(job.id, [out(line)] * 2, 1, keep_bytes=250, fence=owner_fence(repo, job.id))
    repo.append_output(job.id, [out(line)] * 3, 2, keep_bytes=250, skipped_bytes=1000,
                       fence=owner_fence(repo, job.id))
    after = repo.get_job(job.id)
    assert (after.output_bytes, after.dropped_bytes) == (200, 1300)
    markers = [e for e in repo.list_events(job.id) if e.text.startswith("[ci] …")]
    assert len(markers) == 1 and f"{format_size(1300)} of earlier output dropped" in markers[0].text


def test_output_under_the_limit_is_untouched(repo: Repository, user: User) -> None:
    job = running_job(repo, user)
    repo.append_output(job.id, [out("a" * 100)] * 3, 1, keep_bytes=300,
                       fence=owner_fence(repo, job.id))
    after = repo.get_job(job.id)
    assert (after.output_bytes, after.dropped_bytes) == (300, 0)
    assert len(repo.list_events(job.id)) == 5


# --------------------------------------------------------------------------- events
def test_list_events_after_seq_and_limit(repo: Repository, user: User) -> None:
    job = running_job(repo, user)
    repo.append_output(job.id, [out(f"{i}\n") for i in range(5)], 1,
                       fence=owner_fence(repo, job.id))
    repo.finish_job(job.id, PASSED, datetime.now(UTC), fence=owner_fence(repo, job.id))
    seqs = [e.seq for e in repo.list_events(job.id)]
    assert seqs == list(range(1, 9))
    assert [e.seq for e in repo.list_events(job.id, after_seq=5)] == [6, 7, 8]
    assert [e.seq for e in repo.list_events(job.id, after_seq=2, limit=2)] == [3, 4]
    assert repo.list_events(job.id, after_seq=8) == []
    assert repo.list_events(job.id, after_seq=MAX_STORED_INT) == []
    assert repo.last_event_seq(job.id) == 8
    assert repo.last_event_seq(str(uuid.uuid4())) == 0
    assert all(is_aware_utc(e.created_at) for e in repo.list_events(job.id))


# --------------------------------------------------------------------------- waiting for a change
def test_wait_for_change_times_out_when_nothing_happens(repo: Repository, user: User) -> None:
    seen = repo.change_token()
    started = time.monotonic()
    assert repo.wait_for_change(seen, 0.3) == seen
    assert time.monotonic() - started >= 0.25
    assert repo.wait_for_change(None, 10.0) == seen  # None: the current token, at once
    assert repo.wait_for_change(seen - 1, 10.0) == seen  # already moved: at once


def test_wait_for_change_wakes_on_a_write_of_another_thread(repo: Repository, user: User) -> None:
    seen = repo.change_token()
    woke: list[int] = []
    waiter = threading.Thread(target=lambda: woke.append(repo.wait_for_change(seen, 30.0)))
    waiter.start()
    time.sleep(0.1)
    assert not woke  # asleep: nothing changed yet
    repo.create_job(user.id, b"zip", None)
    waiter.join(20.0)  # well before its own timeout
    # Woken with a moved token (SQLite may see the file event before the writer thread counts
    # its own commit: the token then moves once more, which only costs the waiter a look).
    assert woke and woke[0] != seen and repo.change_token() != seen


def test_interrupt_waits_returns_every_waiter_without_a_change(repo: Repository) -> None:
    seen = repo.change_token()
    woke: list[int] = []
    waiters = [threading.Thread(target=lambda: woke.append(repo.wait_for_change(seen, 30.0)))
               for _ in range(3)]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.1)
    repo.interrupt_waits()
    for waiter in waiters:
        waiter.join(20.0)
    assert woke == [seen] * 3


def test_an_interrupt_between_two_waits_is_not_lost(repo: Repository) -> None:
    """"Set a flag, interrupt" must not race with "check the flag, wait" (a stop, say)."""
    seen = repo.change_token()
    assert repo.wait_for_change(seen, 0.01) == seen  # this thread has waited before
    repo.interrupt_waits()  # ... and is not waiting now
    started = time.monotonic()
    assert repo.wait_for_change(seen, 30.0) == seen
    assert time.monotonic() - started < 10.0  # returned at once, not at its timeout
    started = time.monotonic()
    assert repo.wait_for_change(seen, 0.2) == seen  # consumed: the next wait sleeps
    assert time.monotonic() - started >= 0.15


_COMMIT_WHEN_TOLD = """
import sys
from ci_persistence.postgres import PostgresRepository
from ci_persistence.sqlite import SqliteRepository
kind, target = sys.argv[1], sys.argv[2]
repo = SqliteRepository(target) if kind == "sqlite" else PostgresRepository(target)
print("ready", flush=True)
sys.stdin.readline()
repo.create_user("Other", "other@example.com")
print("committed", flush=True)
sys.stdin.readline()
repo.close()
"""


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_wait_for_change_wakes_on_another_process_commit(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Woken by the commit itself (inotify / NOTIFY), well before the safety re-check."""
    target = (str(tmp_path / "ci.db") if kind == "sqlite"
              else request.getfixturevalue("postgres_url"))
    repo: Repository = (SqliteRepository(target) if kind == "sqlite"
                        else PostgresRepository(target))
    child = subprocess.Popen([sys.executable, "-c", _COMMIT_WHEN_TOLD, kind, target],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        seen = repo.wait_for_change(repo.change_token(), 0.2)  # waiting machinery started
        woke: list[tuple[int, float]] = []
        waiter = threading.Thread(target=lambda: woke.append(
            (repo.wait_for_change(seen, 30.0), time.monotonic())))
        waiter.start()
        time.sleep(0.2)
        assert not woke
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "committed"
        committed = time.monotonic()
        waiter.join(20.0)
        assert woke and woke[0][0] != seen
        assert woke[0][1] - committed < SAFETY_RECHECK_S  # not the periodic look
        assert [u.email for u in repo.list_users()] == ["other@example.com"]
        child.stdin.write("done\n")
        child.stdin.flush()
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        repo.close()


def test_poll_events_cursor_semantics(repo: Repository, user: User) -> None:
    early = repo.create_job(user.id, b"zip", None)
    events, cursor = repo.poll_events(None)
    assert events == []
    assert repo.poll_events(cursor) == ([], cursor)
    a = repo.create_job(user.id, b"zip", None)
    b = repo.create_job(user.id, b"zip", None)
    repo.request_cancel(a.id, user.id)
    events, cursor2 = repo.poll_events(cursor)
    assert [(e.job_id, e.seq, e.kind) for e in events] == [
        (a.id, 1, EventKind.STATUS), (b.id, 1, EventKind.STATUS), (a.id, 2, EventKind.END)]
    assert cursor2 > cursor
    assert repo.poll_events(cursor2) == ([], cursor2)
    everything, _ = repo.poll_events(0)
    assert [(e.job_id, e.seq) for e in everything][0] == (early.id, 1)
    assert len(everything) == 4


def test_poll_events_returns_bounded_batches(repo: Repository, user: User) -> None:
    job = running_job(repo, user)
    _, cursor = repo.poll_events(None)
    repo.append_output(job.id, [out(".")] * 6000, 1, fence=owner_fence(repo, job.id))
    seen: list[int] = []
    while True:
        events, cursor = repo.poll_events(cursor)
        if not events:
            break
        assert len(events) <= 5000
        seen.extend(e.seq for e in events)
    assert seen == list(range(3, 6003))


# --------------------------------------------------------------------------- controller leases
T0 = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)
LEASE_S = 60.0


def take(repo: Repository, when: datetime, pid: int = 100,
         replace_token: str | None = None) -> ControllerLease:
    return repo.acquire_lease("ctl-a", "host-1", pid, "0.1.0", when, LEASE_S,
                              replace_token=replace_token)


def test_a_live_lease_refuses_a_second_holder_naming_the_id(repo: Repository) -> None:
    first = take(repo, T0)
    assert (first.id, first.host, first.pid, first.version) == ("ctl-a", "host-1", 100, "0.1.0")
    assert first.started_at == first.heartbeat_at == T0 and not first.stopped
    with pytest.raises(ControllerIdInUse) as refused:
        take(repo, T0 + timedelta(seconds=30), pid=200)
    assert "'ctl-a'" in refused.value.message and "CI_CONTROLLER_ID" in refused.value.message
    assert repo.get_lease("ctl-a") == first


def test_heartbeats_keep_a_lease_and_its_expiry_frees_the_id(repo: Repository) -> None:
    first = take(repo, T0)
    assert repo.renew_lease("ctl-a", first.token, T0 + timedelta(seconds=50))
    with pytest.raises(ControllerIdInUse):
        take(repo, T0 + timedelta(seconds=100), pid=200)  # 50 s after the last heartbeat
    second = take(repo, T0 + timedelta(seconds=111), pid=200)
    assert second.token != first.token and second.pid == 200
    assert not repo.renew_lease("ctl-a", first.token, T0 + timedelta(seconds=112))
    assert repo.renew_lease("ctl-a", second.token, T0 + timedelta(seconds=112))


def test_a_released_or_known_dead_lease_is_taken_at_once(repo: Repository) -> None:
    first = take(repo, T0)
    repo.release_lease("ctl-a", first.token, T0 + timedelta(seconds=1))
    stopped = repo.get_lease("ctl-a")
    assert stopped is not None and stopped.stopped
    assert not repo.renew_lease("ctl-a", first.token, T0 + timedelta(seconds=2))
    second = take(repo, T0 + timedelta(seconds=2), pid=200)
    third = take(repo, T0 + timedelta(seconds=3), pid=300, replace_token=second.token)
    with pytest.raises(ControllerIdInUse):  # a stale token replaces nothing
        take(repo, T0 + timedelta(seconds=4), pid=400, replace_token=second.token)
    assert repo.get_lease("ctl-a") == third


def test_list_leases_counts_running_jobs(repo: Repository, user: User) -> None:
    assert repo.list_leases() == [] and repo.get_lease("nobody") is None
    repo.acquire_lease("ctl-b", "host-2", 7, "0.1.0", T0, LEASE_S)
    take(repo, T0)
    running_job(repo, user)  # claimed by CTRL
    repo.create_job(user.id, b"zip", None)
    assert repo.claim_next_job(hold_lease(repo, "ctl-a")) is not None
    leases = repo.list_leases()
    assert [(lease.id, lease.running_jobs) for lease in leases] == [
        (CTRL, 1), ("ctl-a", 1), ("ctl-b", 0)]


# --------------------------------------------------------------------------- fencing, take-over
def holder(repo: Repository, controller_id: str, when: datetime) -> ControllerLease:
    return repo.acquire_lease(controller_id, "host-" + controller_id, 100, "0.1.0", when,
                              LEASE_S)


def test_every_job_write_needs_the_owner_and_its_current_token(repo: Repository,
                                                               user: User) -> None:
    job = repo.create_job(user.id, b"zip", None)
    a, b = holder(repo, "ctl-a", T0), holder(repo, "ctl-b", T0)
    assert repo.claim_next_job(a.fence) is not None
    writes: dict[str, Callable[[Fence], object]] = {
        "mark_running": lambda f: repo.mark_running(job.id, "c", T0, fence=f),
        "mark_start_attempt": lambda f: repo.mark_start_attempt(job.id, T0, fence=f),
        "append_output": lambda f: repo.append_output(job.id, [out("x\n")], 1, fence=f),
        "release_job": lambda f: repo.release_job(job.id, fence=f),
        "finish_job": lambda f: repo.finish_job(job.id, PASSED, T0, fence=f),
    }
    for write in writes.values():  # another controller's fence: not its job
        with pytest.raises(LeaseLost):
            write(b.fence)
    # The id is taken again after its lease expired (a restart): the old token is dead.
    again = holder(repo, "ctl-a", T0 + timedelta(seconds=LEASE_S + 1))
    for write in writes.values():
        with pytest.raises(LeaseLost, match="'ctl-a'"):
            write(a.fence)
    with pytest.raises(LeaseLost):
        repo.claim_next_job(a.fence)
    assert [e.kind for e in repo.list_events(job.id)] == [EventKind.STATUS]  # nothing written
    unchanged = repo.get_job(job.id)
    assert (unchanged.status, unchanged.controller_id) == (JobStatus.QUEUED, "ctl-a")
    # The new holder keeps the id's jobs and writes for them.
    assert repo.mark_running(job.id, "c", T0, fence=again.fence).status is JobStatus.RUNNING
    assert repo.append_output(job.id, [out("x\n")], 1, fence=again.fence)
    assert repo.finish_job(job.id, PASSED, T0, fence=again.fence).status is JobStatus.COMPLETED


def test_record_engine_is_fenced_and_kept_for_a_new_holder(repo: Repository) -> None:
    first = holder(repo, "ctl-a", T0)
    repo.record_engine(first.fence, "engine-1")
    lease = repo.get_lease("ctl-a")
    assert lease is not None and lease.engine_id == "engine-1"
    assert [item.engine_id for item in repo.list_leases()] == ["engine-1"]
    second = holder(repo, "ctl-a", T0 + timedelta(seconds=LEASE_S + 1))
    assert second.engine_id == "engine-1"  # where the id's containers are, until it says
    with pytest.raises(LeaseLost):
        repo.record_engine(first.fence, "engine-2")
    repo.record_engine(second.fence, "engine-2")
    assert [item.engine_id for item in repo.list_leases()] == ["engine-2"]


def claimed_jobs(repo: Repository, user: User, fence: Fence, count: int) -> list[Job]:
    jobs = [repo.create_job(user.id, b"zip", None) for _ in range(count)]
    for _ in jobs:
        assert repo.claim_next_job(fence) is not None
    return jobs


def test_take_over_with_adopt_moves_every_job_to_the_taker(repo: Repository,
                                                           user: User) -> None:
    gone, taker = holder(repo, "ctl-a", T0), holder(repo, "ctl-b", T0)
    running, claimed = claimed_jobs(repo, user, gone.fence, 2)
    repo.mark_running(running.id, "c", T0, fence=gone.fence)
    later = T0 + timedelta(seconds=LEASE_S)
    assert repo.renew_lease("ctl-b", taker.token, later)
    seen = repo.get_lease("ctl-a")
    assert seen is not None
    done = repo.take_over(seen, taker.fence, True, later)
    assert done == TakeOver("ctl-a", requeued=(), adopted=(running.id, claimed.id), failed=(),
                            cancelled=())
    assert [j.id for j in repo.list_controller_jobs("ctl-b")] == [running.id, claimed.id]
    assert repo.get_job(running.id).status is JobStatus.RUNNING
    # The gone holder's late writes and heartbeats are refused; the taker's go through.
    with pytest.raises(LeaseLost):
        repo.append_output(running.id, [out("late\n")], 1, fence=gone.fence)
    assert not repo.renew_lease("ctl-a", gone.token, later)
    assert repo.append_output(running.id, [out("x\n")], 1, fence=taker.fence)


def test_take_over_without_adopt_requeues_cancels_and_fails(repo: Repository,
                                                            user: User) -> None:
    gone, taker = holder(repo, "ctl-a", T0), holder(repo, "ctl-b", T0)
    running, claimed, cancel_asked = claimed_jobs(repo, user, gone.fence, 3)
    repo.mark_running(running.id, "c", T0, fence=gone.fence)
    repo.request_cancel(cancel_asked.id, user.id)
    later = T0 + timedelta(seconds=LEASE_S + 5)
    repo.renew_lease("ctl-b", taker.token, later)
    seen = repo.get_lease("ctl-a")
    assert seen is not None
    done = repo.take_over(seen, taker.fence, False, later)
    assert done == TakeOver("ctl-a", requeued=(claimed.id,), adopted=(), failed=(running.id,),
                            cancelled=(cancel_asked.id,))
    lost = repo.get_job(running.id)
    assert (lost.status, lost.success, lost.exit_code) == (JobStatus.FAILED, False, None)
    assert lost.reason == ("controller lost: controller 'ctl-a' on host-ctl-a was last seen "
                           "2026-11-30 12:00:00 UTC")
    assert repo.list_events(running.id)[-1].kind is EventKind.END
    assert repo.get_job(cancel_asked.id).status is JobStatus.CANCELLED
    requeued = repo.get_job(claimed.id)
    assert (requeued.status, requeued.controller_id) == (JobStatus.QUEUED, None)
    assert repo.count_queued_jobs() == 1
    assert repo.claim_next_job(taker.fence).id == claimed.id  # type: ignore[union-attr]
    assert repo.list_controller_jobs("ctl-a") == []


def test_a_start_attempt_is_fenced_recorded_and_cleared_by_a_release(repo: Repository,
                                                                     user: User) -> None:
    a, b = holder(repo, "ctl-a", T0), holder(repo, "ctl-b", T0)
    job, = claimed_jobs(repo, user, a.fence, 1)
    assert job.start_attempted_at is None
    with pytest.raises(LeaseLost):  # not b's job: b may not make its container
        repo.mark_start_attempt(job.id, T0, fence=b.fence)
    assert repo.get_job(job.id).start_attempted_at is None
    marked = repo.mark_start_attempt(job.id, T0 + timedelta(seconds=1), fence=a.fence)
    assert marked.start_attempted_at == T0 + timedelta(seconds=1)
    assert is_aware_utc(repo.get_job(job.id).start_attempted_at)
    assert (marked.status, marked.controller_id) == (JobStatus.QUEUED, "ctl-a")
    released = repo.release_job(job.id, fence=a.fence)  # the engine failed: a fresh claim later
    assert (released.controller_id, released.start_attempted_at) == (None, None)
    assert repo.claim_next_job(b.fence) is not None
    repo.mark_start_attempt(job.id, T0, fence=b.fence)
    running = repo.mark_running(job.id, "c", T0, fence=b.fence)
    again = repo.mark_start_attempt(job.id, T0 + timedelta(seconds=9), fence=b.fence)
    assert again == running and again.start_attempted_at == T0  # a running job is left as is


def test_take_over_without_adopt_fails_a_claimed_job_whose_start_was_attempted(
        repo: Repository, user: User) -> None:
    """Its container may be running on the gone one's engine: it must not run a second time."""
    gone, taker = holder(repo, "ctl-a", T0), holder(repo, "ctl-b", T0)
    attempted, claimed, attempted_cancel = claimed_jobs(repo, user, gone.fence, 3)
    for job in (attempted, attempted_cancel):
        repo.mark_start_attempt(job.id, T0, fence=gone.fence)
    repo.request_cancel(attempted_cancel.id, user.id)
    later = T0 + timedelta(seconds=LEASE_S + 5)
    repo.renew_lease("ctl-b", taker.token, later)
    seen = repo.get_lease("ctl-a")
    assert seen is not None
    done = repo.take_over(seen, taker.fence, False, later)
    assert done == TakeOver("ctl-a", requeued=(claimed.id,), adopted=(),
                            failed=(attempted.id,), cancelled=(attempted_cancel.id,))
    lost = repo.get_job(attempted.id)
    assert (lost.status, lost.success) == (JobStatus.FAILED, False)
    assert lost.reason is not None and lost.reason.startswith("controller lost: ")
    assert repo.get_job(attempted_cancel.id).status is JobStatus.CANCELLED
    assert repo.count_queued_jobs() == 1
    assert repo.claim_next_job(taker.fence).id == claimed.id  # type: ignore[union-attr]
    assert repo.claim_next_job(taker.fence) is None  # the attempted one never comes back


def test_take_over_with_adopt_keeps_the_start_attempt_for_the_taker(repo: Repository,
                                                                    user: User) -> None:
    gone, taker = holder(repo, "ctl-a", T0), holder(repo, "ctl-b", T0)
    job, = claimed_jobs(repo, user, gone.fence, 1)
    repo.mark_start_attempt(job.id, T0, fence=gone.fence)
    later = T0 + timedelta(seconds=LEASE_S + 5)
    repo.renew_lease("ctl-b", taker.token, later)
    seen = repo.get_lease("ctl-a")
    assert seen is not None
    done = repo.take_over(seen, taker.fence, True, later)
    assert done is not None and done.adopted == (job.id,)
    adopted = repo.get_job(job.id)
    assert (adopted.status, adopted.controller_id, adopted.start_attempted_at) == (
        JobStatus.QUEUED, "ctl-b", T0)


def test_take_over_only_of_an_expired_lease_as_it_was_seen(repo: Repository,
                                                           user: User) -> None:
    gone, taker = holder(repo, "ctl-a", T0), holder(repo, "ctl-b", T0)
    claimed_jobs(repo, user, gone.fence, 1)
    fresh = T0 + timedelta(seconds=LEASE_S - 1)
    assert repo.take_over(gone, taker.fence, True, fresh) is None  # not expired
    assert repo.renew_lease("ctl-a", gone.token, fresh)  # it spoke up again
    late = T0 + timedelta(seconds=LEASE_S + 1)
    assert repo.take_over(gone, taker.fence, True, late) is None
    restarted = holder(repo, "ctl-a", fresh + timedelta(seconds=LEASE_S + 1))
    much_later = fresh + timedelta(seconds=3 * LEASE_S)
    assert repo.take_over(gone, taker.fence, True, much_later) is None  # old token
    with pytest.raises(LeaseLost):  # the taker's own lease must hold too
        repo.take_over(restarted, gone.fence, True, much_later)
    first = repo.take_over(restarted, taker.fence, True, much_later)
    assert first is not None and len(first.adopted) == 1
    assert repo.take_over(restarted, taker.fence, True, much_later) is None  # once


# --------------------------------------------------------------------------- retention
def test_prune_removes_old_finished_jobs_output_and_archive_and_keeps_the_rest(
        repo: Repository, user: User) -> None:
    old, recent, running = (running_job(repo, user) for _ in range(3))
    for job in (old, recent, running):
        repo.append_output(job.id, [out("é" * 10), out("line\n")], 2,
                           fence=owner_fence(repo, job.id))
    repo.finish_job(old.id, PASSED, T0, fence=owner_fence(repo, old.id))
    repo.finish_job(recent.id, PASSED, T0 + timedelta(days=10),
                    fence=owner_fence(repo, recent.id))
    cutoff = T0 + timedelta(days=1)
    expected_bytes = 25 + len(b"zip")  # 20 bytes of é, 5 of "line\n", the archive
    assert repo.prune_jobs(cutoff, dry_run=True) == PruneResult(jobs=1, freed_bytes=expected_bytes)
    assert repo.get_archive(old.id) == b"zip"  # a dry run changes nothing

    assert repo.prune_jobs(cutoff) == PruneResult(jobs=1, freed_bytes=expected_bytes)
    pruned = repo.get_job(old.id)
    assert pruned.pruned_at is not None and pruned.output_bytes == 0
    assert (pruned.status, pruned.success) == (JobStatus.COMPLETED, True)
    with pytest.raises(NotFound):
        repo.get_archive(old.id)
    assert [e.kind for e in repo.list_events(old.id)] == [
        EventKind.STATUS, EventKind.STATUS, EventKind.END]
    for kept in (recent, running):
        assert repo.get_archive(kept.id) == b"zip"
        assert sum(e.kind is EventKind.OUTPUT for e in repo.list_events(kept.id)) == 2
    assert repo.prune_jobs(cutoff) == PruneResult(jobs=0, freed_bytes=0)  # once


def test_prune_goes_oldest_first_in_bounded_passes(repo: Repository, user: User) -> None:
    jobs = [running_job(repo, user) for _ in range(5)]
    for i, job in enumerate(jobs):
        repo.finish_job(job.id, PASSED, T0 + timedelta(hours=5 - i),
                        fence=owner_fence(repo, job.id))
    cutoff = T0 + timedelta(days=1)
    assert repo.prune_jobs(cutoff, limit=2).jobs == 2
    assert {j.id for j in jobs if repo.get_job(j.id).pruned_at} == {jobs[4].id, jobs[3].id}
    assert repo.prune_jobs(cutoff, dry_run=True).jobs == 3
    assert repo.prune_jobs(cutoff, limit=10).jobs == 3


# --------------------------------------------------------------------------- job options (#11)
def test_a_job_keeps_its_pytest_arguments_and_python_version(repo: Repository,
                                                             user: User) -> None:
    plain = repo.create_job(user.id, b"zip", None)
    job = repo.create_job(user.id, b"zip", None, pytest_args=["-k", "slow and not é", "-x"],
                          python_version="3.13")
    assert (plain.pytest_args, plain.python_version) == ((), None)
    for seen in (job, repo.get_job(job.id), repo.list_jobs(user.id)[0]):
        assert seen.pytest_args == ("-k", "slow and not é", "-x")
        assert seen.python_version == "3.13"


def test_the_junit_xml_is_stored_with_the_outcome_and_pruned_with_the_output(
        repo: Repository, user: User) -> None:
    xml = '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="1"/></testsuites>'
    with_report, without = running_job(repo, user), running_job(repo, user)
    repo.finish_job(with_report.id, JobOutcome(status=JobStatus.COMPLETED, exit_code=0,
                                               success=True, reason=None, junit_xml=xml),
                    datetime.now(UTC), fence=owner_fence(repo, with_report.id))
    repo.finish_job(without.id, PASSED, datetime.now(UTC), fence=owner_fence(repo, without.id))
    assert repo.get_junit(with_report.id) == xml
    with pytest.raises(NotFound):
        repo.get_junit(without.id)
    with pytest.raises(NotFound):
        repo.get_junit(str(uuid.uuid4()))
    # The END event carries the outcome, never the XML.
    assert "testsuites" not in repo.list_events(with_report.id)[-1].text
    assert repo.prune_jobs(datetime.now(UTC) + timedelta(seconds=1)).jobs == 2
    with pytest.raises(NotFound):
        repo.get_junit(with_report.id)


def test_jobs_ahead_of_the_queue_snapshot_is_the_order_claims_take(repo: Repository) -> None:
    from ci_persistence.policy import jobs_ahead

    ann, bob, cy = (repo.create_user(name, f"{name}@example.com") for name in ("ann", "bob", "cy"))
    fence = hold_lease(repo, CTRL)
    # ann has two jobs claimed, bob one: each claim then makes its user one job busier.
    for owner in (ann, ann, bob):
        repo.create_job(owner.id, b"zip", None)
        assert repo.claim_next_job(fence) is not None
    time.sleep(0.002)
    for owner in (ann, bob, ann, cy, bob, ann, cy, ann):
        repo.create_job(owner.id, b"zip", None)
        time.sleep(0.002)
    cancelled = repo.create_job(cy.id, b"zip", None)
    repo.request_cancel(cancelled.id, cy.id)

    snapshot = repo.queue_snapshot()
    assert snapshot.busy == {ann.id: 2, bob.id: 1}
    assert len(snapshot.waiting) == 8 and cancelled.id not in {j.id for j in snapshot.waiting}
    ahead = jobs_ahead(snapshot)
    predicted = sorted(ahead, key=ahead.__getitem__)
    assert sorted(ahead.values()) == list(range(8))

    claimed = []
    while (job := repo.claim_next_job(fence)) is not None:
        claimed.append(job.id)
    assert claimed == predicted
    assert jobs_ahead(repo.queue_snapshot()) == {}


# --------------------------------------------------------------------------- environment cache
def env_key(user: User, requirements: str = "a" * 64, image: str = "sha256:img",
            engine: str = "engine-1") -> EnvKey:
    return EnvKey(user_id=user.id, engine_id=engine, image_id=image,
                  requirements_sha256=requirements)


def test_job_remembers_no_cache(repo: Repository, user: User) -> None:
    assert repo.create_job(user.id, b"zip", None).no_cache is False
    job = repo.create_job(user.id, b"zip", None, no_cache=True)
    assert job.no_cache is True and repo.get_job(job.id).no_cache is True


def test_env_is_found_only_once_built_and_only_by_its_own_key(repo: Repository,
                                                               user: User) -> None:
    other_user = repo.create_user("Bob", "bob@example.com")
    now = datetime.now(UTC)
    key = env_key(user)
    entry = repo.begin_env(key, "vol-1", "job-1", now)
    assert entry.state is EnvState.BUILDING and entry.key == key and entry.volume == "vol-1"
    assert repo.find_env(key) is None  # a build in progress is never used
    built = repo.env_built(entry.id, "3.11.2", 1234, now + timedelta(seconds=5))
    assert built is not None and built.state is EnvState.READY
    assert (built.python_version, built.size_bytes, built.job_id) == ("3.11.2", 1234, "job-1")
    assert is_aware_utc(built.built_at) and built.last_used_at == built.built_at
    assert repo.find_env(key) == built
    for different in (env_key(other_user), env_key(user, requirements="b" * 64),
                      env_key(user, image="sha256:other"), env_key(user, engine="engine-2")):
        assert repo.find_env(different) is None
    with pytest.raises(AlreadyExists):
        repo.begin_env(env_key(other_user), "vol-1", "job-2", now)


def test_the_later_of_two_builds_of_one_key_wins_and_a_pruned_build_never_becomes_ready(
        repo: Repository, user: User) -> None:
    now = datetime.now(UTC)
    key = env_key(user)
    first = repo.begin_env(key, "vol-1", "job-1", now)
    second = repo.begin_env(key, "vol-2", "job-2", now)
    assert repo.env_built(first.id, "3.11.2", 10, now) is not None
    assert repo.env_built(second.id, "3.11.2", 20, now + timedelta(seconds=1)) is not None
    states = {e.volume: e.state for e in repo.list_envs()}
    assert states == {"vol-1": EnvState.REMOVING, "vol-2": EnvState.READY}
    found = repo.find_env(key)
    assert found is not None and found.volume == "vol-2"
    assert repo.env_built(second.id, "3.11.2", 20, now) is None  # not building any more
    third = repo.begin_env(key, "vol-3", "job-3", now)
    assert {e.volume for e in repo.prune_envs(user.id)} == {"vol-2", "vol-3"}
    assert repo.env_built(third.id, "3.11.2", 30, now) is None
    assert repo.find_env(key) is None


def test_env_lru_order_touch_retire_prune_by_user_and_delete(repo: Repository,
                                                             user: User) -> None:
    other_user = repo.create_user("Bob", "bob@example.com")
    start = datetime.now(UTC)
    entries = []
    for number, owner in enumerate((user, user, other_user)):
        entry = repo.begin_env(env_key(owner, requirements=str(number) * 64, engine="e1"),
                               f"vol-{number}", f"job-{number}", start)
        built = repo.env_built(entry.id, "3.11.2", 100, start + timedelta(seconds=number))
        assert built is not None
        entries.append(built)
    repo.begin_env(env_key(user, engine="e2"), "vol-elsewhere", "job-9", start)
    repo.touch_env(entries[0].id, start + timedelta(seconds=10))
    assert [e.volume for e in repo.list_envs("e1")] == ["vol-1", "vol-2", "vol-0"]
    assert len(repo.list_envs()) == 4
    repo.retire_envs([entries[1].id, "unknown"])
    assert repo.find_env(entries[1].key) is None
    pruned = repo.prune_envs(other_user.id)
    assert [e.volume for e in pruned] == ["vol-2"]
    assert all(e.state is EnvState.REMOVING for e in pruned)
    assert repo.find_env(entries[0].key) is not None  # another user's prune left it alone
    assert {e.volume for e in repo.prune_envs()} == {"vol-0", "vol-elsewhere"}
    assert repo.prune_envs() == []
    for entry in repo.list_envs():
        repo.delete_env(entry.id)
    repo.delete_env("unknown")
    assert repo.list_envs() == []
