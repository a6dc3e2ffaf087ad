"""The HTTP wire format shared by the server (which produces it) and the client (which reads it).

Pydantic models for JSON bodies, and the shape of each Server-Sent Event:

    id: <per-job seq>          every event, so a client resumes with Last-Event-ID
    event: status | output | end
    data: StatusData | OutputData | EndData as JSON
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from ci_common.models import Job, JobOutcome, JobStatus, OutputStream

SSE_EVENT_STATUS = "status"
SSE_EVENT_OUTPUT = "output"
SSE_EVENT_END = "end"


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

    @classmethod
    def from_job(cls, job: Job) -> JobView:
        return cls(id=job.id, status=job.status, success=job.success, exit_code=job.exit_code,
                   reason=job.reason, created_at=job.created_at, start_time=job.start_time,
                   end_time=job.end_time)


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

    @classmethod
    def from_outcome(cls, outcome: JobOutcome) -> EndData:
        return cls(status=outcome.status, exit_code=outcome.exit_code, success=outcome.success,
                   reason=outcome.reason)

    def to_outcome(self) -> JobOutcome:
        return JobOutcome(status=self.status, exit_code=self.exit_code, success=self.success,
                          reason=self.reason)
