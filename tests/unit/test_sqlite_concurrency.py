"""SqliteRepository under real concurrency: several processes and threads on one file."""

from __future__ import annotations

import gc
import multiprocessing
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ci_common.models import EventKind, OutputChunk, OutputStream
from ci_common.settings import Settings
from ci_persistence import SqliteRepository, open_repository
from ci_persistence.migrate import load_migrations, split_statements
from tests.leases import hold_lease

SPAWN = multiprocessing.get_context("spawn")
PROCESS_TIMEOUT_S = 60


# --------------------------------------------------------------------------- child processes
def _hammer(path: str, name: str, rounds: int, barrier: Any, results: Any) -> None:
    """Create jobs, claim jobs and append output to them, as fast as possible."""
    try:
        repo = SqliteRepository(path)
        user = repo.create_user(name, f"{name}@example.com")
        fence = hold_lease(repo, name)
        created, claimed = [], []
        barrier.wait(timeout=PROCESS_TIMEOUT_S)
        for i in range(rounds):
            job = repo.create_job(user.id, b"zip", None)
            created.append(job.id)
            got = repo.claim_next_job(fence)
            if got is not None:
                claimed.append(got.id)
                chunks = [OutputChunk(OutputStream.STDOUT, f"{name} {i} line {n}\n")
                          for n in range(3)]
                repo.append_output(got.id, chunks, 1, fence=fence)
                repo.mark_running(got.id, f"container-{name}", datetime.now(UTC), fence=fence)
        repo.close()
        results.put(("ok", name, created, claimed))
    except BaseException as exc:  # report anything, "database is locked" above all
        barrier.abort()
        results.put(("error", name, repr(exc), []))


def _open_new_files(paths: list[str], name: str, barrier: Any, results: Any) -> None:
    """Open each brand-new file at the same moment as the other process, then write to it."""
    try:
        versions = []
        for path in paths:
            barrier.wait(timeout=PROCESS_TIMEOUT_S)
            repo = SqliteRepository(path)
            repo.create_user(name, f"{name}@example.com")
            versions.append(repo.schema_version)
            repo.close()
        results.put(("ok", name, versions, []))
    except BaseException as exc:
        barrier.abort()  # the other process fails at once instead of waiting for us
        results.put(("error", name, repr(exc), []))


def _wait_for_change(path: str, ready: Any, results: Any) -> None:
    """Take a change token, say so, then wait until another process's commit moves it."""
    try:
        repo = SqliteRepository(path)
        before = repo.change_token()
        ready.set()
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while repo.change_token() == before and time.monotonic() < deadline:
            time.sleep(0.002)
        moved = repo.change_token() != before
        emails = [user.email for user in repo.list_users()]
        repo.close()
        results.put(("ok", "reader", moved, emails))
    except BaseException as exc:
        results.put(("error", "reader", repr(exc), []))


def _collect(results: Any, count: int) -> list[tuple[str, str, Any, Any]]:
    got = [results.get(timeout=PROCESS_TIMEOUT_S) for _ in range(count)]
    errors = [item for item in got if item[0] == "error"]
    assert not errors, errors
    return got


def _join(processes: list[Any]) -> None:
    for process in processes:
        process.join(timeout=PROCESS_TIMEOUT_S)
        assert process.exitcode == 0


# --------------------------------------------------------------------------- processes
def test_two_writer_processes_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "ci.db")
    SqliteRepository(path).close()
    rounds = 300
    barrier, results = SPAWN.Barrier(2), SPAWN.Queue()
    processes = [SPAWN.Process(target=_hammer, args=(path, name, rounds, barrier, results))
                 for name in ("alpha", "beta")]
    for process in processes:
        process.start()
    outcome = _collect(results, 2)
    _join(processes)

    created = [job for item in outcome for job in item[2]]
    claimed = [job for item in outcome for job in item[3]]
    assert len(created) == len(set(created)) == 2 * rounds
    assert len(claimed) == len(set(claimed)), "a job was claimed twice"
    repo = SqliteRepository(path)
    try:
        assert set(claimed) <= set(created)
        assert repo.count_queued_jobs() == 2 * rounds - len(claimed)
        for job_id in created:
            events = repo.list_events(job_id)
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
            kinds = Counter(e.kind for e in events)
            assert kinds[EventKind.OUTPUT] == (3 if job_id in claimed else 0)
            assert repo.get_job(job_id).output_bytes == sum(
                len(e.text.encode()) for e in events if e.kind is EventKind.OUTPUT)
        everything, _ = repo.poll_events(0)
        # one "queued" per job; three outputs and one "running" per claim
        assert len(everything) == 2 * rounds + 4 * len(claimed)
    finally:
        repo.close()


def test_two_processes_create_the_schema_on_a_new_file_at_once(tmp_path: Path) -> None:
    paths = [str(tmp_path / f"new-{i}.db") for i in range(8)]
    barrier, results = SPAWN.Barrier(2), SPAWN.Queue()
    processes = [SPAWN.Process(target=_open_new_files, args=(paths, name, barrier, results))
                 for name in ("alpha", "beta")]
    for process in processes:
        process.start()
    outcome = _collect(results, 2)
    _join(processes)
    latest = load_migrations()[-1].version
    assert all(item[2] == [latest] * len(paths) for item in outcome)
    for path in paths:
        repo = SqliteRepository(path)
        assert sorted(u.email for u in repo.list_users()) == [
            "alpha@example.com", "beta@example.com"]
        repo.close()


def test_reader_in_another_process_sees_a_commit_via_change_token(tmp_path: Path) -> None:
    path = str(tmp_path / "ci.db")
    writer = SqliteRepository(path)
    ready, results = SPAWN.Event(), SPAWN.Queue()
    reader = SPAWN.Process(target=_wait_for_change, args=(path, ready, results))
    reader.start()
    try:
        assert ready.wait(timeout=PROCESS_TIMEOUT_S)
        writer.create_user("Ada", "ada@example.com")
        [(_, _, moved, emails)] = _collect(results, 1)
        assert moved is True
        assert emails == ["ada@example.com"]
    finally:
        _join([reader])
        writer.close()


# --------------------------------------------------------------------------- threads
def test_many_threads_on_two_instances_never_double_claim(tmp_path: Path) -> None:
    path = str(tmp_path / "ci.db")
    repos = [SqliteRepository(path), SqliteRepository(path)]
    user = repos[0].create_user("Ada", "ada@example.com")
    jobs = {repos[0].create_job(user.id, b"zip", None).id for _ in range(60)}
    claimed: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def claim_all(repo: SqliteRepository, name: str) -> None:
        try:
            while (job := repo.claim_next_job(hold_lease(repo, name))) is not None:
                with lock:
                    claimed.append(job.id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claim_all, args=(repos[i % 2], f"c{i}"))
               for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=PROCESS_TIMEOUT_S)
    assert not errors
    assert sorted(claimed) == sorted(jobs)
    assert repos[1].count_queued_jobs() == 0
    for repo in repos:
        repo.close()


def test_change_token_is_comparable_across_threads(tmp_path: Path) -> None:
    path = str(tmp_path / "ci.db")
    repo, other = SqliteRepository(path), SqliteRepository(path)
    tokens: list[int] = []

    def take() -> None:
        tokens.append(repo.change_token())

    writes: list[Callable[[], object]] = [lambda: other.create_user("A", "a@example.com"),
                                          lambda: repo.create_user("B", "b@example.com")]
    for write in writes:
        thread = threading.Thread(target=take)
        thread.start()
        thread.join()
        write()
        take()  # on the main thread, after the write: must differ from the other thread's
        assert tokens[-1] != tokens[-2]
    repo.close()
    other.close()


# --------------------------------------------------------------------------- locks
def _hold_exclusive(path: str, seconds: float) -> tuple[sqlite3.Connection, threading.Thread]:
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")
    blocker.execute("INSERT INTO users (id, name, email, is_active, created_at) "
                    "VALUES ('blocker', 'B', 'blocker@example.com', 1, '2030-01-01')")
    release = threading.Timer(seconds, lambda: blocker.execute("COMMIT"))
    release.start()
    return blocker, release


def test_a_write_waits_for_an_exclusive_lock_then_succeeds(tmp_path: Path) -> None:
    path = str(tmp_path / "ci.db")
    repo = SqliteRepository(path)
    user = repo.create_user("Ada", "ada@example.com")
    blocker, release = _hold_exclusive(path, 1.0)
    try:
        started = time.monotonic()
        assert repo.get_user(user.id) == user  # WAL: readers do not wait for the writer
        assert time.monotonic() - started < 0.5
        job = repo.create_job(user.id, b"zip", None)
        waited = time.monotonic() - started
        assert 0.8 <= waited < 10
        assert repo.get_job(job.id).id == job.id
        assert repo.get_user_by_email("blocker@example.com").id == "blocker"
    finally:
        release.join()
        blocker.close()
        repo.close()


def test_a_write_gives_up_after_the_busy_timeout(tmp_path: Path) -> None:
    path = str(tmp_path / "ci.db")
    repo = SqliteRepository(path, busy_timeout_ms=200)
    blocker, release = _hold_exclusive(path, 0.9)
    try:
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError):
            repo.create_user("Ada", "ada@example.com")
        assert time.monotonic() - started < 0.7
    finally:
        release.join()
        blocker.close()
    assert repo.create_user("Ada", "ada@example.com").email == "ada@example.com"
    repo.close()


# --------------------------------------------------------------------------- schema
def test_migrations_are_numbered_and_recorded(tmp_path: Path) -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    path = tmp_path / "ci.db"
    path.touch()  # an empty file is a new database
    repo = open_repository(Settings(db_path=str(path)))
    assert repo.schema_version == migrations[-1].version
    repo.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations[-1].version
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"users", "api_keys", "jobs", "job_archives", "job_events"} <= tables
    conn.close()
    again = SqliteRepository(str(path))  # reopening applies nothing and keeps data
    assert again.schema_version == migrations[-1].version
    again.close()


def test_split_statements_keeps_triggers_whole() -> None:
    script = """
    -- a comment
    CREATE TABLE t (a INTEGER); -- trailing
    CREATE TRIGGER tr AFTER INSERT ON t BEGIN
        UPDATE t SET a = a + 1; DELETE FROM t WHERE a > 9;
    END;
    """
    statements = split_statements(script)
    assert len(statements) == 2
    assert statements[1].startswith("CREATE TRIGGER") and statements[1].endswith("END;")
    with pytest.raises(ValueError):
        split_statements("CREATE TABLE x (a")


def test_data_is_shared_between_instances_and_survives_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "ci.db")
    first, second = SqliteRepository(path), SqliteRepository(path)
    token = second.change_token()
    user = first.create_user("Ada", "ada@example.com")
    job = first.create_job(user.id, b"\x00\x01zip", 30.0)
    assert second.change_token() != token
    assert second.get_job(job.id) == job
    first.close()
    second.close()
    reopened = SqliteRepository(path)
    assert reopened.get_archive(job.id) == b"\x00\x01zip"
    assert reopened.get_job(job.id) == job
    reopened.close()


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to count files")
def test_connections_of_finished_threads_are_released(tmp_path: Path) -> None:
    path = tmp_path / "ci.db"
    repo = SqliteRepository(str(path))
    user = repo.create_user("Ada", "ada@example.com")

    def open_files() -> int:
        fds = Path("/proc/self/fd").iterdir()
        return sum(1 for fd in fds if _readlink(fd).startswith(str(path)))

    def use() -> None:
        repo.get_user(user.id)

    baseline = open_files()
    for _ in range(20):  # like a worker pool retiring idle threads and starting new ones
        thread = threading.Thread(target=use)
        thread.start()
        thread.join()
    gc.collect()
    assert open_files() <= baseline + 3  # one thread's connection: db, -wal, -shm at most
    repo.close()
    gc.collect()
    assert open_files() == 0


def _readlink(fd: Path) -> str:
    try:
        return str(fd.readlink())
    except OSError:
        return ""
