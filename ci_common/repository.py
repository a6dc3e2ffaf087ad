"""The repository: the one seam between the services and their database.

Implementations: `ci_persistence.sqlite.SqliteRepository` (the embedded default, shared by
several processes through one file) and `ci_persistence.memory.InMemoryRepository` (unit tests).
A PostgreSQL implementation slots in behind the same Protocol; notes on each method say what it
must guarantee, and `tests/unit/test_repository_contract.py` checks every implementation.

Methods return models from `ci_common.models` and raise errors from `ci_common.errors`.
Every method is one transaction: it either happens completely or not at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from ci_common.models import (
    ApiKey,
    ControllerLease,
    EnvEntry,
    EnvKey,
    Fence,
    Job,
    JobEvent,
    JobOutcome,
    JobStatus,
    OutputChunk,
    PruneResult,
    QueueSnapshot,
    StoredKey,
    TakeOver,
    User,
)

# The largest integer every implementation stores and compares: SQLite's INTEGER and
# PostgreSQL's bigint are signed 64-bit. A page offset or an event seq beyond it is refused at
# the API edge, so no driver ever sees one (SQLite's raises OverflowError).
MAX_STORED_INT = 2**63 - 1


class Repository(Protocol):
    """Users, API keys, jobs, their uploaded archives and their events."""

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Release connections. Safe to call twice."""

    def change_token(self) -> int:
        """A cheap value that differs after any client (this one included) committed a change.

        Read it, then `wait_for_change(token, …)` to sleep until it moves. SQLite: PRAGMA
        data_version read on one dedicated connection that never writes (so tokens from any
        thread are comparable), plus a counter of this process's own commits; PostgreSQL:
        LISTEN/NOTIFY counted on one dedicated connection, plus this process's own commits.
        """

    def wait_for_change(self, seen: int | None, timeout_s: float) -> int:
        """Block until the change token differs from `seen`, or `timeout_s` passed; return it.

        The token returned equals `seen` only when nothing changed in time (or the wait was
        interrupted). `seen=None` returns the current token at once. Waiting costs no query:
        memory waits on a condition; SQLite on a file-change notification of the database and
        its -wal (inotify), commits of this process waking waiters directly; PostgreSQL on
        its LISTEN socket. Implementations may still look by themselves now and then (a safety
        re-check of a second or more) and may wake early; callers loop.
        """

    def interrupt_waits(self) -> None:
        """Make every wait_for_change of this process that is in progress return now.

        Not lost between two waits: a thread not waiting when it came returns at once from
        its next wait (so "set a flag, interrupt" never races with "check the flag, wait").

        For callers that stop, or that have another reason to look (a thread of theirs ended).
        """

    def installation_id(self) -> str:
        """This installation's random id, made with the database and never changed.

        Job containers carry it as a label: a controller touches only containers of its own
        installation, so two installations can share one Docker engine.
        """

    # ----------------------------------------------------------------- users
    def create_user(self, name: str, email: str) -> User:
        """Create an active user. Raises AlreadyExists if the email is taken (case-insensitive)."""

    def get_user(self, user_id: str) -> User:
        """Raises NotFound."""

    def get_user_by_email(self, email: str) -> User:
        """Case-insensitive. Raises NotFound."""

    def list_users(self) -> list[User]:
        """All users, oldest first."""

    def set_user_active(self, user_id: str, active: bool) -> User:
        """Activate or deactivate; takes effect on the next authentication. Raises NotFound."""

    # ----------------------------------------------------------------- API keys
    def create_api_key(self, user_id: str, name: str, key_hash: str, prefix: str) -> ApiKey:
        """Store a new key's hash and display prefix (never the key). Raises NotFound (user)."""

    def list_api_keys(self, user_id: str | None = None) -> list[ApiKey]:
        """Keys of one user, or of everyone when user_id is None; oldest first."""

    def revoke_api_key(self, key_id: str) -> ApiKey:
        """Deactivate a key; refused on the next request. Raises NotFound."""

    def find_keys_by_prefix(self, prefix: str) -> list[StoredKey]:
        """Candidate keys for authentication (active or not), with their owner.

        The caller compares hashes in constant time and decides; see ci_common.keys.
        """

    def touch_api_key(self, key_id: str, when: datetime) -> None:
        """Record a successful use (last_used_at). Unknown ids are ignored."""

    # ----------------------------------------------------------------- jobs (server side)
    def create_job(self, user_id: str, archive: bytes, timeout_seconds: float | None, *,
                   pytest_args: Sequence[str] = (), python_version: str | None = None,
                   no_cache: bool = False) -> Job:
        """Store the archive and a queued job, and append its first STATUS event (seq 1), at once.

        After it returns, any replica and any controller can read the job and its archive.
        pytest_args and python_version are stored as given (the server checked them).
        """

    def get_job(self, job_id: str, user_id: str | None = None) -> Job:
        """One job. With user_id, another user's job raises NotFound exactly like a missing one."""

    def list_jobs(self, user_id: str, limit: int = 50, offset: int = 0,
                  status: JobStatus | None = None) -> list[Job]:
        """The user's jobs (only those in `status`, if given), newest first (created_at, then
        id, descending).

        Any `offset` from 0 to MAX_STORED_INT works; past the last job the page is empty.
        """

    def count_jobs(self, user_id: str, status: JobStatus | None = None) -> int:
        """How many jobs the user has (only those in `status`, if given), for pagination."""

    def request_cancel(self, job_id: str, user_id: str) -> Job:
        """Ask for a job to be cancelled. Atomic with respect to claiming:

        - queued and unclaimed: becomes CANCELLED at once (reason "cancelled by user"), with its
          END event, and will never be claimed;
        - claimed or running: cancel_requested is set; the owning controller stops it;
        - terminal: nothing changes.
        Returns the job as it is afterwards. Raises NotFound (missing or another user's job).
        """

    def get_archive(self, job_id: str) -> bytes:
        """The uploaded zip. Raises NotFound (also once retention removed it)."""

    def get_junit(self, job_id: str) -> str:
        """pytest's JUnit XML, stored by finish_job from the outcome's junit_xml.

        Raises NotFound when the job has none (the tests never ran, the report was over the
        runner's bound, retention removed it, or the job is missing).
        """

    def queue_snapshot(self) -> QueueSnapshot:
        """The waiting jobs and the busy count of each user, read in one consistent moment.

        policy.jobs_ahead on it gives the order claim_next_job would claim them in.
        """

    def prune_jobs(self, finished_before: datetime, *, dry_run: bool = False,
                   limit: int = 500) -> PruneResult:
        """Retention: remove the output events and archives of up to `limit` finished jobs
        that ended before `finished_before` and were not pruned yet, oldest first; atomic.

        The job rows stay (status, times, result, report, their STATUS and END events) and
        get pruned_at; their JUnit XML goes with the output. Callers loop until a pass prunes
        nothing. With dry_run nothing changes and the result counts every such job (no limit).
        """

    # ----------------------------------------------------------------- jobs (controller side)
    # Every write a controller makes for a job carries its Fence, checked in the write's own
    # transaction: the job must still be fence.controller_id's and that id's lease must still
    # carry fence.token. Otherwise the write changes nothing and raises LeaseLost.
    def claim_next_job(self, fence: Fence) -> Job | None:
        """Atomically claim one queued, unclaimed, not-cancelled job for this controller.

        Two controllers (or two threads) never claim the same job. Fair between users: picks
        from the user with the fewest claimed-but-unfinished jobs, then the oldest job. The job
        stays QUEUED (claimed) until mark_running. None when nothing is waiting. Raises
        LeaseLost when the lease no longer carries fence.token.
        """

    def mark_start_attempt(self, job_id: str, now: datetime, *, fence: Fence) -> Job:
        """Record that the container of a claimed job is about to be created and started.

        Called before the container can exist, in the same fenced write: once it returns, a
        take-over that cannot adopt the job (another engine) fails it as `controller lost`
        instead of requeueing it, since it may be running. LeaseLost when the lease no longer
        carries fence.token (then no container may be made). A running or finished job is
        returned unchanged.
        """

    def mark_running(self, job_id: str, container_id: str, start_time: datetime, *,
                     fence: Fence) -> Job:
        """Record the started container: status RUNNING, start_time, and a STATUS event.

        Idempotent: calling it again for a running job only updates container_id.
        """

    def release_job(self, job_id: str, *, fence: Fence) -> Job:
        """Give a claimed job that never started back to the queue (controller_id cleared).

        Its start attempt, if any, is cleared too: the next claim starts afresh.
        """

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
        """Append OUTPUT events in order and move the job's log_cursor, atomically.

        The cursor is the controller's resume point: after a crash it re-reads the container's
        output and skips what the cursor says is stored, so no line is lost or repeated.
        With keep_bytes, once the stored output exceeds it, the oldest OUTPUT events are dropped
        (the tail is kept: that is where errors are), and the oldest kept position holds one
        marker event saying how many bytes were dropped; dropped_bytes grows accordingly.
        skipped_bytes is output dropped before it got here (the runner's own cap, which only
        drops what the cap would): it adds to dropped_bytes and so to the marker's count.
        Ignored (returns []) when the job is already terminal. Returns the new events.
        """

    def finish_job(self, job_id: str, outcome: JobOutcome, end_time: datetime, *,
                   fence: Fence) -> Job:
        """Record the outcome and append the END event, atomically and once.

        The outcome's junit_xml, when set, is stored in the same transaction (get_junit).
        A job that is already terminal is returned unchanged (first outcome wins).
        """

    def list_controller_jobs(self, controller_id: str) -> list[Job]:
        """Claimed or running, not yet terminal jobs owned by this controller."""

    def count_queued_jobs(self) -> int:
        """Queued jobs that no controller has claimed yet."""

    def count_jobs_by_status(self) -> dict[JobStatus, int]:
        """Every user's jobs counted by status, each status present (0 when none); for metrics.

        One aggregate read at scrape time, no write: cheap enough for every scrape of every
        replica with tens of thousands of finished jobs.
        """

    # ----------------------------------------------------------------- controller leases
    def acquire_lease(self, controller_id: str, host: str, pid: int, version: str,
                      now: datetime, lease_s: float,
                      replace_token: str | None = None) -> ControllerLease:
        """Take the lease on a controller id, with a new token; atomic.

        The id's claimed and running jobs stay its own: the new token fences them from now on,
        so a previous holder that is somehow still running can no longer write for them. The
        recorded engine id is kept until the new holder records its own: the id's containers
        are on that engine should the new holder die before reaching one.

        The new lease lasts lease_s without a heartbeat (stored: everyone judges its expiry by
        it). Granted when nobody holds the id, when the holder stopped gracefully, when its
        lease expired, or when its token is replace_token (the caller found that holder
        dead, e.g. its process is gone on this host). Otherwise raises ControllerIdInUse naming
        the holder. Two controllers asking at once never both get it.
        """

    def renew_lease(self, controller_id: str, token: str, now: datetime) -> bool:
        """Heartbeat; False when the lease is no longer held with this token."""

    def release_lease(self, controller_id: str, token: str, now: datetime) -> None:
        """Graceful stop: mark the lease stopped (a restart with the id may take it at once)."""

    def record_engine(self, fence: Fence, engine_id: str) -> None:
        """Note the Docker engine this lease holder runs its containers on (for take-overs).

        Raises LeaseLost when the lease no longer carries fence.token.
        """

    def take_over(self, gone: ControllerLease, taker: Fence, adopt: bool,
                  now: datetime) -> TakeOver | None:
        """Take the claimed and running jobs of a controller whose lease expired; atomic.

        Goes ahead only if `gone` is still as the taker saw it (same token) and its lease
        expired; otherwise returns None (it came back, or another controller was
        first). Its token is replaced, so its late writes for those jobs are refused. With
        adopt (the taker runs on the same engine), every claimed or running job becomes the
        taker's, which then recovers them exactly as after a restart. Without: claimed jobs
        go back to the queue (cancelled instead when a cancel was asked), running jobs fail
        with reason `controller lost: ...`. Raises LeaseLost when the taker's own fence fails.
        """

    def get_lease(self, controller_id: str) -> ControllerLease | None:
        """The lease row of one controller id, or None."""

    def list_leases(self) -> list[ControllerLease]:
        """Every controller id ever registered, by id, with its count of running jobs."""

    # ----------------------------------------------------------------- environment cache
    # Rows only: the controller of an entry's engine creates and removes the Docker volumes.
    def begin_env(self, key: EnvKey, volume: str, job_id: str, now: datetime) -> EnvEntry:
        """Record a build about to start in `volume` (a new, unique name): state building."""

    def find_env(self, key: EnvKey) -> EnvEntry | None:
        """The newest ready entry of this key, or None. Another user's entry is never found."""

    def env_built(self, entry_id: str, python_version: str, size_bytes: int,
                  now: datetime) -> EnvEntry | None:
        """building → ready (built_at = last_used_at = now), atomically retiring (→ removing)
        every other ready entry of the same key: of two first builds of one key, the later
        one to finish wins and the other is removed. None (nothing changes) when the entry is
        not building any more: it was pruned meanwhile, and its volume is removed instead.
        """

    def touch_env(self, entry_id: str, now: datetime) -> None:
        """A job starts from this entry: last_used_at = now (LRU). Unknown ids are ignored."""

    def retire_envs(self, entry_ids: Sequence[str]) -> None:
        """Mark entries removing (evicted, broken, or their build failed); unknown ids ignored."""

    def prune_envs(self, user_id: str | None = None) -> list[EnvEntry]:
        """Mark every entry (or every entry of one user) removing; returns those it marked.

        `ci-admin cache prune`: the controllers remove their volumes at their next pass.
        """

    def list_envs(self, engine_id: str | None = None) -> list[EnvEntry]:
        """Every entry (or one engine's), least recently used first."""

    def delete_env(self, entry_id: str) -> None:
        """Forget an entry whose volume is gone. Unknown ids are ignored."""

    # ----------------------------------------------------------------- events (relay)
    def list_events(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[JobEvent]:
        """A job's events with seq > after_seq (0 to MAX_STORED_INT), in order."""

    def last_event_seq(self, job_id: str) -> int:
        """The seq of the job's latest event (0 if none): the position "from now"."""

    def poll_events(self, cursor: int | None) -> tuple[list[JobEvent], int]:
        """Events committed after `cursor` across all jobs, in commit order, and the new cursor.

        `cursor=None` returns no events and the current cursor (start "from now"). This is the
        one query a server replica's relay runs, whatever the number of connected clients.
        At most POLL_BATCH (ci_persistence.policy) events a call; fewer means none more are
        ready now, so the caller need not ask again until the change token moves.
        """
