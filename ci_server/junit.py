"""Why a job has no JUnit XML to serve: one line for the 404 of GET /jobs/{id}/junit. Pure."""

from __future__ import annotations

from ci_common.models import Job, JobStatus


def missing_junit_reason(job: Job) -> str:
    """The 404's detail when get_junit found nothing for the caller's own job."""
    prefix = f"job {job.id} has no JUnit report"
    if not job.status.is_terminal:
        return f"{prefix} yet: it is {job.status.value}"
    if job.pruned_at is not None:
        return f"{prefix}: removed with its output by retention"
    if job.status is JobStatus.CANCELLED:
        return f"{prefix}: it was cancelled before pytest finished"
    if job.status is JobStatus.FAILED:
        return f"{prefix}: the tests never ran ({job.reason or 'failed'})"
    if job.report is not None:
        return f"{prefix}: pytest's XML was larger than the runner keeps"
    return f"{prefix}: pytest wrote none (it stopped before reporting)"
