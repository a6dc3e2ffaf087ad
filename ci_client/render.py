"""What the `ci` command prints, as pure functions: the jobs table, times and result lines."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, tzinfo

from ci_client.wire import EndData, JobView, ReportData, dumps
from ci_common.statuses import JobStatus

# Column widths of the README's example table (`ci list`), the last column unpadded.
COLUMNS = (("JOB ID", 39), ("STATUS", 13), ("START TIME", 23), ("END TIME", 23),
           ("SUCCESS", 10), ("TESTS", 0))
RULE_WIDTH = 130
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
            PENDING_MARK if job.report is None else counts_text(job.report),
        ]))
    return "\n".join(lines)


def counts_text(report: ReportData) -> str:
    """`2 failed, 40 passed, 1 skipped`, in pytest's words and order; zero counts left out."""
    parts = [f"{count} {word}" for count, word in (
        (report.failed, "failed"), (report.passed, "passed"), (report.skipped, "skipped"),
        (report.errors, "error" if report.errors == 1 else "errors")) if count]
    return ", ".join(parts) or "no tests ran"


def report_lines(report: ReportData) -> list[str]:
    """After the result line: `✗ 2 failed, 40 passed in 3.2 s`, then each failing test id."""
    mark = FAILED_MARK if report.failed or report.errors else PASSED_MARK
    lines = [f"{mark} {counts_text(report)} in {report.duration_s:.1f} s"]
    lines += [f"  {test}" for test in report.failing]
    shown, total = len(report.failing), report.failed + report.errors
    if total > shown:
        lines.append(f"  … and {total - shown} more")
    return lines


def jobs_json(jobs: Sequence[JobView]) -> str:
    """`ci list --json`: a list of job objects, times as ISO 8601 with their UTC offset."""
    return dumps(list(jobs))


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


def job_outcome_line(job: JobView) -> str:
    """A job's result in the words of `result_line`, or where it stands while not finished."""
    if not job.status.is_terminal:
        return f"{PENDING_MARK} {job.status.value}"
    return result_line(EndData(status=job.status, exit_code=job.exit_code,
                               success=bool(job.success), reason=job.reason))


def duration(job: JobView) -> str:
    """`12.3 s` from start to end (or `N/A` while it has not both started and ended)."""
    if job.start_time is None or job.end_time is None:
        return NOT_SET
    return f"{(job.end_time - job.start_time).total_seconds():.1f} s"


def job_details(job: JobView, tz: tzinfo | None = None) -> str:
    """`ci show`: one job, one field per line."""
    fields = [
        ("Job", job.id),
        ("Status", job.status.value),
        ("Result", job_outcome_line(job)),
        ("Reason", job.reason or NOT_SET),
        ("Exit code", NOT_SET if job.exit_code is None else str(job.exit_code)),
        ("Submitted", format_time(job.created_at, tz)),
        ("Started", format_time(job.start_time, tz)),
        ("Ended", format_time(job.end_time, tz)),
        ("Duration", duration(job)),
        ("Python", job.python_version or "the server's default"),
        # pytest's arguments from `--`; a label no longer than the others keeps the column
        ("Arguments", _shell_words(job.pytest_args)),
    ]
    if job.pruned_at is not None:
        fields.append(("Output", f"removed {format_time(job.pruned_at, tz)} (retention)"))
    report = job.report
    if report is not None:
        fields.append(("Tests", f"{counts_text(report)} in {report.duration_s:.1f} s"))
        fields += [("Failing", test) for test in report.failing]
        fields += [("Slowest", f"{slow.duration_s:.2f} s  {slow.test}") for slow in report.slowest]
    width = max(len(name) for name, _ in fields) + 2
    return "\n".join(f"{(name + ':').ljust(width)}{value}" for name, value in fields)


def cancel_line(job_id: str, job: JobView) -> str:
    """What `ci cancel` says once the job is over: cancelled, or how it had finished."""
    if job.status is JobStatus.CANCELLED:
        return f"Job {job_id} cancelled"
    return f"Job {job_id} had already finished; nothing to cancel: {job_outcome_line(job)}"


def exit_code_for(success: bool | None) -> int:
    """The `ci` exit code for a job's result: 0 when its tests passed, 1 otherwise."""
    return 0 if success else 1



def _shell_words(args: Sequence[str]) -> str:
    """The arguments as a shell would take them back, `none` when there are none."""
    if not args:
        return "none"
    import shlex  # noqa: PLC0415 - `ci show` only, not on `ci list`'s way (issue #10)

    return shlex.join(args)
