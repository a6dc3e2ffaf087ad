"""The HTTP wire format shared by the server (which produces it) and the client (which reads it).

Pydantic models for JSON bodies, and the shape of each Server-Sent Event:

    id: <per-job seq>          every event, so a client resumes with Last-Event-ID
    event: status | output | end
    data: StatusData | OutputData | EndData as JSON

and, while the job waits, `event: queue` with QueueData: not a stored event, so it has no id
(a reconnect neither skips nor repeats because of it); sent when the position changes.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from ci_common.models import Job, JobOutcome, JobStatus, OutputStream, SlowTest, TestReport

SSE_EVENT_STATUS = "status"
SSE_EVENT_OUTPUT = "output"
SSE_EVENT_END = "end"
SSE_EVENT_QUEUE = "queue"


class SlowTestData(BaseModel):
    test: str = Field(description="pytest node id")
    duration_s: float


class ReportData(BaseModel):
    """pytest's summary of a run (from its JUnit XML); absent when the tests never ran."""

    passed: int
    failed: int
    errors: int
    skipped: int
    duration_s: float
    failing: list[str] = Field(default_factory=list,
                               description="node ids of failed and erroring tests, the first 50")
    slowest: list[SlowTestData] = Field(default_factory=list, description="the 5 slowest tests")

    @classmethod
    def from_report(cls, report: TestReport | None) -> ReportData | None:
        if report is None:
            return None
        return cls(passed=report.passed, failed=report.failed, errors=report.errors,
                   skipped=report.skipped, duration_s=report.duration_s,
                   failing=list(report.failing),
                   slowest=[SlowTestData(test=s.test, duration_s=s.duration_s)
                            for s in report.slowest])

    def to_report(self) -> TestReport:
        return TestReport(passed=self.passed, failed=self.failed, errors=self.errors,
                          skipped=self.skipped, duration_s=self.duration_s,
                          failing=tuple(self.failing),
                          slowest=tuple(SlowTest(s.test, s.duration_s) for s in self.slowest))


class JobView(BaseModel):
    """A job as users see it (GET /jobs, GET /jobs/{id}, `ci list --json`)."""

    id: str
    status: JobStatus
    success: bool | None
    exit_code: int | None
    reason: str | None
    created_at: datetime
    start_time: datetime | None
    end_time: datetime | None
    report: ReportData | None = None
    pruned_at: datetime | None = Field(
        default=None, description="when retention removed the job's output and archive")
    pytest_args: list[str] = Field(default_factory=list,
                                   description="arguments given to pytest (after `--`)")
    python_version: str | None = Field(
        default=None, description="the Python version it runs on (null: from before the "
                                  "choice, the server's default)")

    @classmethod
    def from_job(cls, job: Job) -> JobView:
        return cls(id=job.id, status=job.status, success=job.success, exit_code=job.exit_code,
                   reason=job.reason, created_at=job.created_at, start_time=job.start_time,
                   end_time=job.end_time, report=ReportData.from_report(job.report),
                   pruned_at=job.pruned_at, pytest_args=list(job.pytest_args),
                   python_version=job.python_version)


class JobList(BaseModel):
    """One page of the caller's jobs, newest first."""

    jobs: list[JobView]
    total: int
    limit: int
    offset: int


class JobCreated(BaseModel):
    """Answer to POST /jobs."""

    id: str
    status: JobStatus = JobStatus.QUEUED


class ServiceInfo(BaseModel):
    """Answer to GET /info (no key needed): what a submission may choose."""

    python_versions: list[str] = Field(description="versions `python` may name")
    default_python: str = Field(description="the version a job runs on when it names none")


class QueueData(BaseModel):
    """Where a queued job stands (the `queue` event)."""

    ahead: int | None = Field(description="waiting jobs that will be claimed before it; null "
                                          "once a controller claimed it (starting)")


class ErrorBody(BaseModel):
    """Every error response: one line saying what went wrong."""

    detail: str


class StatusData(BaseModel):
    status: JobStatus


class OutputData(BaseModel):
    stream: OutputStream
    text: str


class EndData(BaseModel):
    """The terminal event: the job is over and the stream ends after it."""

    status: JobStatus
    exit_code: int | None
    success: bool
    reason: str | None = Field(default=None, description="why it did not run normally")
    report: ReportData | None = None

    @classmethod
    def from_outcome(cls, outcome: JobOutcome) -> EndData:
        return cls(status=outcome.status, exit_code=outcome.exit_code, success=outcome.success,
                   reason=outcome.reason, report=ReportData.from_report(outcome.report))

    def to_outcome(self) -> JobOutcome:
        return JobOutcome(status=self.status, exit_code=self.exit_code, success=self.success,
                          reason=self.reason,
                          report=None if self.report is None else self.report.to_report())
