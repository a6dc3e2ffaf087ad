"""SqliteRepository: the Repository contract on one SQLite file shared by several processes.

The controller, any number of server replicas and ci-admin open the same file. Every method is
one transaction; every transaction that writes starts with BEGIN IMMEDIATE (see connection.py),
so concurrent writers queue on the write lock instead of failing with "database is locked".
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime

from ci_common.errors import AlreadyExists, NotFound
from ci_common.models import (
    ApiKey,
    ControllerLease,
    EnvEntry,
    EnvKey,
    EventKind,
    Fence,
    Job,
    JobEvent,
    JobOutcome,
    JobStatus,
    OutputChunk,
    OutputStream,
    PruneResult,
    QueueSnapshot,
    StoredKey,
    TakeOver,
    User,
    WaitingJob,
    utcnow,
)
from ci_common.pytest_args import pytest_args_to_json
from ci_persistence.connection import SqliteConnector, enable_wal, open_connection
from ci_persistence.logcap import marker_text, plan_drop, utf8_len
from ci_persistence.migrate import migrate
from ci_persistence.policy import (
    POLL_BATCH,
    Fate,
    TakeOverFates,
    can_take_over,
    cancelled_outcome,
    check_lease_free,
    check_terminal,
    controller_lost_outcome,
    end_event_text,
    env_lru_order,
    lease_lost,
)
from ci_persistence.rows import (
    ENV_COLUMNS,
    EVENT_COLUMNS,
    JOB_COLUMNS,
    KEY_SELECT,
    LEASE_SELECT,
    USER_COLUMNS,
    env_from_row,
    event_from_row,
    job_from_row,
    key_from_row,
    key_owner_from_row,
    lease_from_row,
    report_to_text,
    user_from_row,
)
from ci_persistence.timefmt import from_text, to_text

_ACTIVE = "('queued', 'running')"  # claimed-or-running jobs are in one of these states
_CAP_BATCH = 500  # oldest OUTPUT events read per step while planning a log-cap drop

# Fairness: among waiting jobs, the user with the fewest claimed-but-unfinished jobs goes
# first, then the oldest job. One statement, inside BEGIN IMMEDIATE: nobody else can claim
# between the choice and the update. INDEXED BY keeps the busy count on the small partial
# index of active jobs; left to guess, the planner scans every job ever run.
_CLAIM_SQL = f"""
UPDATE jobs SET controller_id = :controller_id
WHERE EXISTS (SELECT 1 FROM controllers WHERE id = :controller_id AND token = :token)
AND id = (
    SELECT w.id FROM jobs w
    LEFT JOIN (
        SELECT user_id, count(*) AS n FROM jobs INDEXED BY jobs_active
        WHERE controller_id IS NOT NULL AND status IN {_ACTIVE}
        GROUP BY user_id
    ) busy ON busy.user_id = w.user_id
    JOIN users u ON u.id = w.user_id
    WHERE w.status = 'queued' AND w.controller_id IS NULL AND w.cancel_requested = 0
    ORDER BY coalesce(busy.n, 0), u.claim_turn, w.created_at, w.id
    LIMIT 1
)
AND status = 'queued' AND controller_id IS NULL
RETURNING {JOB_COLUMNS}
"""

# A claim gives its user the newest turn (policy.claim_key); writers are serialised here.
_TAKE_TURN_SQL = ("UPDATE users SET claim_turn = (SELECT max(claim_turn) FROM users) + 1 "
                  "WHERE id = ?")

# What the claim order depends on (see policy.jobs_ahead), for queue positions: the waiting
# jobs (id set), then each busy user's count (id NULL), as _CLAIM_SQL reads them.
_QUEUE_SQL = f"""
SELECT j.id, j.user_id, j.created_at, u.claim_turn AS n FROM jobs j JOIN users u ON u.id = j.user_id
WHERE j.status = 'queued' AND j.controller_id IS NULL AND j.cancel_requested = 0
UNION ALL
SELECT NULL, user_id, NULL, count(*) FROM jobs INDEXED BY jobs_active
WHERE controller_id IS NOT NULL AND status IN {_ACTIVE}
GROUP BY user_id
"""


class SqliteRepository:
    """The Repository Protocol on a SQLite file (WAL), safe across threads and processes."""

    def __init__(self, path: str, busy_timeout_ms: int = 30000) -> None:
        self._db = SqliteConnector(path, busy_timeout_ms)
        setup = open_connection(path, busy_timeout_ms)
        try:
            enable_wal(setup, self._db.busy_timeout_s)
            self.schema_version = migrate(setup, self._db.busy_timeout_s)
        finally:
            setup.close()
        self._installation_id: str | None = None

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Release connections. Safe to call twice."""
        self._db.close()

    def change_token(self) -> int:
        """Differs after any commit by anyone (data_version plus this process's commits)."""
        return self._db.change_token()

    def wait_for_change(self, seen: int | None, timeout_s: float) -> int:
        """Sleep on inotify events of the database files and this process's commits."""
        return self._db.wait_for_change(seen, timeout_s)

    def interrupt_waits(self) -> None:
        """Wake every wait_for_change of this process now."""
        self._db.interrupt_waits()

    def installation_id(self) -> str:
        """The id migration 0002 stored; read once, it never changes."""
        if self._installation_id is None:
            self._installation_id = str(self._db.query("SELECT id FROM installation")[0][0])
        return self._installation_id

    # ----------------------------------------------------------------- users
    def create_user(self, name: str, email: str) -> User:
        """Create an active user. Raises AlreadyExists when the email is taken."""
        user = User(id=str(uuid.uuid4()), name=name, email=email, is_active=True,
                    created_at=utcnow())
        try:
            with self._db.write() as conn:
                conn.execute(f"INSERT INTO users ({USER_COLUMNS}) VALUES (?, ?, ?, 1, ?)",
                             (user.id, name, email, to_text(user.created_at)))
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"a user with email {email} already exists") from None
        return user

    def get_user(self, user_id: str) -> User:
        """Raises NotFound."""
        rows = self._db.query(f"SELECT {USER_COLUMNS} FROM users WHERE id = ?", (user_id,))
        if not rows:
            raise NotFound(f"user {user_id} not found")
        return user_from_row(rows[0])

    def get_user_by_email(self, email: str) -> User:
        """Case-insensitive (the column is COLLATE NOCASE). Raises NotFound."""
        rows = self._db.query(f"SELECT {USER_COLUMNS} FROM users WHERE email = ?", (email,))
        if not rows:
            raise NotFound(f"no user with email {email}")
        return user_from_row(rows[0])

    def list_users(self) -> list[User]:
        """All users, oldest first."""
        rows = self._db.query(f"SELECT {USER_COLUMNS} FROM users ORDER BY created_at, rowid")
        return [user_from_row(row) for row in rows]

    def set_user_active(self, user_id: str, active: bool) -> User:
        """Activate or deactivate. Raises NotFound."""
        with self._db.write() as conn:
            row = conn.execute(f"UPDATE users SET is_active = ? WHERE id = ? "
                               f"RETURNING {USER_COLUMNS}", (int(active), user_id)).fetchone()
        if row is None:
            raise NotFound(f"user {user_id} not found")
        return user_from_row(row)

    # ----------------------------------------------------------------- API keys
    def create_api_key(self, user_id: str, name: str, key_hash: str, prefix: str) -> ApiKey:
        """Store a new key's hash and prefix. Raises NotFound (user)."""
        key_id, now = str(uuid.uuid4()), utcnow()
        try:
            with self._db.write() as conn:
                if conn.execute("SELECT 1 FROM users WHERE id = ?", (user_id,)).fetchone() is None:
                    raise NotFound(f"user {user_id} not found")
                conn.execute(
                    "INSERT INTO api_keys (id, user_id, name, key_hash, prefix, is_active, "
                    "created_at) VALUES (?, ?, ?, ?, ?, 1, ?)",
                    (key_id, user_id, name, key_hash, prefix, to_text(now)))
                row = conn.execute(f"{KEY_SELECT} WHERE k.id = ?", (key_id,)).fetchone()
        except sqlite3.IntegrityError:
            raise AlreadyExists("an API key with that hash already exists") from None
        return key_from_row(row)

    def list_api_keys(self, user_id: str | None = None) -> list[ApiKey]:
        """Keys of one user, or of everyone when user_id is None; oldest first."""
        if user_id is None:
            rows = self._db.query(f"{KEY_SELECT} ORDER BY k.created_at, k.rowid")
        else:
            rows = self._db.query(f"{KEY_SELECT} WHERE k.user_id = ? "
                                  "ORDER BY k.created_at, k.rowid", (user_id,))
        return [key_from_row(row) for row in rows]

    def revoke_api_key(self, key_id: str) -> ApiKey:
        """Deactivate a key. Raises NotFound."""
        with self._db.write() as conn:
            conn.execute("UPDATE api_keys SET is_active = 0 WHERE id = ?", (key_id,))
            row = conn.execute(f"{KEY_SELECT} WHERE k.id = ?", (key_id,)).fetchone()
        if row is None:
            raise NotFound(f"API key {key_id} not found")
        return key_from_row(row)

    def find_keys_by_prefix(self, prefix: str) -> list[StoredKey]:
        """Candidate keys for authentication (active or not), with their owner."""
        rows = self._db.query(f"{KEY_SELECT} WHERE k.prefix = ? ORDER BY k.created_at",
                              (prefix,))
        return [StoredKey(key=key_from_row(row), key_hash=row["key_hash"],
                          user=key_owner_from_row(row)) for row in rows]

    def touch_api_key(self, key_id: str, when: datetime) -> None:
        """Record a successful use (last_used_at). Unknown ids are ignored."""
        with self._db.write() as conn:
            conn.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?",
                         (to_text(when), key_id))

    # ----------------------------------------------------------------- jobs (server side)
    def create_job(self, user_id: str, archive: bytes, timeout_seconds: float | None, *,
                   pytest_args: Sequence[str] = (), python_version: str | None = None,
                   no_cache: bool = False) -> Job:
        """Store the archive and a queued job with its first STATUS event, atomically."""
        job_id = str(uuid.uuid4())
        with self._db.write() as conn:
            if conn.execute("SELECT 1 FROM users WHERE id = ?", (user_id,)).fetchone() is None:
                raise NotFound(f"user {user_id} not found")
            conn.execute(
                "INSERT INTO jobs (id, user_id, status, created_at, timeout_seconds, "
                "archive_size, pytest_args, python_version, no_cache) "
                "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                (job_id, user_id, to_text(utcnow()), timeout_seconds, len(archive),
                 pytest_args_to_json(pytest_args), python_version, int(no_cache)))
            conn.execute("INSERT INTO job_archives (job_id, data) VALUES (?, ?)",
                         (job_id, sqlite3.Binary(archive)))
            _append_event(conn, job_id, EventKind.STATUS, JobStatus.QUEUED.value)
            return _load_job(conn, job_id)

    def get_job(self, job_id: str, user_id: str | None = None) -> Job:
        """One job; with user_id, another user's job raises NotFound like a missing one."""
        rows = self._db.query(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        if not rows or (user_id is not None and rows[0]["user_id"] != user_id):
            raise NotFound(f"job {job_id} not found")
        return job_from_row(rows[0])

    def list_jobs(self, user_id: str, limit: int = 50, offset: int = 0,
                  status: JobStatus | None = None) -> list[Job]:
        """The user's jobs (in `status`, if given), newest first (created_at, then id)."""
        where, params = _user_jobs(user_id, status)
        rows = self._db.query(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE {where} "
            "ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?",
            (*params, max(limit, 0), max(offset, 0)))
        return [job_from_row(row) for row in rows]

    def count_jobs(self, user_id: str, status: JobStatus | None = None) -> int:
        """How many jobs the user has (in `status`, if given)."""
        where, params = _user_jobs(user_id, status)
        return int(self._db.query(f"SELECT count(*) FROM jobs WHERE {where}", params)[0][0])

    def request_cancel(self, job_id: str, user_id: str) -> Job:
        """Cancel a queued unclaimed job at once; flag a claimed or running one; atomic."""
        with self._db.write() as conn:
            job = _load_job(conn, job_id, user_id)
            if job.status.is_terminal:
                return job
            conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            if job.status is JobStatus.QUEUED and job.controller_id is None:
                _finish(conn, job_id, cancelled_outcome(), utcnow())
            return _load_job(conn, job_id)

    def get_archive(self, job_id: str) -> bytes:
        """The uploaded zip. Raises NotFound."""
        rows = self._db.query("SELECT data FROM job_archives WHERE job_id = ?", (job_id,))
        if not rows:
            raise NotFound(f"archive of job {job_id} not found")
        return bytes(rows[0][0])

    def get_junit(self, job_id: str) -> str:
        """pytest's JUnit XML of the job. Raises NotFound when there is none."""
        rows = self._db.query("SELECT xml FROM job_junit WHERE job_id = ?", (job_id,))
        if not rows:
            raise NotFound(f"no JUnit report stored for job {job_id}")
        return str(rows[0][0])

    def queue_snapshot(self) -> QueueSnapshot:
        """The waiting jobs and each user's busy count, in one read transaction."""
        rows = self._db.query(_QUEUE_SQL)  # one statement: one snapshot of both halves
        return QueueSnapshot(
            waiting=tuple(WaitingJob(row["id"], row["user_id"], from_text(row["created_at"]),
                                     int(row["n"]))
                          for row in rows if row["id"] is not None),
            busy={row["user_id"]: int(row["n"]) for row in rows if row["id"] is None})

    def prune_jobs(self, finished_before: datetime, *, dry_run: bool = False,
                   limit: int = 500) -> PruneResult:
        """Remove the output and archives of finished jobs that ended before the cutoff."""
        # The WHERE matches the jobs_prunable partial index, so old pruned jobs cost nothing.
        where = "pruned_at IS NULL AND end_time IS NOT NULL AND end_time < ?"
        cutoff = to_text(finished_before)
        if dry_run:
            row = self._db.query("SELECT count(*), coalesce(sum(output_bytes + archive_size), 0) "
                                 f"FROM jobs WHERE {where}", (cutoff,))[0]
            return PruneResult(jobs=int(row[0]), freed_bytes=int(row[1]))
        with self._db.write() as conn:
            rows = conn.execute(f"SELECT id, output_bytes + archive_size FROM jobs WHERE {where} "
                                "ORDER BY end_time LIMIT ?", (cutoff, max(limit, 0))).fetchall()
            ids = [row[0] for row in rows]
            if not ids:
                return PruneResult(jobs=0, freed_bytes=0)
            marks = ", ".join("?" * len(ids))
            conn.execute(f"DELETE FROM job_events WHERE kind = 'output' AND job_id IN ({marks})",
                         ids)
            conn.execute(f"DELETE FROM job_archives WHERE job_id IN ({marks})", ids)
            conn.execute(f"DELETE FROM job_junit WHERE job_id IN ({marks})", ids)
            conn.execute(f"UPDATE jobs SET pruned_at = ?, output_bytes = 0, marker_seq = NULL "
                         f"WHERE id IN ({marks})", [to_text(utcnow()), *ids])
            return PruneResult(jobs=len(ids), freed_bytes=sum(int(row[1]) for row in rows))

    # ----------------------------------------------------------------- jobs (controller side)
    def claim_next_job(self, fence: Fence) -> Job | None:
        """Atomically claim the fairest waiting job; None when nothing is waiting."""
        with self._db.write() as conn:
            row = conn.execute(_CLAIM_SQL, {"controller_id": fence.controller_id,
                                            "token": fence.token}).fetchone()
            if row is None:
                _check_lease(conn, fence)
            else:
                conn.execute(_TAKE_TURN_SQL, (row["user_id"],))
        return None if row is None else job_from_row(row)

    def mark_start_attempt(self, job_id: str, now: datetime, *, fence: Fence) -> Job:
        """Note that the claimed job's container is about to be made (see the Protocol)."""
        with self._db.write() as conn:
            job = _load_fenced_job(conn, job_id, fence)
            if job.status is not JobStatus.QUEUED:
                return job
            conn.execute("UPDATE jobs SET start_attempted_at = ? WHERE id = ?",
                         (to_text(now), job_id))
            return _load_job(conn, job_id)

    def mark_running(self, job_id: str, container_id: str, start_time: datetime, *,
                     fence: Fence) -> Job:
        """Status RUNNING with its STATUS event; again for a running job only sets container_id.

        A job that became terminal meanwhile is returned unchanged.
        """
        with self._db.write() as conn:
            job = _load_fenced_job(conn, job_id, fence)
            if job.status.is_terminal:
                return job
            if job.status is JobStatus.RUNNING:
                conn.execute("UPDATE jobs SET container_id = ? WHERE id = ?",
                             (container_id, job_id))
            else:
                conn.execute("UPDATE jobs SET status = 'running', container_id = ?, "
                             "start_time = ? WHERE id = ?",
                             (container_id, to_text(start_time), job_id))
                _append_event(conn, job_id, EventKind.STATUS, JobStatus.RUNNING.value)
            return _load_job(conn, job_id)

    def release_job(self, job_id: str, *, fence: Fence) -> Job:
        """Unclaim a job that never started; one whose cancel was asked is cancelled instead."""
        with self._db.write() as conn:
            job = _load_fenced_job(conn, job_id, fence)
            if job.status is not JobStatus.QUEUED or job.controller_id is None:
                return job
            conn.execute("UPDATE jobs SET controller_id = NULL, start_attempted_at = NULL "
                         "WHERE id = ?", (job_id,))
            if job.cancel_requested:
                # Nobody would ever claim it again: finish it now rather than leave it queued.
                _finish(conn, job_id, cancelled_outcome(), utcnow())
            return _load_job(conn, job_id)

    def append_output(
        self,
        job_id: str,
        chunks: Sequence[OutputChunk],
        log_cursor: int,
        *,
        fence: Fence,
        keep_bytes: int | None = None,
        skipped_bytes: int = 0,
    ) -> list[JobEvent]:
        """Append OUTPUT events and move log_cursor in one transaction; apply the log cap."""
        with self._db.write() as conn:
            job = _load_fenced_job(conn, job_id, fence)
            if job.status.is_terminal:
                return []
            texts = [chunk for chunk in chunks if chunk.text]
            first_seq = _reserve_seqs(conn, job_id, len(texts))
            now = to_text(utcnow())
            conn.executemany(
                "INSERT INTO job_events (job_id, seq, kind, stream, text, created_at) "
                "VALUES (?, ?, 'output', ?, ?, ?)",
                [(job_id, first_seq + i, chunk.stream.value, chunk.text, now)
                 for i, chunk in enumerate(texts)])
            added = sum(utf8_len(chunk.text) for chunk in texts)
            conn.execute("UPDATE jobs SET log_cursor = ?, output_bytes = output_bytes + ?, "
                         "dropped_bytes = dropped_bytes + ? WHERE id = ?",
                         (log_cursor, added, max(skipped_bytes, 0), job_id))
            if keep_bytes is not None and job.output_bytes + added > keep_bytes:
                _apply_cap(conn, job_id, keep_bytes)
            if not texts:
                return []
            rows = conn.execute(
                f"SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = ? AND seq >= ? "
                "ORDER BY seq", (job_id, first_seq)).fetchall()
            return [event_from_row(row) for row in rows]

    def finish_job(self, job_id: str, outcome: JobOutcome, end_time: datetime, *,
                   fence: Fence) -> Job:
        """Record the outcome and append the END event, atomically and once."""
        check_terminal(outcome)
        with self._db.write() as conn:
            job = _load_fenced_job(conn, job_id, fence)
            if job.status.is_terminal:
                return job
            _finish(conn, job_id, outcome, end_time)
            return _load_job(conn, job_id)

    def list_controller_jobs(self, controller_id: str) -> list[Job]:
        """Claimed or running, not yet terminal jobs owned by this controller."""
        rows = self._db.query(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE controller_id = ? AND status IN {_ACTIVE} "
            "ORDER BY created_at, id", (controller_id,))
        return [job_from_row(row) for row in rows]

    def count_queued_jobs(self) -> int:
        """Queued jobs that no controller has claimed yet."""
        return int(self._db.query("SELECT count(*) FROM jobs WHERE status = 'queued' "
                                  "AND controller_id IS NULL")[0][0])

    def count_jobs_by_status(self) -> dict[JobStatus, int]:
        """Every user's jobs counted by status (0 when none)."""
        counts = dict.fromkeys(JobStatus, 0)
        for status, count in self._db.query("SELECT status, count(*) FROM jobs GROUP BY status"):
            counts[JobStatus(status)] = int(count)
        return counts

    # ----------------------------------------------------------------- controller leases
    def acquire_lease(self, controller_id: str, host: str, pid: int, version: str,
                      now: datetime, lease_s: float,
                      replace_token: str | None = None) -> ControllerLease:
        """Take the lease with a new token unless a live controller holds it; atomic."""
        with self._db.write() as conn:
            row = conn.execute(f"{LEASE_SELECT} WHERE c.id = ?", (controller_id,)).fetchone()
            check_lease_free(None if row is None else lease_from_row(row), now, replace_token)
            conn.execute(
                "INSERT INTO controllers (id, host, pid, version, token, started_at, "
                "heartbeat_at, stopped, lease_s) VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?) "
                "ON CONFLICT (id) DO "
                "UPDATE SET host = excluded.host, pid = excluded.pid, version = excluded.version, "
                "token = excluded.token, started_at = excluded.started_at, "
                "heartbeat_at = excluded.heartbeat_at, stopped = 0, "
                "lease_s = excluded.lease_s",
                (controller_id, host, pid, version, uuid.uuid4().hex, to_text(now), to_text(now),
                 lease_s))
            row = conn.execute(f"{LEASE_SELECT} WHERE c.id = ?", (controller_id,)).fetchone()
            return lease_from_row(row)

    def renew_lease(self, controller_id: str, token: str, now: datetime) -> bool:
        """Heartbeat; False when the lease is no longer held with this token."""
        with self._db.write() as conn:
            row = conn.execute("UPDATE controllers SET heartbeat_at = ? WHERE id = ? AND "
                               "token = ? AND stopped = 0 RETURNING id",
                               (to_text(now), controller_id, token)).fetchone()
        return row is not None

    def release_lease(self, controller_id: str, token: str, now: datetime) -> None:
        """Mark the lease stopped (graceful stop)."""
        with self._db.write() as conn:
            conn.execute("UPDATE controllers SET stopped = 1, heartbeat_at = ? "
                         "WHERE id = ? AND token = ?", (to_text(now), controller_id, token))

    def record_engine(self, fence: Fence, engine_id: str) -> None:
        """Note the engine this holder runs containers on; LeaseLost if no longer held."""
        with self._db.write() as conn:
            row = conn.execute("UPDATE controllers SET engine_id = ? WHERE id = ? AND token = ? "
                               "RETURNING id", (engine_id, fence.controller_id, fence.token)
                               ).fetchone()
            if row is None:
                raise lease_lost(fence)

    def take_over(self, gone: ControllerLease, taker: Fence, adopt: bool,
                  now: datetime) -> TakeOver | None:
        """Take an expired controller's jobs, if it is still as the taker saw it; atomic."""
        with self._db.write() as conn:
            row = conn.execute(f"{LEASE_SELECT} WHERE c.id = ?", (gone.id,)).fetchone()
            holder = None if row is None else lease_from_row(row)
            if holder is None or not can_take_over(holder, gone.token, now):
                return None
            _check_lease(conn, taker)
            # A new token nobody knows: every late write of the gone holder is refused.
            conn.execute("UPDATE controllers SET token = ? WHERE id = ?",
                         (uuid.uuid4().hex, gone.id))
            jobs = [job_from_row(r) for r in conn.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE controller_id = ? AND status IN {_ACTIVE} "
                "ORDER BY created_at, id", (gone.id,)).fetchall()]
            fates = TakeOverFates()
            for job in jobs:
                fate = fates.decide(job, adopt)
                if fate is Fate.ADOPTED:
                    conn.execute("UPDATE jobs SET controller_id = ? WHERE id = ?",
                                 (taker.controller_id, job.id))
                elif fate is Fate.FAILED:
                    _finish(conn, job.id, controller_lost_outcome(holder), now)
                else:
                    conn.execute("UPDATE jobs SET controller_id = NULL, "
                                 "start_attempted_at = NULL WHERE id = ?", (job.id,))
                    if fate is Fate.CANCELLED:
                        _finish(conn, job.id, cancelled_outcome(), now)
            return fates.result(gone.id)

    def get_lease(self, controller_id: str) -> ControllerLease | None:
        """The lease row of one controller id, or None."""
        rows = self._db.query(f"{LEASE_SELECT} WHERE c.id = ?", (controller_id,))
        return lease_from_row(rows[0]) if rows else None

    def list_leases(self) -> list[ControllerLease]:
        """Every registered controller id, by id."""
        return [lease_from_row(row) for row in self._db.query(f"{LEASE_SELECT} ORDER BY c.id")]

    # ----------------------------------------------------------------- environment cache
    def begin_env(self, key: EnvKey, volume: str, job_id: str, now: datetime) -> EnvEntry:
        """Record a build about to start: state building."""
        entry_id = str(uuid.uuid4())
        with self._db.write() as conn:
            try:
                conn.execute(
                    "INSERT INTO env_cache (id, user_id, engine_id, image_id, "
                    "requirements_sha256, volume, state, job_id, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, 'building', ?, ?)",
                    (entry_id, key.user_id, key.engine_id, key.image_id,
                     key.requirements_sha256, volume, job_id, to_text(now)))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"volume {volume} is already recorded") from None
            return _load_env(conn, entry_id)

    def find_env(self, key: EnvKey) -> EnvEntry | None:
        """The newest ready entry of this key."""
        rows = self._db.query(
            f"SELECT {ENV_COLUMNS} FROM env_cache WHERE user_id = ? AND engine_id = ? "
            "AND image_id = ? AND requirements_sha256 = ? AND state = 'ready' "
            "ORDER BY built_at DESC, id DESC LIMIT 1",
            (key.user_id, key.engine_id, key.image_id, key.requirements_sha256))
        return env_from_row(rows[0]) if rows else None

    def env_built(self, entry_id: str, python_version: str, size_bytes: int,
                  now: datetime) -> EnvEntry | None:
        """building → ready, retiring the other ready entries of its key; atomic."""
        with self._db.write() as conn:
            rows = conn.execute(f"SELECT {ENV_COLUMNS} FROM env_cache WHERE id = ?",
                                (entry_id,)).fetchall()
            if not rows or rows[0]["state"] != "building":
                return None
            key = env_from_row(rows[0]).key
            conn.execute(
                "UPDATE env_cache SET state = 'removing' WHERE user_id = ? AND engine_id = ? "
                "AND image_id = ? AND requirements_sha256 = ? AND state = 'ready'",
                (key.user_id, key.engine_id, key.image_id, key.requirements_sha256))
            conn.execute(
                "UPDATE env_cache SET state = 'ready', python_version = ?, size_bytes = ?, "
                "built_at = ?, last_used_at = ? WHERE id = ?",
                (python_version, size_bytes, to_text(now), to_text(now), entry_id))
            return _load_env(conn, entry_id)

    def touch_env(self, entry_id: str, now: datetime) -> None:
        """last_used_at = now."""
        with self._db.write() as conn:
            conn.execute("UPDATE env_cache SET last_used_at = ? WHERE id = ?",
                         (to_text(now), entry_id))

    def retire_envs(self, entry_ids: Sequence[str]) -> None:
        """Mark entries removing."""
        with self._db.write() as conn:
            conn.executemany("UPDATE env_cache SET state = 'removing' WHERE id = ?",
                             [(entry_id,) for entry_id in entry_ids])

    def prune_envs(self, user_id: str | None = None) -> list[EnvEntry]:
        """Mark every (or one user's) entry removing; returns those it marked."""
        with self._db.write() as conn:
            rows = conn.execute(
                f"UPDATE env_cache SET state = 'removing' WHERE state != 'removing' "
                f"AND (? IS NULL OR user_id = ?) RETURNING {ENV_COLUMNS}",
                (user_id, user_id)).fetchall()
        return sorted((env_from_row(row) for row in rows), key=env_lru_order)

    def list_envs(self, engine_id: str | None = None) -> list[EnvEntry]:
        """Every (or one engine's) entry, least recently used first."""
        rows = self._db.query(
            f"SELECT {ENV_COLUMNS} FROM env_cache WHERE (? IS NULL OR engine_id = ?)",
            (engine_id, engine_id))
        return sorted((env_from_row(row) for row in rows), key=env_lru_order)

    def delete_env(self, entry_id: str) -> None:
        """Forget an entry."""
        with self._db.write() as conn:
            conn.execute("DELETE FROM env_cache WHERE id = ?", (entry_id,))

    # ----------------------------------------------------------------- events (relay)
    def list_events(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[JobEvent]:
        """A job's events with seq > after_seq, in order."""
        rows = self._db.query(
            f"SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = ? AND seq > ? "
            "ORDER BY seq LIMIT ?", (job_id, after_seq, max(limit, 0)))
        return [event_from_row(row) for row in rows]

    def last_event_seq(self, job_id: str) -> int:
        """The seq of the job's latest event (0 if none)."""
        rows = self._db.query("SELECT max(seq) FROM job_events WHERE job_id = ?", (job_id,))
        return int(rows[0][0] or 0)

    def poll_events(self, cursor: int | None) -> tuple[list[JobEvent], int]:
        """Events with a global id above cursor, in commit order, and the new cursor."""
        if cursor is None:
            rows = self._db.query("SELECT max(id) FROM job_events")
            return [], int(rows[0][0] or 0)
        rows = self._db.query(
            f"SELECT id, {EVENT_COLUMNS} FROM job_events WHERE id > ? ORDER BY id LIMIT ?",
            (cursor, POLL_BATCH))
        if not rows:
            return [], cursor
        return [event_from_row(row) for row in rows], int(rows[-1]["id"])


def _user_jobs(user_id: str, status: JobStatus | None) -> tuple[str, tuple[str, ...]]:
    """The WHERE clause of a user's jobs: two spelled-out forms, so the planner picks the
    index each needs (a `? IS NULL OR status = ?` read every job of the user)."""
    if status is None:
        return "user_id = ?", (user_id,)
    return "user_id = ? AND status = ?", (user_id, status.value)


# --------------------------------------------------------------------- helpers (inside a txn)
def _load_env(conn: sqlite3.Connection, entry_id: str) -> EnvEntry:
    rows = conn.execute(f"SELECT {ENV_COLUMNS} FROM env_cache WHERE id = ?",
                        (entry_id,)).fetchall()
    return env_from_row(rows[0])


def _load_job(conn: sqlite3.Connection, job_id: str, user_id: str | None = None) -> Job:
    row = conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None or (user_id is not None and row["user_id"] != user_id):
        raise NotFound(f"job {job_id} not found")
    return job_from_row(row)


def _check_lease(conn: sqlite3.Connection, fence: Fence) -> None:
    """Raise LeaseLost unless the lease on fence.controller_id still carries fence.token.

    Called inside the write transaction (BEGIN IMMEDIATE holds the write lock), so the check
    and the write it guards are one atomic step: no take-over can come between them.
    """
    row = conn.execute("SELECT 1 FROM controllers WHERE id = ? AND token = ?",
                       (fence.controller_id, fence.token)).fetchone()
    if row is None:
        raise lease_lost(fence)


def _load_fenced_job(conn: sqlite3.Connection, job_id: str, fence: Fence) -> Job:
    """The job, if it is fence.controller_id's and that lease still carries fence.token."""
    job = _load_job(conn, job_id)
    if job.controller_id != fence.controller_id:
        raise lease_lost(fence)
    _check_lease(conn, fence)
    return job


def _reserve_seqs(conn: sqlite3.Connection, job_id: str, count: int) -> int:
    """Take `count` consecutive seqs from the job's counter; returns the first."""
    row = conn.execute("UPDATE jobs SET next_seq = next_seq + ? WHERE id = ? "
                       "RETURNING next_seq - ?", (count, job_id, count)).fetchone()
    return int(row[0])


def _append_event(conn: sqlite3.Connection, job_id: str, kind: EventKind, text: str,
                  stream: OutputStream | None = None) -> None:
    seq = _reserve_seqs(conn, job_id, 1)
    conn.execute("INSERT INTO job_events (job_id, seq, kind, stream, text, created_at) "
                  "VALUES (?, ?, ?, ?, ?, ?)",
                  (job_id, seq, kind.value, None if stream is None else stream.value, text,
                   to_text(utcnow())))


def _finish(conn: sqlite3.Connection, job_id: str, outcome: JobOutcome, end_time: datetime) -> None:
    conn.execute(
        "UPDATE jobs SET status = ?, exit_code = ?, success = ?, reason = ?, end_time = ?, "
        "report = ? WHERE id = ?",
        (outcome.status.value, outcome.exit_code, int(outcome.success), outcome.reason,
         to_text(end_time), report_to_text(outcome.report), job_id))
    if outcome.junit_xml is not None:
        conn.execute("INSERT OR REPLACE INTO job_junit (job_id, xml) VALUES (?, ?)",
                     (job_id, outcome.junit_xml))
    _append_event(conn, job_id, EventKind.END, end_event_text(outcome))


def _oldest_outputs(conn: sqlite3.Connection, job_id: str, after_seq: int
                    ) -> Iterator[tuple[int, int]]:
    """(seq, UTF-8 bytes) of the job's OUTPUT events after after_seq, oldest first, lazily."""
    while True:
        rows = conn.execute(
            "SELECT seq, length(CAST(text AS BLOB)) FROM job_events "
            "WHERE job_id = ? AND seq > ? AND kind = 'output' ORDER BY seq LIMIT ?",
            (job_id, after_seq, _CAP_BATCH)).fetchall()
        for row in rows:
            yield int(row[0]), int(row[1])
        if len(rows) < _CAP_BATCH:
            return
        after_seq = int(rows[-1][0])


def _apply_cap(conn: sqlite3.Connection, job_id: str, keep_bytes: int) -> None:
    """Drop the oldest OUTPUT events until the job's output fits; keep one marker event."""
    job = conn.execute("SELECT output_bytes, dropped_bytes, marker_seq FROM jobs WHERE id = ?",
                       (job_id,)).fetchone()
    marker_seq = job["marker_seq"]
    # The marker is always the oldest OUTPUT event left, so everything after it is droppable.
    plan = plan_drop(job["output_bytes"], _oldest_outputs(conn, job_id, marker_seq or 0),
                     keep_bytes)
    if not plan.keys:
        return
    if marker_seq is None:
        # The first dropped event becomes the marker in place: same seq, same global id.
        marker_seq = plan.keys[0]
    dropped = job["dropped_bytes"] + plan.bytes
    conn.execute("DELETE FROM job_events WHERE job_id = ? AND kind = 'output' "
                 "AND seq > ? AND seq <= ?", (job_id, marker_seq, plan.keys[-1]))
    conn.execute("UPDATE job_events SET text = ?, stream = 'stdout' WHERE job_id = ? AND seq = ?",
                 (marker_text(dropped, keep_bytes), job_id, marker_seq))
    conn.execute("UPDATE jobs SET output_bytes = output_bytes - ?, dropped_bytes = ?, "
                 "marker_seq = ? WHERE id = ?", (plan.bytes, dropped, marker_seq, job_id))
