"""What the `ci` command prints, as pure functions: the jobs table, times and result lines."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, tzinfo

from ci_common.models import JobStatus
from ci_common.wire import EndData, JobView

# Column widths of the README's example table (`ci list`), the last column unpadded.
COLUMNS = (("JOB ID", 39), ("STATUS", 13), ("START TIME", 23), ("END TIME", 23), ("SUCCESS", 0))
RULE_WIDTH = 110
NOT_SET = "N/A"
PASSED_MARK = "✓"
FAILED_MARK = "✗"
PENDING_MARK = "-"


def format_time(value: datetime | None, tz: tzinfo | None = None) -> str:
    """Local time as `YYYY-MM-DD HH:MM:SS` (tz overrides the local zone), `N/A` when unset."""
    if value is None:
        return NOT_SET
    return value.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S")


def success_mark(success: bool | None) -> str:
    """✓ passed, ✗ did not pass, - not finished yet."""
    if success is None:
        return PENDING_MARK
    return PASSED_MARK if success else FAILED_MARK


def _row(cells: Sequence[str]) -> str:
    padded = [cell.ljust(width) if width else cell for cell, (_, width) in zip(cells, COLUMNS,
                                                                               strict=True)]
    return "".join(padded).rstrip()


def jobs_table(jobs: Sequence[JobView], tz: tzinfo | None = None) -> str:
    """The `ci list` table: header, dashed rule, one row per job; no trailing newline."""
    lines = [_row([name for name, _ in COLUMNS]), "-" * RULE_WIDTH]
    for job in jobs:
        lines.append(_row([
            job.id,
            job.status.value,
            format_time(job.start_time, tz),
            format_time(job.end_time, tz),
            success_mark(job.success),
        ]))
    return "\n".join(lines)


def jobs_json(jobs: Sequence[JobView]) -> str:
    """`ci list --json`: a list of job objects, times as ISO 8601 with their UTC offset."""
    return json.dumps([job.model_dump(mode="json") for job in jobs], indent=2, ensure_ascii=False)


def result_line(end: EndData) -> str:
    """The last line of `ci submit test` / `ci wait`: how the job ended."""
    if end.status is JobStatus.COMPLETED:
        if end.success:
            return f"{PASSED_MARK} Tests passed (exit code {end.exit_code})"
        return f"{FAILED_MARK} Tests failed (exit code {end.exit_code})"
    if end.status is JobStatus.CANCELLED:
        return f"{FAILED_MARK} Job cancelled"
    return f"{FAILED_MARK} Job failed: {end.reason or 'no reason given'}"


def already_finished_line(job: JobView) -> str:
    """`ci wait` on a finished job: `Job already completed: passed`, `Job already failed: …`."""
    if job.status is JobStatus.COMPLETED:
        if job.success:
            return "Job already completed: passed"
        return f"Job already completed: tests failed (exit code {job.exit_code})"
    if job.status is JobStatus.CANCELLED:
        return "Job already cancelled"
    return f"Job already failed: {job.reason or 'no reason given'}"


def exit_code_for(success: bool | None) -> int:
    """The `ci` exit code for a job's result: 0 when its tests passed, 1 otherwise."""
    return 0 if success else 1

