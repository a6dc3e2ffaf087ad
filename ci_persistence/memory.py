"""InMemoryRepository: the Repository contract in plain dicts, for unit tests of the services.

One lock serialises every method, so each is atomic like a database transaction; a counter
bumped by every write is the change token.
"""

from __future__ import annotations

import bisect
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from ci_common.errors import AlreadyExists, NotFound
from ci_common.models import (
    ApiKey,
    ControllerLease,
    EnvEntry,
    EnvKey,
    EnvState,
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
from ci_persistence.logcap import marker_text, plan_drop, utf8_len
from ci_persistence.policy import (
    POLL_BATCH,
    Fate,
    TakeOverFates,
    can_take_over,
    cancelled_outcome,
    check_lease_free,
    check_terminal,
    claim_key,
    controller_lost_outcome,
    end_event_text,
    env_lru_order,
    lease_lost,
)
from ci_persistence.timefmt import as_utc


def nocase(text: str) -> str:
    """Fold ASCII letters only, like SQLite's COLLATE NOCASE."""
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


@dataclass(slots=True)
class _StoredEvent:
    event: JobEvent
    is_marker: bool = False


@dataclass(slots=True)
class _KeyRow:
    key: ApiKey
    key_hash: str


class InMemoryRepository:
    """The Repository Protocol held in memory; thread-safe, one process only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changes_cond = threading.Condition(self._lock)  # notified on every write
        self._interrupts = 0
        self._seen_interrupts: dict[int, int] = {}  # thread id → interrupt count it saw
        self._changes = 0
        self._users: dict[str, User] = {}
        self._email_index: dict[str, str] = {}
        self._keys: dict[str, _KeyRow] = {}
        self._jobs: dict[str, Job] = {}
        self._turns: dict[str, int] = {}  # user id → their last claim turn (policy.claim_key)
        self._envs: dict[str, EnvEntry] = {}
        self._archives: dict[str, bytes] = {}
        self._junit: dict[str, str] = {}
        self._next_seq: dict[str, int] = {}
        self._events: dict[int, _StoredEvent] = {}  # global id -> event
        self._event_ids: list[int] = []  # every id ever given, ascending (some since dropped)
        self._job_event_ids: dict[str, list[int]] = {}
        self._last_event_id = 0
        self._installation_id = uuid.uuid4().hex
        self._leases: dict[str, ControllerLease] = {}

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Nothing to release; safe to call twice."""

    def change_token(self) -> int:
        """Moves after every write."""
        with self._lock:
            return self._changes

    def wait_for_change(self, seen: int | None, timeout_s: float) -> int:
        """Sleep on a condition every write notifies; see the Protocol."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        with self._lock:
            interrupts = self._interrupts
            thread = threading.get_ident()  # an interrupt it missed between waits counts
            missed = self._seen_interrupts.get(thread, interrupts) != interrupts
            self._seen_interrupts[thread] = interrupts
            while not missed and seen is not None and self._changes == seen and \
                    self._interrupts == interrupts:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changes_cond.wait(left)
            self._seen_interrupts[thread] = self._interrupts
            return self._changes

    def interrupt_waits(self) -> None:
        """Wake every waiter now."""
        with self._lock:
            self._interrupts += 1
            self._changes_cond.notify_all()

    def _changed(self) -> None:
        self._changes += 1
        self._changes_cond.notify_all()  # the caller holds self._lock

    def installation_id(self) -> str:
        """A random id made with this repository."""
        return self._installation_id

    # ----------------------------------------------------------------- users
    def create_user(self, name: str, email: str) -> User:
        """Create an active user; AlreadyExists when the email is taken (case-insensitive)."""
        with self._lock:
            if nocase(email) in self._email_index:
                raise AlreadyExists(f"a user with email {email} already exists")
            user = User(id=str(uuid.uuid4()), name=name, email=email, is_active=True,
                        created_at=utcnow())
            self._users[user.id] = user
            self._email_index[nocase(email)] = user.id
            self._changed()
            return user

    def get_user(self, user_id: str) -> User:
        """Raises NotFound."""
        with self._lock:
            return self._user(user_id)

    def _user(self, user_id: str) -> User:
        try:
            return self._users[user_id]
        except KeyError:
            raise NotFound(f"user {user_id} not found") from None

    def get_user_by_email(self, email: str) -> User:
        """Case-insensitive. Raises NotFound."""
        with self._lock:
            user_id = self._email_index.get(nocase(email))
            if user_id is None:
                raise NotFound(f"no user with email {email}")
            return self._users[user_id]

    def list_users(self) -> list[User]:
        """All users, oldest first."""
        with self._lock:
            return list(self._users.values())

    def set_user_active(self, user_id: str, active: bool) -> User:
        """Activate or deactivate. Raises NotFound."""
        with self._lock:
            user = replace(self._user(user_id), is_active=active)
            self._users[user_id] = user
            self._changed()
            return user

    # ----------------------------------------------------------------- API keys
    def create_api_key(self, user_id: str, name: str, key_hash: str, prefix: str) -> ApiKey:
        """Store a new key's hash and prefix. Raises NotFound (user)."""
        with self._lock:
            user = self._user(user_id)
            if any(row.key_hash == key_hash for row in self._keys.values()):
                raise AlreadyExists("an API key with that hash already exists")
            key = ApiKey(id=str(uuid.uuid4()), user_id=user.id, user_email=user.email, name=name,
                         prefix=prefix, is_active=True, created_at=utcnow(), last_used_at=None)
            self._keys[key.id] = _KeyRow(key=key, key_hash=key_hash)
            self._changed()
            return key

    def list_api_keys(self, user_id: str | None = None) -> list[ApiKey]:
        """Keys of one user, or of everyone; oldest first."""
        with self._lock:
            return [row.key for row in self._keys.values()
                    if user_id is None or row.key.user_id == user_id]

    def revoke_api_key(self, key_id: str) -> ApiKey:
        """Deactivate a key. Raises NotFound."""
        with self._lock:
            row = self._keys.get(key_id)
            if row is None:
                raise NotFound(f"API key {key_id} not found")
            row.key = replace(row.key, is_active=False)
            self._changed()
            return row.key

    def find_keys_by_prefix(self, prefix: str) -> list[StoredKey]:
        """Candidate keys (active or not) with their owner."""
        with self._lock:
            return [StoredKey(key=row.key, key_hash=row.key_hash,
                              user=self._users[row.key.user_id])
                    for row in self._keys.values() if row.key.prefix == prefix]

    def touch_api_key(self, key_id: str, when: datetime) -> None:
        """Record a successful use; unknown ids are ignored."""
        with self._lock:
            row = self._keys.get(key_id)
            if row is not None:
                row.key = replace(row.key, last_used_at=as_utc(when))
                self._changed()

    # ----------------------------------------------------------------- jobs (server side)
    def create_job(self, user_id: str, archive: bytes, timeout_seconds: float | None, *,
                   pytest_args: Sequence[str] = (), python_version: str | None = None,
                   no_cache: bool = False) -> Job:
        """Store the archive and a queued job with its first STATUS event."""
        with self._lock:
            self._user(user_id)
            job = Job(id=str(uuid.uuid4()), user_id=user_id, status=JobStatus.QUEUED,
                      created_at=utcnow(), start_time=None, end_time=None, exit_code=None,
                      success=None, reason=None, timeout_seconds=timeout_seconds,
                      archive_size=len(archive), controller_id=None, container_id=None,
                      cancel_requested=False, log_cursor=0, output_bytes=0, dropped_bytes=0,
                      pytest_args=tuple(pytest_args), python_version=python_version,
                      no_cache=no_cache)
            self._jobs[job.id] = job
            self._archives[job.id] = bytes(archive)
            self._next_seq[job.id] = 1
            self._job_event_ids[job.id] = []
            self._append(job.id, EventKind.STATUS, JobStatus.QUEUED.value, None)
            self._changed()
            return job

    def get_job(self, job_id: str, user_id: str | None = None) -> Job:
        """One job; another user's job raises NotFound like a missing one."""
        with self._lock:
            return self._job(job_id, user_id)

    def _job(self, job_id: str, user_id: str | None = None) -> Job:
        job = self._jobs.get(job_id)
        if job is None or (user_id is not None and job.user_id != user_id):
            raise NotFound(f"job {job_id} not found")
        return job

    def list_jobs(self, user_id: str, limit: int = 50, offset: int = 0,
                  status: JobStatus | None = None) -> list[Job]:
        """The user's jobs (in `status`, if given), newest first."""
        with self._lock:
            jobs = [job for job in self._jobs.values()
                    if job.user_id == user_id and status in (None, job.status)]
        jobs.sort(key=lambda job: (job.created_at, job.id), reverse=True)
        return jobs[max(offset, 0):max(offset, 0) + max(limit, 0)]

    def count_jobs(self, user_id: str, status: JobStatus | None = None) -> int:
        """How many jobs the user has (in `status`, if given)."""
        with self._lock:
            return sum(1 for job in self._jobs.values()
                       if job.user_id == user_id and status in (None, job.status))

    def request_cancel(self, job_id: str, user_id: str) -> Job:
        """Cancel a queued unclaimed job at once; flag a claimed or running one."""
        with self._lock:
            job = self._job(job_id, user_id)
            if job.status.is_terminal:
                return job
            if job.status is JobStatus.QUEUED and job.controller_id is None:
                job = replace(job, cancel_requested=True)
                self._jobs[job_id] = job
                job = self._finish(job, cancelled_outcome(), utcnow())
            elif not job.cancel_requested:
                job = replace(job, cancel_requested=True)
                self._jobs[job_id] = job
            self._changed()
            return job

    def get_archive(self, job_id: str) -> bytes:
        """The uploaded zip. Raises NotFound."""
        with self._lock:
            try:
                return self._archives[job_id]
            except KeyError:
                raise NotFound(f"archive of job {job_id} not found") from None

    def get_junit(self, job_id: str) -> str:
        """pytest's JUnit XML of the job. Raises NotFound when there is none."""
        with self._lock:
            xml = self._junit.get(job_id)
        if xml is None:
            raise NotFound(f"no JUnit report stored for job {job_id}")
        return xml

    def queue_snapshot(self) -> QueueSnapshot:
        """The waiting jobs and each user's busy count, at one moment."""
        with self._lock:
            busy: dict[str, int] = {}
            waiting = []
            for job in self._jobs.values():
                if job.controller_id is not None and not job.status.is_terminal:
                    busy[job.user_id] = busy.get(job.user_id, 0) + 1
                elif (job.status is JobStatus.QUEUED and job.controller_id is None
                      and not job.cancel_requested):
                    waiting.append(WaitingJob(job.id, job.user_id, job.created_at,
                                              self._turns.get(job.user_id, 0)))
        return QueueSnapshot(waiting=tuple(waiting), busy=busy)

    def prune_jobs(self, finished_before: datetime, *, dry_run: bool = False,
                   limit: int = 500) -> PruneResult:
        """Remove the output and archives of finished jobs that ended before the cutoff."""
        cutoff = as_utc(finished_before)
        with self._lock:
            due = sorted((job for job in self._jobs.values()
                          if job.pruned_at is None and job.end_time is not None
                          and job.end_time < cutoff), key=lambda job: job.end_time or cutoff)
            if not dry_run:
                due = due[:max(limit, 0)]
            freed = sum(job.output_bytes + job.archive_size for job in due)
            if dry_run or not due:
                return PruneResult(jobs=len(due), freed_bytes=freed)
            now = utcnow()
            for job in due:
                self._archives.pop(job.id, None)
                self._junit.pop(job.id, None)
                kept = []
                for event_id in self._job_event_ids.get(job.id, []):
                    if self._events[event_id].event.kind is EventKind.OUTPUT:
                        del self._events[event_id]
                    else:
                        kept.append(event_id)
                self._job_event_ids[job.id] = kept
                self._jobs[job.id] = replace(job, pruned_at=now, output_bytes=0)
            self._changed()
            return PruneResult(jobs=len(due), freed_bytes=freed)

    # ----------------------------------------------------------------- jobs (controller side)
    def claim_next_job(self, fence: Fence) -> Job | None:
        """Claim the fairest waiting job (policy.claim_key: fewest busy, oldest turn, oldest)."""
        with self._lock:
            self._check_lease(fence)
            busy: dict[str, int] = {}
            for job in self._jobs.values():
                if job.controller_id is not None and not job.status.is_terminal:
                    busy[job.user_id] = busy.get(job.user_id, 0) + 1
            waiting = [job for job in self._jobs.values()
                       if job.status is JobStatus.QUEUED and job.controller_id is None
                       and not job.cancel_requested]
            if not waiting:
                return None
            chosen = min(waiting, key=lambda j: claim_key(
                WaitingJob(j.id, j.user_id, j.created_at), busy.get(j.user_id, 0),
                self._turns.get(j.user_id, 0)))
            self._turns[chosen.user_id] = max(self._turns.values(), default=0) + 1
            claimed = replace(chosen, controller_id=fence.controller_id)
            self._jobs[claimed.id] = claimed
            self._changed()
            return claimed

    def mark_start_attempt(self, job_id: str, now: datetime, *, fence: Fence) -> Job:
        """Note that the claimed job's container is about to be made (see the Protocol)."""
        with self._lock:
            job = self._fenced_job(job_id, fence)
            if job.status is not JobStatus.QUEUED:
                return job
            job = replace(job, start_attempted_at=as_utc(now))
            self._jobs[job_id] = job
            self._changed()
            return job

    def mark_running(self, job_id: str, container_id: str, start_time: datetime, *,
                     fence: Fence) -> Job:
        """Status RUNNING with its STATUS event; again for a running job only sets container_id."""
        with self._lock:
            job = self._fenced_job(job_id, fence)
            if job.status.is_terminal:
                return job
            if job.status is JobStatus.RUNNING:
                job = replace(job, container_id=container_id)
            else:
                job = replace(job, status=JobStatus.RUNNING, container_id=container_id,
                              start_time=as_utc(start_time))
                self._append(job_id, EventKind.STATUS, JobStatus.RUNNING.value, None)
            self._jobs[job_id] = job
            self._changed()
            return job

    def release_job(self, job_id: str, *, fence: Fence) -> Job:
        """Unclaim a job that never started (one whose cancel was asked is cancelled instead)."""
        with self._lock:
            job = self._fenced_job(job_id, fence)
            if job.status is not JobStatus.QUEUED or job.controller_id is None:
                return job
            job = replace(job, controller_id=None, start_attempted_at=None)
            self._jobs[job_id] = job
            if job.cancel_requested:
                job = self._finish(job, cancelled_outcome(), utcnow())
            self._changed()
            return job

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
        """Append OUTPUT events and move log_cursor atomically; apply the log cap."""
        with self._lock:
            job = self._fenced_job(job_id, fence)
            if job.status.is_terminal:
                return []
            new_ids = [self._append(job_id, EventKind.OUTPUT, chunk.text, chunk.stream)
                       for chunk in chunks if chunk.text]
            added = sum(utf8_len(self._events[i].event.text) for i in new_ids)
            job = replace(job, log_cursor=log_cursor, output_bytes=job.output_bytes + added,
                          dropped_bytes=job.dropped_bytes + max(skipped_bytes, 0))
            if keep_bytes is not None and job.output_bytes > keep_bytes:
                job = self._cap(job, keep_bytes)
            self._jobs[job_id] = job
            self._changed()
            return [self._events[i].event for i in new_ids if i in self._events]

    def _cap(self, job: Job, keep_bytes: int) -> Job:
        outputs = [i for i in self._job_event_ids[job.id]
                   if self._events[i].event.kind is EventKind.OUTPUT
                   and not self._events[i].is_marker]
        sizes = [(i, utf8_len(self._events[i].event.text)) for i in outputs]
        plan = plan_drop(job.output_bytes, sizes, keep_bytes)
        if not plan.keys:
            return job
        dropped = job.dropped_bytes + plan.bytes
        text = marker_text(dropped, keep_bytes)
        marker_id = next((i for i in self._job_event_ids[job.id] if self._events[i].is_marker),
                         None)
        doomed = plan.keys
        if marker_id is None:
            # The first dropped event becomes the marker, in place: same seq, same global id.
            marker_id, doomed = doomed[0], doomed[1:]
            self._events[marker_id].is_marker = True
        stored = self._events[marker_id]
        stored.event = replace(stored.event, text=text, stream=OutputStream.STDOUT)
        for event_id in doomed:
            del self._events[event_id]
        gone = set(doomed)
        self._job_event_ids[job.id] = [i for i in self._job_event_ids[job.id] if i not in gone]
        return replace(job, output_bytes=job.output_bytes - plan.bytes, dropped_bytes=dropped)

    def finish_job(self, job_id: str, outcome: JobOutcome, end_time: datetime, *,
                   fence: Fence) -> Job:
        """Record the outcome and the END event, once (first outcome wins)."""
        check_terminal(outcome)
        with self._lock:
            job = self._fenced_job(job_id, fence)
            if job.status.is_terminal:
                return job
            job = self._finish(job, outcome, end_time)
            self._changed()
            return job

    def _finish(self, job: Job, outcome: JobOutcome, end_time: datetime) -> Job:
        job = replace(job, status=outcome.status, exit_code=outcome.exit_code,
                      success=outcome.success, reason=outcome.reason, end_time=as_utc(end_time),
                      report=outcome.report)
        self._jobs[job.id] = job
        if outcome.junit_xml is not None:
            self._junit[job.id] = outcome.junit_xml
        self._append(job.id, EventKind.END, end_event_text(outcome), None)
        return job

    def list_controller_jobs(self, controller_id: str) -> list[Job]:
        """Claimed or running, not yet terminal jobs of this controller."""
        with self._lock:
            jobs = [job for job in self._jobs.values()
                    if job.controller_id == controller_id and not job.status.is_terminal]
        return sorted(jobs, key=lambda job: (job.created_at, job.id))

    def count_queued_jobs(self) -> int:
        """Queued jobs no controller has claimed yet."""
        with self._lock:
            return sum(1 for job in self._jobs.values()
                       if job.status is JobStatus.QUEUED and job.controller_id is None)

    def count_jobs_by_status(self) -> dict[JobStatus, int]:
        """Every user's jobs counted by status (0 when none)."""
        with self._lock:
            counts = dict.fromkeys(JobStatus, 0)
            for job in self._jobs.values():
                counts[job.status] += 1
            return counts

    # ----------------------------------------------------------------- controller leases
    def acquire_lease(self, controller_id: str, host: str, pid: int, version: str,
                      now: datetime, lease_s: float,
                      replace_token: str | None = None) -> ControllerLease:
        """Take the lease with a new token unless a live controller holds it."""
        with self._lock:
            previous = self._lease(controller_id)
            check_lease_free(previous, now, replace_token)
            now = as_utc(now)
            self._leases[controller_id] = ControllerLease(
                id=controller_id, host=host, pid=pid, version=version, token=uuid.uuid4().hex,
                started_at=now, heartbeat_at=now, stopped=False, running_jobs=0, lease_s=lease_s,
                engine_id="" if previous is None else previous.engine_id)
            self._changed()
            lease = self._lease(controller_id)
            assert lease is not None
            return lease

    def _check_lease(self, fence: Fence) -> None:
        lease = self._leases.get(fence.controller_id)
        if lease is None or lease.token != fence.token:
            raise lease_lost(fence)

    def _fenced_job(self, job_id: str, fence: Fence) -> Job:
        job = self._job(job_id)
        if job.controller_id != fence.controller_id:
            raise lease_lost(fence)
        self._check_lease(fence)
        return job

    def record_engine(self, fence: Fence, engine_id: str) -> None:
        """Note the engine this holder runs containers on; LeaseLost if no longer held."""
        with self._lock:
            self._check_lease(fence)
            self._leases[fence.controller_id] = replace(self._leases[fence.controller_id],
                                                        engine_id=engine_id)
            self._changed()

    def take_over(self, gone: ControllerLease, taker: Fence, adopt: bool,
                  now: datetime) -> TakeOver | None:
        """Take an expired controller's jobs, if it is still as the taker saw it."""
        with self._lock:
            holder = self._lease(gone.id)
            if holder is None or not can_take_over(holder, gone.token, as_utc(now)):
                return None
            self._check_lease(taker)
            self._leases[gone.id] = replace(self._leases[gone.id], token=uuid.uuid4().hex)
            fates = TakeOverFates()
            jobs = sorted((job for job in self._jobs.values()
                           if job.controller_id == gone.id and not job.status.is_terminal),
                          key=lambda job: (job.created_at, job.id))
            for job in jobs:
                fate = fates.decide(job, adopt)
                if fate is Fate.ADOPTED:
                    self._jobs[job.id] = replace(job, controller_id=taker.controller_id)
                elif fate is Fate.FAILED:
                    self._finish(job, controller_lost_outcome(holder), now)
                else:
                    job = replace(job, controller_id=None, start_attempted_at=None)
                    self._jobs[job.id] = job
                    if fate is Fate.CANCELLED:
                        self._finish(job, cancelled_outcome(), now)
            self._changed()
            return fates.result(gone.id)

    def _lease(self, controller_id: str) -> ControllerLease | None:
        lease = self._leases.get(controller_id)
        if lease is None:
            return None
        running = sum(1 for job in self._jobs.values()
                      if job.controller_id == controller_id and not job.status.is_terminal)
        return replace(lease, running_jobs=running)

    def renew_lease(self, controller_id: str, token: str, now: datetime) -> bool:
        """Heartbeat; False when the lease is no longer held with this token."""
        with self._lock:
            lease = self._leases.get(controller_id)
            if lease is None or lease.token != token or lease.stopped:
                return False
            self._leases[controller_id] = replace(lease, heartbeat_at=as_utc(now))
            self._changed()
            return True

    def release_lease(self, controller_id: str, token: str, now: datetime) -> None:
        """Mark the lease stopped (graceful stop)."""
        with self._lock:
            lease = self._leases.get(controller_id)
            if lease is not None and lease.token == token:
                self._leases[controller_id] = replace(lease, stopped=True,
                                                      heartbeat_at=as_utc(now))
                self._changed()

    def get_lease(self, controller_id: str) -> ControllerLease | None:
        """The lease row of one controller id, or None."""
        with self._lock:
            return self._lease(controller_id)

    def list_leases(self) -> list[ControllerLease]:
        """Every registered controller id, by id."""
        with self._lock:
            found = [self._lease(controller_id) for controller_id in sorted(self._leases)]
        return [lease for lease in found if lease is not None]

    # ----------------------------------------------------------------- environment cache
    def begin_env(self, key: EnvKey, volume: str, job_id: str, now: datetime) -> EnvEntry:
        """Record a build about to start: state building."""
        entry = EnvEntry(id=str(uuid.uuid4()), key=key, volume=volume, state=EnvState.BUILDING,
                         job_id=job_id, python_version="", size_bytes=0, created_at=as_utc(now),
                         built_at=None, last_used_at=None)
        with self._lock:
            if any(other.volume == volume for other in self._envs.values()):
                raise AlreadyExists(f"volume {volume} is already recorded")
            self._envs[entry.id] = entry
            self._changed()
        return entry

    def find_env(self, key: EnvKey) -> EnvEntry | None:
        """The newest ready entry of this key."""
        with self._lock:
            ready = [e for e in self._envs.values() if e.key == key and e.state is EnvState.READY]
        return max(ready, key=lambda e: (e.built_at or e.created_at, e.id), default=None)

    def env_built(self, entry_id: str, python_version: str, size_bytes: int,
                  now: datetime) -> EnvEntry | None:
        """building → ready, retiring the other ready entries of its key; atomic."""
        with self._lock:
            entry = self._envs.get(entry_id)
            if entry is None or entry.state is not EnvState.BUILDING:
                return None
            for other in list(self._envs.values()):
                if other.key == entry.key and other.state is EnvState.READY:
                    self._envs[other.id] = replace(other, state=EnvState.REMOVING)
            entry = replace(entry, state=EnvState.READY, python_version=python_version,
                            size_bytes=size_bytes, built_at=as_utc(now),
                            last_used_at=as_utc(now))
            self._envs[entry_id] = entry
            self._changed()
            return entry

    def touch_env(self, entry_id: str, now: datetime) -> None:
        """last_used_at = now."""
        with self._lock:
            entry = self._envs.get(entry_id)
            if entry is not None:
                self._envs[entry_id] = replace(entry, last_used_at=as_utc(now))

    def retire_envs(self, entry_ids: Sequence[str]) -> None:
        """Mark entries removing."""
        with self._lock:
            for entry_id in entry_ids:
                entry = self._envs.get(entry_id)
                if entry is not None:
                    self._envs[entry_id] = replace(entry, state=EnvState.REMOVING)
            self._changed()

    def prune_envs(self, user_id: str | None = None) -> list[EnvEntry]:
        """Mark every (or one user's) entry removing; returns those it marked."""
        marked = []
        with self._lock:
            for entry in list(self._envs.values()):
                if entry.state is EnvState.REMOVING:
                    continue
                if user_id is None or entry.key.user_id == user_id:
                    entry = replace(entry, state=EnvState.REMOVING)
                    self._envs[entry.id] = entry
                    marked.append(entry)
            self._changed()
        return sorted(marked, key=env_lru_order)

    def list_envs(self, engine_id: str | None = None) -> list[EnvEntry]:
        """Every (or one engine's) entry, least recently used first."""
        with self._lock:
            entries = [e for e in self._envs.values()
                       if engine_id is None or e.key.engine_id == engine_id]
        return sorted(entries, key=env_lru_order)

    def delete_env(self, entry_id: str) -> None:
        """Forget an entry."""
        with self._lock:
            if self._envs.pop(entry_id, None) is not None:
                self._changed()

    # ----------------------------------------------------------------- events (relay)
    def list_events(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[JobEvent]:
        """A job's events with seq > after_seq, in order."""
        with self._lock:
            events = [self._events[i].event for i in self._job_event_ids.get(job_id, [])]
        return [event for event in events if event.seq > after_seq][:max(limit, 0)]

    def last_event_seq(self, job_id: str) -> int:
        """The seq of the job's latest event (0 if none)."""
        with self._lock:
            ids = self._job_event_ids.get(job_id)
            return self._events[ids[-1]].event.seq if ids else 0

    def poll_events(self, cursor: int | None) -> tuple[list[JobEvent], int]:
        """Events after cursor across all jobs, in commit order, and the new cursor."""
        with self._lock:
            if cursor is None:
                return [], self._last_event_id
            found: list[JobEvent] = []
            new_cursor = cursor
            start = bisect.bisect_right(self._event_ids, cursor)
            for index in range(start, len(self._event_ids)):
                event_id = self._event_ids[index]
                stored = self._events.get(event_id)
                if stored is None:  # dropped by the log cap
                    continue
                found.append(stored.event)
                new_cursor = event_id
                if len(found) >= POLL_BATCH:
                    break
            return found, new_cursor

    def _append(self, job_id: str, kind: EventKind, text: str,
                stream: OutputStream | None) -> int:
        seq = self._next_seq[job_id]
        self._next_seq[job_id] = seq + 1
        self._last_event_id += 1
        event = JobEvent(job_id=job_id, seq=seq, kind=kind, text=text, stream=stream,
                         created_at=utcnow())
        self._events[self._last_event_id] = _StoredEvent(event=event)
        self._event_ids.append(self._last_event_id)
        self._job_event_ids[job_id].append(self._last_event_id)
        return self._last_event_id
