"""PostgresRepository: the Repository contract on a PostgreSQL database shared by many hosts.

Every method is one transaction (READ COMMITTED). Where SQLite serialises writers, PostgreSQL
runs them side by side, so three things are done by hand:

- Locks, always taken in one order: the claim lock (claims only), a job's advisory lock, the
  job's row, then controller rows (in id order). Fenced writes hold the lease row FOR KEY
  SHARE until they commit; whatever replaces a token (acquire_lease, take_over) takes it FOR
  UPDATE first, so no write checked against an old token commits after the token changed.
  Heartbeats (a plain UPDATE) conflict with neither.
- Event order: poll_events reads in (writing transaction id, id) order, only the rows of
  transactions older than every one still running (see job_events in the migration). That
  order keeps each job's seqs increasing only because a transaction that writes a job's
  events takes the job's advisory lock before its first write, which is when PostgreSQL gives
  it its transaction id: a later writer of the job then always has a larger one.
- Claiming: claims take turns on one transaction-scoped advisory lock before they choose, so
  each counts the busy users with every earlier claim committed: the fairness between users
  that SQLite's serialised writers give (without it, a claim that skipped another's locked
  choice would count from before that claim and hand one user's burst most slots). A claim
  is a few milliseconds, so controllers barely wait; the chosen row is still locked FOR NO KEY
  UPDATE SKIP LOCKED, passing over rows other writers (a cancel, a take-over) hold.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime

import psycopg
from psycopg.rows import DictRow

from ci_common.dburl import check_postgres_url
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
from ci_persistence.logcap import marker_text, plan_drop, utf8_len
from ci_persistence.pg_connection import DEFAULT_POOL_SIZE, Cursor, PostgresConnector
from ci_persistence.pg_migrate import migrate
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
from ci_persistence.timefmt import as_utc, from_text

_ACTIVE = "('queued', 'running')"  # claimed-or-running jobs are in one of these states
_CAP_BATCH = 500  # oldest OUTPUT events read per step while planning a log-cap drop
# Advisory lock spaces (the two-key form): "ci_j" for jobs, "ci_c" for controller ids.
_JOB_LOCKS = 0x63695F6A
_CONTROLLER_LOCKS = 0x63695F63
_CLAIM_LOCK = (0x63695F71, 0)  # ("ci_q", 0): the one lock claims take turns on
_TAKE_OVER_ATTEMPTS = 5
_XID_SHIFT = 64  # a poll cursor is (xid << 64) | id: one int, ordered as (xid, id)

# Fairness as in SQLite: the user with the fewest claimed-but-unfinished jobs first, then the
# oldest job. A row another claimer holds is skipped, and one it claimed meanwhile fails the
# recheck PostgreSQL does after locking, so the next in line is taken instead.
_CLAIM_SQL = f"""
WITH busy AS (
    SELECT user_id, count(*) AS n FROM jobs
    WHERE controller_id IS NOT NULL AND status IN {_ACTIVE}
    GROUP BY user_id
)
SELECT w.id FROM jobs w LEFT JOIN busy ON busy.user_id = w.user_id
JOIN users u ON u.id = w.user_id
WHERE w.status = 'queued' AND w.controller_id IS NULL AND NOT w.cancel_requested
ORDER BY coalesce(busy.n, 0), u.claim_turn, w.created_at, w.id
LIMIT 1
FOR NO KEY UPDATE OF w SKIP LOCKED
"""

# What the claim order depends on (see policy.jobs_ahead), for queue positions: the waiting
# jobs (id set), then each busy user's count (id NULL), as _CLAIM_SQL reads them.
_QUEUE_SQL = f"""
SELECT j.id, j.user_id, j.created_at, u.claim_turn AS n FROM jobs j JOIN users u ON u.id = j.user_id
WHERE j.status = 'queued' AND j.controller_id IS NULL AND NOT j.cancel_requested
UNION ALL
SELECT NULL, user_id, NULL, count(*) FROM jobs
WHERE controller_id IS NOT NULL AND status IN {_ACTIVE}
GROUP BY user_id
"""

# ORDER BY names the table's column: a bare `xid` would be the text output column, and
# '1000' sorts before '999', so a page spanning a new digit in the transaction id came out of
# order (the relay then dropped the "older" seqs as already sent; seen with paced polling).
_POLL_SQL = f"""
SELECT id, xid::text AS xid, {EVENT_COLUMNS},
       xid < pg_snapshot_xmin(pg_current_snapshot()) AS final
FROM job_events WHERE (xid, id) > (%s::xid8, %s)
ORDER BY job_events.xid, job_events.id LIMIT %s
"""


class _JobsMoved(Exception):
    """take_over found jobs it had not locked: roll back and start again."""


class PostgresRepository:
    """The Repository Protocol on PostgreSQL, safe across threads, processes and hosts."""

    def __init__(self, url: str, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        self._db = PostgresConnector(check_postgres_url(url), pool_size)
        setup = self._db.connect()  # unreachable: DatabaseUnavailable now, not in 30 s
        try:
            with self._db.errors():
                self.schema_version = migrate(setup)
        finally:
            setup.close()
        self._db.open_pool()
        self._installation_id: str | None = None

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Release connections. Safe to call twice."""
        self._db.close()

    def change_token(self) -> int:
        """Differs after any commit by anyone (LISTEN/NOTIFY plus this process's commits)."""
        return self._db.change_token()

    def wait_for_change(self, seen: int | None, timeout_s: float) -> int:
        """Sleep until a NOTIFY arrives on the LISTEN socket or this process commits."""
        return self._db.wait_for_change(seen, timeout_s)

    def interrupt_waits(self) -> None:
        """Wake every wait_for_change of this process now."""
        self._db.interrupt_waits()

    def installation_id(self) -> str:
        """The id the first migration stored; read once, it never changes."""
        if self._installation_id is None:
            self._installation_id = str(self._db.query("SELECT id FROM installation")[0]["id"])
        return self._installation_id

    # ----------------------------------------------------------------- users
    def create_user(self, name: str, email: str) -> User:
        """Create an active user. Raises AlreadyExists when the email is taken."""
        user = User(id=str(uuid.uuid4()), name=name, email=email, is_active=True,
                    created_at=utcnow())

        def work(cur: Cursor) -> None:
            try:
                cur.execute(f"INSERT INTO users ({USER_COLUMNS}) VALUES (%s, %s, %s, TRUE, %s)",
                            (user.id, name, email, user.created_at))
            except psycopg.errors.UniqueViolation:
                raise AlreadyExists(f"a user with email {email} already exists") from None

        self._db.write(work)
        return user

    def get_user(self, user_id: str) -> User:
        """Raises NotFound."""
        rows = self._db.query(f"SELECT {USER_COLUMNS} FROM users WHERE id = %s", (user_id,))
        if not rows:
            raise NotFound(f"user {user_id} not found")
        return user_from_row(rows[0])

    def get_user_by_email(self, email: str) -> User:
        """Case-insensitive for ASCII letters, like SQLite's NOCASE. Raises NotFound."""
        rows = self._db.query(f"SELECT {USER_COLUMNS} FROM users "
                              "WHERE ci_fold(email) = ci_fold(%s)", (email,))
        if not rows:
            raise NotFound(f"no user with email {email}")
        return user_from_row(rows[0])

    def list_users(self) -> list[User]:
        """All users, oldest first."""
        rows = self._db.query(f"SELECT {USER_COLUMNS} FROM users ORDER BY created_at, n")
        return [user_from_row(row) for row in rows]

    def set_user_active(self, user_id: str, active: bool) -> User:
        """Activate or deactivate. Raises NotFound."""
        rows = self._db.write(lambda cur: cur.execute(
            f"UPDATE users SET is_active = %s WHERE id = %s RETURNING {USER_COLUMNS}",
            (active, user_id)).fetchall())
        if not rows:
            raise NotFound(f"user {user_id} not found")
        return user_from_row(rows[0])

    # ----------------------------------------------------------------- API keys
    def create_api_key(self, user_id: str, name: str, key_hash: str, prefix: str) -> ApiKey:
        """Store a new key's hash and prefix. Raises NotFound (user)."""
        key_id, now = str(uuid.uuid4()), utcnow()

        def work(cur: Cursor) -> ApiKey:
            if cur.execute("SELECT 1 FROM users WHERE id = %s", (user_id,)).fetchone() is None:
                raise NotFound(f"user {user_id} not found")
            try:
                cur.execute("INSERT INTO api_keys (id, user_id, name, key_hash, prefix, "
                            "is_active, created_at) VALUES (%s, %s, %s, %s, %s, TRUE, %s)",
                            (key_id, user_id, name, key_hash, prefix, now))
            except psycopg.errors.UniqueViolation:
                raise AlreadyExists("an API key with that hash already exists") from None
            return key_from_row(_one(cur, f"{KEY_SELECT} WHERE k.id = %s", (key_id,)))

        return self._db.write(work)

    def list_api_keys(self, user_id: str | None = None) -> list[ApiKey]:
        """Keys of one user, or of everyone when user_id is None; oldest first."""
        if user_id is None:
            rows = self._db.query(f"{KEY_SELECT} ORDER BY k.created_at, k.n")
        else:
            rows = self._db.query(f"{KEY_SELECT} WHERE k.user_id = %s "
                                  "ORDER BY k.created_at, k.n", (user_id,))
        return [key_from_row(row) for row in rows]

    def revoke_api_key(self, key_id: str) -> ApiKey:
        """Deactivate a key. Raises NotFound."""

        def work(cur: Cursor) -> ApiKey:
            cur.execute("UPDATE api_keys SET is_active = FALSE WHERE id = %s", (key_id,))
            row = cur.execute(f"{KEY_SELECT} WHERE k.id = %s", (key_id,)).fetchone()
            if row is None:
                raise NotFound(f"API key {key_id} not found")
            return key_from_row(row)

        return self._db.write(work)

    def find_keys_by_prefix(self, prefix: str) -> list[StoredKey]:
        """Candidate keys for authentication (active or not), with their owner."""
        rows = self._db.query(f"{KEY_SELECT} WHERE k.prefix = %s ORDER BY k.created_at, k.n",
                              (prefix,))
        return [StoredKey(key=key_from_row(row), key_hash=row["key_hash"],
                          user=key_owner_from_row(row)) for row in rows]

    def touch_api_key(self, key_id: str, when: datetime) -> None:
        """Record a successful use (last_used_at). Unknown ids are ignored."""
        self._db.write(lambda cur: cur.execute(
            "UPDATE api_keys SET last_used_at = %s WHERE id = %s", (as_utc(when), key_id)))

    # ----------------------------------------------------------------- jobs (server side)
    def create_job(self, user_id: str, archive: bytes, timeout_seconds: float | None, *,
                   pytest_args: Sequence[str] = (), python_version: str | None = None,
                   no_cache: bool = False) -> Job:
        """Store the archive and a queued job with its first STATUS event, atomically."""
        job_id = str(uuid.uuid4())

        def work(cur: Cursor) -> Job:
            # No job lock: nobody else can write for a job before this transaction commits.
            if cur.execute("SELECT 1 FROM users WHERE id = %s", (user_id,)).fetchone() is None:
                raise NotFound(f"user {user_id} not found")
            cur.execute("INSERT INTO jobs (id, user_id, status, created_at, timeout_seconds, "
                        "archive_size, pytest_args, python_version, no_cache) "
                        "VALUES (%s, %s, 'queued', %s, %s, %s, %s, %s, %s)",
                        (job_id, user_id, utcnow(), timeout_seconds, len(archive),
                         pytest_args_to_json(pytest_args), python_version, no_cache))
            cur.execute("INSERT INTO job_archives (job_id, data) VALUES (%s, %s)",
                        (job_id, bytes(archive)))
            _append_event(cur, job_id, EventKind.STATUS, JobStatus.QUEUED.value)
            return _load_job(cur, job_id)

        return self._db.write(work)

    def get_job(self, job_id: str, user_id: str | None = None) -> Job:
        """One job; with user_id, another user's job raises NotFound like a missing one."""
        rows = self._db.query(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = %s", (job_id,))
        if not rows or (user_id is not None and rows[0]["user_id"] != user_id):
            raise NotFound(f"job {job_id} not found")
        return job_from_row(rows[0])

    def list_jobs(self, user_id: str, limit: int = 50, offset: int = 0,
                  status: JobStatus | None = None) -> list[Job]:
        """The user's jobs (in `status`, if given), newest first (created_at, then id)."""
        where, params = _user_jobs(user_id, status)
        rows = self._db.query(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE {where} "
            "ORDER BY created_at DESC, id DESC LIMIT %s OFFSET %s",
            (*params, max(limit, 0), max(offset, 0)))
        return [job_from_row(row) for row in rows]

    def count_jobs(self, user_id: str, status: JobStatus | None = None) -> int:
        """How many jobs the user has (in `status`, if given)."""
        where, params = _user_jobs(user_id, status)
        return int(self._db.query(f"SELECT count(*) AS n FROM jobs WHERE {where}",
                                  params)[0]["n"])

    def request_cancel(self, job_id: str, user_id: str) -> Job:
        """Cancel a queued unclaimed job at once; flag a claimed or running one; atomic."""

        def work(cur: Cursor) -> Job:
            _lock_jobs(cur, [job_id])
            job = _load_job(cur, job_id, user_id, lock=True)
            if job.status.is_terminal:
                return job
            cur.execute("UPDATE jobs SET cancel_requested = TRUE WHERE id = %s", (job_id,))
            if job.status is JobStatus.QUEUED and job.controller_id is None:
                _finish(cur, job_id, cancelled_outcome(), utcnow())
            return _load_job(cur, job_id)

        return self._db.write(work)

    def get_archive(self, job_id: str) -> bytes:
        """The uploaded zip. Raises NotFound."""
        rows = self._db.query("SELECT data FROM job_archives WHERE job_id = %s", (job_id,))
        if not rows:
            raise NotFound(f"archive of job {job_id} not found")
        return bytes(rows[0]["data"])

    def get_junit(self, job_id: str) -> str:
        """pytest's JUnit XML of the job. Raises NotFound when there is none."""
        rows = self._db.query("SELECT xml FROM job_junit WHERE job_id = %s", (job_id,))
        if not rows:
            raise NotFound(f"no JUnit report stored for job {job_id}")
        return str(rows[0]["xml"])

    def queue_snapshot(self) -> QueueSnapshot:
        """The waiting jobs and each user's busy count, in one statement's snapshot."""
        rows = self._db.query(_QUEUE_SQL)
        return QueueSnapshot(
            waiting=tuple(WaitingJob(row["id"], row["user_id"], from_text(row["created_at"]),
                                     int(row["n"]))
                          for row in rows if row["id"] is not None),
            busy={row["user_id"]: int(row["n"]) for row in rows if row["id"] is None})

    def prune_jobs(self, finished_before: datetime, *, dry_run: bool = False,
                   limit: int = 500) -> PruneResult:
        """Remove the output and archives of finished jobs that ended before the cutoff."""
        where = "pruned_at IS NULL AND end_time IS NOT NULL AND end_time < %s"
        cutoff = as_utc(finished_before)
        if dry_run:
            row = self._db.query("SELECT count(*) AS n, coalesce(sum(output_bytes + "
                                 f"archive_size), 0) AS freed FROM jobs WHERE {where}",
                                 (cutoff,))[0]
            return PruneResult(jobs=int(row["n"]), freed_bytes=int(row["freed"]))

        def work(cur: Cursor) -> PruneResult:
            # SKIP LOCKED: two controllers pruning at once take different jobs.
            rows = cur.execute(
                f"SELECT id, output_bytes + archive_size AS freed FROM jobs WHERE {where} "
                "ORDER BY end_time LIMIT %s FOR UPDATE SKIP LOCKED",
                (cutoff, max(limit, 0))).fetchall()
            ids = [row["id"] for row in rows]
            if not ids:
                return PruneResult(jobs=0, freed_bytes=0)
            cur.execute("DELETE FROM job_events WHERE kind = 'output' AND job_id = ANY(%s)",
                        (ids,))
            cur.execute("DELETE FROM job_archives WHERE job_id = ANY(%s)", (ids,))
            cur.execute("DELETE FROM job_junit WHERE job_id = ANY(%s)", (ids,))
            cur.execute("UPDATE jobs SET pruned_at = %s, output_bytes = 0, marker_seq = NULL "
                        "WHERE id = ANY(%s)", (utcnow(), ids))
            return PruneResult(jobs=len(ids), freed_bytes=sum(int(row["freed"]) for row in rows))

        return self._db.write(work)

    # ----------------------------------------------------------------- jobs (controller side)
    def claim_next_job(self, fence: Fence) -> Job | None:
        """Atomically claim the fairest waiting job; None when nothing is waiting."""

        def work(cur: Cursor) -> Job | None:
            # First, before any row lock (the lock order above): READ COMMITTED gives the
            # next statement a snapshot taken after the previous claim committed.
            cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", _CLAIM_LOCK)
            chosen = cur.execute(_CLAIM_SQL).fetchone()
            claimed = None
            if chosen is not None:
                claimed = job_from_row(_one(
                    cur, f"UPDATE jobs SET controller_id = %s WHERE id = %s "
                         f"RETURNING {JOB_COLUMNS}", (fence.controller_id, chosen["id"])))
                # The newest turn for its user (policy.claim_key); safe under the claim lock.
                cur.execute("UPDATE users SET claim_turn = (SELECT max(claim_turn) FROM users) "
                            "+ 1 WHERE id = %s", (claimed.user_id,))
            _check_lease(cur, fence)  # after the job row: jobs before controllers, always
            return claimed

        return self._db.write(work)

    def mark_start_attempt(self, job_id: str, now: datetime, *, fence: Fence) -> Job:
        """Note that the claimed job's container is about to be made (see the Protocol)."""

        def work(cur: Cursor) -> Job:
            job = _lock_fenced_job(cur, job_id, fence)
            if job.status is not JobStatus.QUEUED:
                return job
            cur.execute("UPDATE jobs SET start_attempted_at = %s WHERE id = %s",
                        (as_utc(now), job_id))
            return _load_job(cur, job_id)

        return self._db.write(work)

    def mark_running(self, job_id: str, container_id: str, start_time: datetime, *,
                     fence: Fence) -> Job:
        """Status RUNNING with its STATUS event; again for a running job only sets container_id.

        A job that became terminal meanwhile is returned unchanged.
        """

        def work(cur: Cursor) -> Job:
            job = _lock_fenced_job(cur, job_id, fence)
            if job.status.is_terminal:
                return job
            if job.status is JobStatus.RUNNING:
                cur.execute("UPDATE jobs SET container_id = %s WHERE id = %s",
                            (container_id, job_id))
            else:
                cur.execute("UPDATE jobs SET status = 'running', container_id = %s, "
                            "start_time = %s WHERE id = %s",
                            (container_id, as_utc(start_time), job_id))
                _append_event(cur, job_id, EventKind.STATUS, JobStatus.RUNNING.value)
            return _load_job(cur, job_id)

        return self._db.write(work)

    def release_job(self, job_id: str, *, fence: Fence) -> Job:
        """Unclaim a job that never started; one whose cancel was asked is cancelled instead."""

        def work(cur: Cursor) -> Job:
            job = _lock_fenced_job(cur, job_id, fence)
            if job.status is not JobStatus.QUEUED or job.controller_id is None:
                return job
            cur.execute("UPDATE jobs SET controller_id = NULL, start_attempted_at = NULL "
                        "WHERE id = %s", (job_id,))
            if job.cancel_requested:
                _finish(cur, job_id, cancelled_outcome(), utcnow())
            return _load_job(cur, job_id)

        return self._db.write(work)

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
        texts = [chunk for chunk in chunks if chunk.text]

        def work(cur: Cursor) -> list[JobEvent]:
            job = _lock_fenced_job(cur, job_id, fence)
            if job.status.is_terminal:
                return []
            first_seq = _reserve_seqs(cur, job_id, len(texts))
            cur.execute(
                "INSERT INTO job_events (job_id, seq, kind, stream, text, created_at) "
                "SELECT %s, %s + n - 1, 'output', stream, text, %s "
                "FROM unnest(%s::text[], %s::bytea[]) WITH ORDINALITY AS c (stream, text, n)",
                (job_id, first_seq, utcnow(), [chunk.stream.value for chunk in texts],
                 [chunk.text.encode("utf-8") for chunk in texts]))
            added = sum(utf8_len(chunk.text) for chunk in texts)
            cur.execute("UPDATE jobs SET log_cursor = %s, output_bytes = output_bytes + %s, "
                        "dropped_bytes = dropped_bytes + %s WHERE id = %s",
                        (log_cursor, added, max(skipped_bytes, 0), job_id))
            if keep_bytes is not None and job.output_bytes + added > keep_bytes:
                _apply_cap(cur, job_id, keep_bytes)
            if not texts:
                return []
            rows = cur.execute(f"SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = %s "
                               "AND seq >= %s ORDER BY seq", (job_id, first_seq)).fetchall()
            return [event_from_row(row) for row in rows]

        return self._db.write(work)

    def finish_job(self, job_id: str, outcome: JobOutcome, end_time: datetime, *,
                   fence: Fence) -> Job:
        """Record the outcome and append the END event, atomically and once."""
        check_terminal(outcome)

        def work(cur: Cursor) -> Job:
            job = _lock_fenced_job(cur, job_id, fence)
            if job.status.is_terminal:
                return job
            _finish(cur, job_id, outcome, end_time)
            return _load_job(cur, job_id)

        return self._db.write(work)

    def list_controller_jobs(self, controller_id: str) -> list[Job]:
        """Claimed or running, not yet terminal jobs owned by this controller."""
        rows = self._db.query(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE controller_id = %s AND status IN {_ACTIVE} "
            "ORDER BY created_at, id", (controller_id,))
        return [job_from_row(row) for row in rows]

    def count_queued_jobs(self) -> int:
        """Queued jobs that no controller has claimed yet."""
        return int(self._db.query("SELECT count(*) AS n FROM jobs WHERE status = 'queued' "
                                  "AND controller_id IS NULL")[0]["n"])

    def count_jobs_by_status(self) -> dict[JobStatus, int]:
        """Every user's jobs counted by status (0 when none)."""
        counts = dict.fromkeys(JobStatus, 0)
        for row in self._db.query("SELECT status, count(*) AS n FROM jobs GROUP BY status"):
            counts[JobStatus(row["status"])] = int(row["n"])
        return counts

    # ----------------------------------------------------------------- controller leases
    def acquire_lease(self, controller_id: str, host: str, pid: int, version: str,
                      now: datetime, lease_s: float,
                      replace_token: str | None = None) -> ControllerLease:
        """Take the lease with a new token unless a live controller holds it; atomic."""

        def work(cur: Cursor) -> ControllerLease:
            # The advisory lock also covers an id with no row yet (two first starts at once);
            # the row lock waits for fenced writes still checking the old token.
            cur.execute("SELECT pg_advisory_xact_lock(%s, %s)",
                        (_CONTROLLER_LOCKS, _lock_key(controller_id)))
            cur.execute("SELECT 1 FROM controllers WHERE id = %s FOR UPDATE", (controller_id,))
            row = cur.execute(f"{LEASE_SELECT} WHERE c.id = %s", (controller_id,)).fetchone()
            check_lease_free(None if row is None else lease_from_row(row), now, replace_token)
            cur.execute(
                "INSERT INTO controllers (id, host, pid, version, token, started_at, "
                "heartbeat_at, stopped, lease_s) VALUES (%s, %s, %s, %s, %s, %s, %s, FALSE, %s) "
                "ON CONFLICT (id) DO "
                "UPDATE SET host = excluded.host, pid = excluded.pid, version = excluded.version, "
                "token = excluded.token, started_at = excluded.started_at, "
                "heartbeat_at = excluded.heartbeat_at, stopped = FALSE, "
                "lease_s = excluded.lease_s",
                (controller_id, host, pid, version, uuid.uuid4().hex, as_utc(now), as_utc(now),
                 lease_s))
            return lease_from_row(_one(cur, f"{LEASE_SELECT} WHERE c.id = %s", (controller_id,)))

        return self._db.write(work)

    def renew_lease(self, controller_id: str, token: str, now: datetime) -> bool:
        """Heartbeat; False when the lease is no longer held with this token."""
        rows = self._db.write(lambda cur: cur.execute(
            "UPDATE controllers SET heartbeat_at = %s WHERE id = %s AND token = %s "
            "AND NOT stopped RETURNING id", (as_utc(now), controller_id, token)).fetchall())
        return bool(rows)

    def release_lease(self, controller_id: str, token: str, now: datetime) -> None:
        """Mark the lease stopped (graceful stop)."""
        self._db.write(lambda cur: cur.execute(
            "UPDATE controllers SET stopped = TRUE, heartbeat_at = %s WHERE id = %s "
            "AND token = %s", (as_utc(now), controller_id, token)))

    def record_engine(self, fence: Fence, engine_id: str) -> None:
        """Note the engine this holder runs containers on; LeaseLost if no longer held."""

        def work(cur: Cursor) -> None:
            row = cur.execute("UPDATE controllers SET engine_id = %s WHERE id = %s AND "
                              "token = %s RETURNING id",
                              (engine_id, fence.controller_id, fence.token)).fetchone()
            if row is None:
                raise lease_lost(fence)

        self._db.write(work)

    def take_over(self, gone: ControllerLease, taker: Fence, adopt: bool,
                  now: datetime) -> TakeOver | None:
        """Take an expired controller's jobs, if it is still as the taker saw it; atomic."""
        for _ in range(_TAKE_OVER_ATTEMPTS):
            try:
                return self._db.write(lambda cur: _take_over(cur, gone, taker, adopt, now))
            except _JobsMoved:
                continue  # it claimed a job meanwhile: lock the new set and look again
        return None  # it keeps claiming: not gone after all, as far as this call can tell

    def get_lease(self, controller_id: str) -> ControllerLease | None:
        """The lease row of one controller id, or None."""
        rows = self._db.query(f"{LEASE_SELECT} WHERE c.id = %s", (controller_id,))
        return lease_from_row(rows[0]) if rows else None

    def list_leases(self) -> list[ControllerLease]:
        """Every registered controller id, by id."""
        return [lease_from_row(row) for row in self._db.query(f"{LEASE_SELECT} ORDER BY c.id")]

    # ----------------------------------------------------------------- environment cache
    def begin_env(self, key: EnvKey, volume: str, job_id: str, now: datetime) -> EnvEntry:
        """Record a build about to start: state building."""
        entry_id = str(uuid.uuid4())

        def work(cur: Cursor) -> EnvEntry:
            try:
                row = cur.execute(
                    "INSERT INTO env_cache (id, user_id, engine_id, image_id, "
                    "requirements_sha256, volume, state, job_id, created_at) "
                    f"VALUES (%s, %s, %s, %s, %s, %s, 'building', %s, %s) RETURNING {ENV_COLUMNS}",
                    (entry_id, key.user_id, key.engine_id, key.image_id,
                     key.requirements_sha256, volume, job_id, as_utc(now))).fetchone()
            except psycopg.errors.UniqueViolation:
                raise AlreadyExists(f"volume {volume} is already recorded") from None
            assert row is not None
            return env_from_row(row)

        return self._db.write(work)

    def find_env(self, key: EnvKey) -> EnvEntry | None:
        """The newest ready entry of this key."""
        rows = self._db.query(
            f"SELECT {ENV_COLUMNS} FROM env_cache WHERE user_id = %s AND engine_id = %s "
            "AND image_id = %s AND requirements_sha256 = %s AND state = 'ready' "
            "ORDER BY built_at DESC, id DESC LIMIT 1",
            (key.user_id, key.engine_id, key.image_id, key.requirements_sha256))
        return env_from_row(rows[0]) if rows else None

    def env_built(self, entry_id: str, python_version: str, size_bytes: int,
                  now: datetime) -> EnvEntry | None:
        """building → ready, retiring the other ready entries of its key; atomic."""

        def work(cur: Cursor) -> EnvEntry | None:
            # The row lock orders this against a prune or a second build of the same key.
            row = cur.execute(f"SELECT {ENV_COLUMNS} FROM env_cache WHERE id = %s FOR UPDATE",
                              (entry_id,)).fetchone()
            if row is None or row["state"] != "building":
                return None
            key = env_from_row(row).key
            cur.execute(
                "UPDATE env_cache SET state = 'removing' WHERE user_id = %s AND engine_id = %s "
                "AND image_id = %s AND requirements_sha256 = %s AND state = 'ready'",
                (key.user_id, key.engine_id, key.image_id, key.requirements_sha256))
            done = cur.execute(
                "UPDATE env_cache SET state = 'ready', python_version = %s, size_bytes = %s, "
                f"built_at = %s, last_used_at = %s WHERE id = %s RETURNING {ENV_COLUMNS}",
                (python_version, size_bytes, as_utc(now), as_utc(now), entry_id)).fetchone()
            return None if done is None else env_from_row(done)

        return self._db.write(work)

    def touch_env(self, entry_id: str, now: datetime) -> None:
        """last_used_at = now."""
        self._db.write(lambda cur: cur.execute(
            "UPDATE env_cache SET last_used_at = %s WHERE id = %s", (as_utc(now), entry_id)))

    def retire_envs(self, entry_ids: Sequence[str]) -> None:
        """Mark entries removing."""
        self._db.write(lambda cur: cur.execute(
            "UPDATE env_cache SET state = 'removing' WHERE id = ANY(%s)", (list(entry_ids),)))

    def prune_envs(self, user_id: str | None = None) -> list[EnvEntry]:
        """Mark every (or one user's) entry removing; returns those it marked."""
        rows = self._db.write(lambda cur: cur.execute(
            "UPDATE env_cache SET state = 'removing' WHERE state != 'removing' "
            f"AND (%s::text IS NULL OR user_id = %s) RETURNING {ENV_COLUMNS}",
            (user_id, user_id)).fetchall())
        return sorted((env_from_row(row) for row in rows), key=env_lru_order)

    def list_envs(self, engine_id: str | None = None) -> list[EnvEntry]:
        """Every (or one engine's) entry, least recently used first."""
        rows = self._db.query(
            f"SELECT {ENV_COLUMNS} FROM env_cache WHERE (%s::text IS NULL OR engine_id = %s)",
            (engine_id, engine_id))
        return sorted((env_from_row(row) for row in rows), key=env_lru_order)

    def delete_env(self, entry_id: str) -> None:
        """Forget an entry."""
        self._db.write(lambda cur: cur.execute("DELETE FROM env_cache WHERE id = %s",
                                               (entry_id,)))

    # ----------------------------------------------------------------- events (relay)
    def list_events(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[JobEvent]:
        """A job's events with seq > after_seq, in order."""
        rows = self._db.query(
            f"SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = %s AND seq > %s "
            "ORDER BY seq LIMIT %s", (job_id, after_seq, max(limit, 0)))
        return [event_from_row(row) for row in rows]

    def last_event_seq(self, job_id: str) -> int:
        """The seq of the job's latest event (0 if none)."""
        rows = self._db.query("SELECT max(seq) AS seq FROM job_events WHERE job_id = %s",
                              (job_id,))
        return int(rows[0]["seq"] or 0)

    def poll_events(self, cursor: int | None) -> tuple[list[JobEvent], int]:
        """Events of transactions that ended, in (transaction, id) order, and the new cursor.

        A row is handed out only once every transaction older than its own has ended: rows
        behind a slow transaction wait for it (see hold_back in pg_connection.py), so a row
        that commits late is never passed over.
        """
        if cursor is None:
            rows = self._db.query("SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS x")
            return [], int(rows[0]["x"]) << _XID_SHIFT
        xid, last_id = cursor >> _XID_SHIFT, cursor & ((1 << _XID_SHIFT) - 1)
        rows = self._db.query(_POLL_SQL, (str(xid), last_id, POLL_BATCH + 1))
        final = [row for row in rows if row["final"]][:POLL_BATCH]
        self._db.hold_back(any(not row["final"] for row in rows))
        if not final:
            return [], cursor
        last = final[-1]
        return ([event_from_row(row) for row in final],
                (int(last["xid"]) << _XID_SHIFT) | int(last["id"]))


def _user_jobs(user_id: str, status: JobStatus | None) -> tuple[str, tuple[str, ...]]:
    """The WHERE clause of a user's jobs, spelled out per case so each gets its own plan."""
    if status is None:
        return "user_id = %s", (user_id,)
    return "user_id = %s AND status = %s", (user_id, status.value)


# --------------------------------------------------------------------- helpers (inside a txn)
def _one(cur: Cursor, sql: str, params: Sequence[object]) -> DictRow:
    row = cur.execute(sql, params).fetchone()
    assert row is not None, sql
    return row


def _lock_key(text: str) -> int:
    """A stable signed 32-bit key for an advisory lock on text (collisions only serialise)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big",
                          signed=True)


def _lock_jobs(cur: Cursor, job_ids: Sequence[str]) -> None:
    """Take the jobs' advisory locks, in key order. Must come before the transaction's first
    write: PostgreSQL gives a transaction its id at its first write, and poll_events orders
    each job's events by that id (see the module docstring).
    """
    for key in sorted({_lock_key(job_id) for job_id in job_ids}):
        cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_JOB_LOCKS, key))


def _load_job(cur: Cursor, job_id: str, user_id: str | None = None, lock: bool = False) -> Job:
    row = cur.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = %s"
                      f"{' FOR NO KEY UPDATE' if lock else ''}", (job_id,)).fetchone()
    if row is None or (user_id is not None and row["user_id"] != user_id):
        raise NotFound(f"job {job_id} not found")
    return job_from_row(row)


def _check_lease(cur: Cursor, fence: Fence) -> None:
    """Raise LeaseLost unless the lease on fence.controller_id still carries fence.token.

    FOR KEY SHARE holds the row until commit: a take-over or a new acquisition, which lock it
    FOR UPDATE before replacing the token, waits for this transaction, so the check holds for
    the write it guards. Heartbeats are not held up: they change no key.
    """
    row = cur.execute("SELECT 1 FROM controllers WHERE id = %s AND token = %s FOR KEY SHARE",
                      (fence.controller_id, fence.token)).fetchone()
    if row is None:
        raise lease_lost(fence)


def _lock_fenced_job(cur: Cursor, job_id: str, fence: Fence) -> Job:
    """Lock the job; it must be fence.controller_id's and that lease must carry fence.token."""
    _lock_jobs(cur, [job_id])
    job = _load_job(cur, job_id, lock=True)
    if job.controller_id != fence.controller_id:
        raise lease_lost(fence)
    _check_lease(cur, fence)
    return job


def _reserve_seqs(cur: Cursor, job_id: str, count: int) -> int:
    """Take `count` consecutive seqs from the job's counter; returns the first."""
    row = _one(cur, "UPDATE jobs SET next_seq = next_seq + %s WHERE id = %s "
                    "RETURNING next_seq - %s AS first", (count, job_id, count))
    return int(row["first"])


def _append_event(cur: Cursor, job_id: str, kind: EventKind, text: str,
                  stream: OutputStream | None = None) -> None:
    seq = _reserve_seqs(cur, job_id, 1)
    cur.execute("INSERT INTO job_events (job_id, seq, kind, stream, text, created_at) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (job_id, seq, kind.value, None if stream is None else stream.value,
                 text.encode("utf-8"), utcnow()))


def _finish(cur: Cursor, job_id: str, outcome: JobOutcome, end_time: datetime) -> None:
    cur.execute(
        "UPDATE jobs SET status = %s, exit_code = %s, success = %s, reason = %s, end_time = %s, "
        "report = %s WHERE id = %s",
        (outcome.status.value, outcome.exit_code, outcome.success, outcome.reason,
         as_utc(end_time), report_to_text(outcome.report), job_id))
    if outcome.junit_xml is not None:
        cur.execute("INSERT INTO job_junit (job_id, xml) VALUES (%s, %s) "
                    "ON CONFLICT (job_id) DO UPDATE SET xml = excluded.xml",
                    (job_id, outcome.junit_xml))
    _append_event(cur, job_id, EventKind.END, end_event_text(outcome))


def _take_over(cur: Cursor, gone: ControllerLease, taker: Fence, adopt: bool,
               now: datetime) -> TakeOver | None:
    """One attempt at take_over; raises _JobsMoved when the gone holder's jobs changed."""
    active = (f"SELECT {JOB_COLUMNS} FROM jobs WHERE controller_id = %s AND status IN {_ACTIVE} "
              "ORDER BY created_at, id")
    locked = {row["id"] for row in cur.execute(active, (gone.id,)).fetchall()}
    _lock_jobs(cur, sorted(locked))
    for controller_id in sorted({gone.id, taker.controller_id}):  # id order: no deadlock
        mode = "FOR UPDATE" if controller_id == gone.id else "FOR KEY SHARE"
        cur.execute(f"SELECT 1 FROM controllers WHERE id = %s {mode}", (controller_id,))
    row = cur.execute(f"{LEASE_SELECT} WHERE c.id = %s", (gone.id,)).fetchone()
    holder = None if row is None else lease_from_row(row)
    if holder is None or not can_take_over(holder, gone.token, now):
        return None
    _check_lease(cur, taker)
    jobs = [job_from_row(r) for r in cur.execute(active, (gone.id,)).fetchall()]
    if any(job.id not in locked for job in jobs):
        raise _JobsMoved
    # A new token nobody knows: every late write of the gone holder is refused.
    cur.execute("UPDATE controllers SET token = %s WHERE id = %s", (uuid.uuid4().hex, gone.id))
    fates = TakeOverFates()
    for job in jobs:
        fate = fates.decide(job, adopt)
        if fate is Fate.ADOPTED:
            cur.execute("UPDATE jobs SET controller_id = %s WHERE id = %s",
                        (taker.controller_id, job.id))
        elif fate is Fate.FAILED:
            _finish(cur, job.id, controller_lost_outcome(holder), now)
        else:
            cur.execute("UPDATE jobs SET controller_id = NULL, start_attempted_at = NULL "
                        "WHERE id = %s", (job.id,))
            if fate is Fate.CANCELLED:
                _finish(cur, job.id, cancelled_outcome(), now)
    return fates.result(gone.id)


def _oldest_outputs(cur: Cursor, job_id: str, after_seq: int) -> Iterator[tuple[int, int]]:
    """(seq, UTF-8 bytes) of the job's OUTPUT events after after_seq, oldest first, lazily."""
    while True:
        rows = cur.execute(
            "SELECT seq, octet_length(text) AS size FROM job_events "
            "WHERE job_id = %s AND seq > %s AND kind = 'output' ORDER BY seq LIMIT %s",
            (job_id, after_seq, _CAP_BATCH)).fetchall()
        for row in rows:
            yield int(row["seq"]), int(row["size"])
        if len(rows) < _CAP_BATCH:
            return
        after_seq = int(rows[-1]["seq"])


def _apply_cap(cur: Cursor, job_id: str, keep_bytes: int) -> None:
    """Drop the oldest OUTPUT events until the job's output fits; keep one marker event."""
    job = _one(cur, "SELECT output_bytes, dropped_bytes, marker_seq FROM jobs WHERE id = %s",
               (job_id,))
    marker_seq = job["marker_seq"]
    # The marker is always the oldest OUTPUT event left, so everything after it is droppable.
    plan = plan_drop(job["output_bytes"], _oldest_outputs(cur, job_id, marker_seq or 0),
                     keep_bytes)
    if not plan.keys:
        return
    if marker_seq is None:
        marker_seq = plan.keys[0]  # the first dropped event becomes the marker, in place
    dropped = job["dropped_bytes"] + plan.bytes
    cur.execute("DELETE FROM job_events WHERE job_id = %s AND kind = 'output' "
                "AND seq > %s AND seq <= %s", (job_id, marker_seq, plan.keys[-1]))
    cur.execute("UPDATE job_events SET text = %s, stream = 'stdout' WHERE job_id = %s "
                "AND seq = %s", (marker_text(dropped, keep_bytes).encode("utf-8"), job_id,
                                 marker_seq))
    cur.execute("UPDATE jobs SET output_bytes = output_bytes - %s, dropped_bytes = %s, "
                "marker_seq = %s WHERE id = %s", (plan.bytes, dropped, marker_seq, job_id))
