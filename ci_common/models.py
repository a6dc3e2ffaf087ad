"""Domain models returned by every repository implementation.

Frozen dataclasses: they are values, passed between layers, never mutated in place.
All timestamps are timezone-aware UTC datetimes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime

# The vocabulary lives in its own light module (the `ci` client imports it without these
# dataclasses, issue #10); re-exported here, where the rest of the code looks for it.
from ci_common.statuses import EventKind as EventKind
from ci_common.statuses import JobStatus as JobStatus
from ci_common.statuses import OutputStream as OutputStream


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the only clock the models use)."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class User:
    id: str  # UUID4 as text
    name: str
    email: str
    is_active: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key's metadata. Never holds the key itself; the hash only where auth needs it."""

    id: str  # UUID4 as text
    user_id: str
    user_email: str
    name: str
    prefix: str  # the first characters of the key, shown to operators to tell keys apart
    is_active: bool
    created_at: datetime
    last_used_at: datetime | None


@dataclass(frozen=True, slots=True)
class StoredKey:
    """What authentication needs to check a presented key: its hash, and its owner's state."""

    key: ApiKey
    key_hash: str  # hex SHA-256 of the full key
    user: User


@dataclass(frozen=True, slots=True)
class Job:
    id: str  # UUID4 as text
    user_id: str
    status: JobStatus
    created_at: datetime
    start_time: datetime | None
    end_time: datetime | None
    exit_code: int | None
    success: bool | None  # None until the job is terminal
    reason: str | None  # why a job did not run normally (failed, cancelled); None otherwise
    timeout_seconds: float | None  # per-job limit asked for at submit; None = the setting
    archive_size: int  # bytes of the uploaded zip
    controller_id: str | None  # the controller that claimed it; None while unclaimed
    container_id: str | None  # set once the container has been started
    cancel_requested: bool
    log_cursor: int  # last runner frame number stored as output (crash-safe resume point)
    output_bytes: int  # bytes of output currently stored
    dropped_bytes: int  # bytes of output dropped by the log cap (the head is dropped)
    report: TestReport | None = None  # pytest's summary, once the tests ran
    pruned_at: datetime | None = None  # when retention removed its output and archive
    pytest_args: tuple[str, ...] = ()  # given after `--` at submit; pytest gets them as argv
    python_version: str | None = None  # chosen at submit (None: from before the choice)
    # when its controller was about to create the container (fenced, before it could start):
    # a claimed job with one may have run, so a take-over on another engine never requeues it
    start_attempted_at: datetime | None = None
    no_cache: bool = False  # `ci submit test --no-cache`: install afresh, ignore a cached env


@dataclass(frozen=True, slots=True)
class JobEvent:
    job_id: str
    seq: int  # per-job sequence number, 1-based, strictly increasing (gaps where the cap dropped)
    kind: EventKind
    text: str
    stream: OutputStream | None  # set for OUTPUT events only
    created_at: datetime


@dataclass(frozen=True, slots=True)
class OutputChunk:
    """Output as the controller hands it to the repository: one stream's text, in order."""

    stream: OutputStream
    text: str


@dataclass(frozen=True, slots=True)
class SlowTest:
    """One of a run's slowest tests."""

    test: str  # pytest's node id, e.g. tests/test_calc.py::test_add
    duration_s: float


@dataclass(frozen=True, slots=True)
class TestReport:
    """What pytest's JUnit XML says about a run: counts, failing tests, slowest tests."""

    __test__ = False  # a model, not a pytest test class

    passed: int
    failed: int
    errors: int
    skipped: int
    duration_s: float
    failing: tuple[str, ...] = ()  # node ids of failed and erroring tests, the first 50
    slowest: tuple[SlowTest, ...] = ()  # the 5 slowest tests, slowest first


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """How a job ended; recorded on the job row and carried by its END event."""

    status: JobStatus
    exit_code: int | None
    success: bool
    reason: str | None
    report: TestReport | None = None  # when pytest ran and wrote its report
    # pytest's JUnit XML as written (within the runner's bound); stored apart from the job row
    # and served by GET /jobs/{id}/junit, never carried by the END event.
    junit_xml: str | None = None


@dataclass(frozen=True, slots=True)
class WaitingJob:
    """A queued job no controller has claimed yet, as the claim order sees it."""

    id: str
    user_id: str
    created_at: datetime
    turn: int = 0  # its user's last claim turn (0: never claimed): ties go to the lowest


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """Everything the claim order depends on, read at one moment (see policy.jobs_ahead)."""

    waiting: tuple[WaitingJob, ...]  # queued, unclaimed, not cancelled
    busy: dict[str, int]  # user id → claimed-but-unfinished jobs (users with none left out)


@dataclass(frozen=True, slots=True)
class ControllerLease:
    """A controller's hold on its id: who holds it and when it last said it was alive."""

    id: str  # CI_CONTROLLER_ID
    host: str
    pid: int
    version: str
    token: str  # random, new at every acquisition: tells two holders of one id apart
    started_at: datetime
    heartbeat_at: datetime
    stopped: bool  # released by a graceful stop (its containers are left for the restart)
    running_jobs: int  # claimed or running jobs of this controller id
    engine_id: str = ""  # the Docker engine it runs containers on; "" until it reached one
    lease_s: float = 60.0  # the holder renews within this long (its CI_CONTROLLER_LEASE)

    @property
    def fence(self) -> Fence:
        """What this holder shows with every write for a job (see Fence)."""
        return Fence(controller_id=self.id, token=self.token)

    def heartbeat_age_s(self, now: datetime) -> float:
        """Seconds since the last heartbeat."""
        return max((now - self.heartbeat_at).total_seconds(), 0.0)

    def is_expired(self, now: datetime) -> bool:
        """No heartbeat for the whole lease (a graceful stop too, once that long has passed)."""
        return self.heartbeat_age_s(now) >= self.lease_s

    def is_alive(self, now: datetime) -> bool:
        """Held by a running controller: not stopped, and a heartbeat within the lease."""
        return not self.stopped and not self.is_expired(now)


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What a retention pass removed (or, in a dry run, would remove)."""

    jobs: int  # finished jobs whose output and archive went
    freed_bytes: int  # their stored output plus their archives


@dataclass(frozen=True, slots=True)
class Fence:
    """A controller's proof that it still holds its lease, shown with every write for a job.

    The repository checks it in the write's own transaction: the job must still belong to
    `controller_id` and the lease on that id must still carry `token`. After a take-over (the
    lease expired, another controller took the jobs) or a restart with the same id (a new
    token), a late writer is refused with LeaseLost instead of being trusted to behave.
    """

    controller_id: str
    token: str


@dataclass(frozen=True, slots=True)
class TakeOver:
    """What taking over an expired controller's jobs did, job ids by fate."""

    controller_id: str  # the controller that was gone
    requeued: tuple[str, ...]  # claimed, never started: queued again
    adopted: tuple[str, ...]  # now the taker's: it adopts their containers as after a restart
    failed: tuple[str, ...]  # running on an engine no live controller watches: controller lost
    cancelled: tuple[str, ...]  # claimed, never started, and the user had asked to cancel


class EnvState(enum.StrEnum):
    """Lifecycle of a cached environment: building → ready → removing (→ row deleted)."""

    BUILDING = "building"  # a job is installing into its volume; never used by another job
    READY = "ready"  # installed successfully; jobs of the same key start from it
    REMOVING = "removing"  # pruned, evicted, replaced or broken: its controller removes it


@dataclass(frozen=True, slots=True)
class EnvKey:
    """What a cached environment is keyed by: whose, where, which image, which requirements.

    The engine is part of it because a volume lives on one Docker engine. The image id (not
    its tag) pins the interpreter: the Python version is recorded from the build and checked
    again by the runner before the environment is used.
    """

    user_id: str
    engine_id: str
    image_id: str
    requirements_sha256: str


@dataclass(frozen=True, slots=True)
class EnvEntry:
    """One cached environment: a Docker volume holding a virtualenv (see ci_controller.envcache)."""

    id: str  # UUID4 as text
    key: EnvKey
    volume: str  # the volume's name on key.engine_id: unique per build
    state: EnvState
    job_id: str  # the job that built it
    python_version: str  # e.g. "3.11.2"; "" until ready
    size_bytes: int  # du of the environment; 0 until ready
    created_at: datetime  # the build started
    built_at: datetime | None  # the build succeeded
    last_used_at: datetime | None  # the last job that started from it (LRU eviction)
