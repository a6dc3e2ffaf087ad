"""What `ci` prints: the jobs table (as in the README), times, result lines."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

from ci_client import render
from ci_client.wire import EndData, JobView, ReportData, SlowTestData
from ci_common.models import JobStatus

T0 = datetime(2025, 10, 12, 19, 30, 0, tzinfo=UTC)


REPORT = ReportData(passed=40, failed=2, errors=0, skipped=1, duration_s=3.21,
                    failing=["tests/test_a.py::test_one", "tests/test_b.py::TestX::test_two"],
                    slowest=[SlowTestData(test="tests/test_a.py::test_slow", duration_s=1.5)])


def job(job_id: str, status: JobStatus, *, success: bool | None = None,
        start: datetime | None = None, end: datetime | None = None,
        exit_code: int | None = None, reason: str | None = None,
        report: ReportData | None = None) -> JobView:
    return JobView(id=job_id, status=status, success=success, exit_code=exit_code, reason=reason,
                   created_at=T0, start_time=start, end_time=end, report=report)


def test_table_matches_the_readme_example() -> None:
    jobs = [
        job("1222e26a-e4d2-4dda-8ffa-ba333257cc1b", JobStatus.COMPLETED, success=True,
            start=T0, end=T0 + timedelta(seconds=5), exit_code=0, report=REPORT),
        job("7ad3f8c9-2b41-4e89-9c12-5a8e7b3d1f4e", JobStatus.RUNNING,
            start=T0 + timedelta(minutes=1, seconds=10)),
    ]
    expected = "\n".join([
        "JOB ID                                 STATUS       START TIME             END TIME"
        "               SUCCESS   TESTS",
        "-" * 130,
        "1222e26a-e4d2-4dda-8ffa-ba333257cc1b   completed    2025-10-12 19:30:00    "
        "2025-10-12 19:30:05    ✓         2 failed, 40 passed, 1 skipped",
        "7ad3f8c9-2b41-4e89-9c12-5a8e7b3d1f4e   running      2025-10-12 19:31:10    "
        "N/A                    -         -",
    ])
    assert render.jobs_table(jobs, tz=UTC) == expected


def test_table_marks_and_unset_times() -> None:
    table = render.jobs_table([
        job("a" * 36, JobStatus.COMPLETED, success=False, start=T0, end=T0, exit_code=1),
        job("b" * 36, JobStatus.QUEUED),
        job("c" * 36, JobStatus.FAILED, success=False, end=T0, reason="timed out"),
        job("d" * 36, JobStatus.CANCELLED, success=False),
    ], tz=UTC)
    rows = table.splitlines()[2:]
    assert [row.split()[1] for row in rows] == ["completed", "queued", "failed", "cancelled"]
    assert [row.split()[-2] for row in rows] == ["✗", "-", "✗", "✗"]
    assert [row.split()[-1] for row in rows] == ["-", "-", "-", "-"]  # no test counts
    assert rows[1].split()[2:] == ["N/A", "N/A", "-", "-"]
    assert rows[2].split()[2] == "N/A"


def test_times_are_shown_in_the_local_zone() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert render.format_time(T0, plus_two) == "2025-10-12 21:30:00"
    assert render.format_time(None) == "N/A"


def test_json_has_the_documented_fields_in_order() -> None:
    payload = json.loads(render.jobs_json([job("x", JobStatus.COMPLETED, success=True,
                                                start=T0, end=T0, exit_code=0)]))
    assert list(payload[0]) == ["id", "status", "success", "exit_code", "reason", "created_at",
                                "start_time", "end_time", "report", "pruned_at",
                                "pytest_args", "python_version"]
    assert payload[0]["status"] == "completed" and payload[0]["success"] is True
    assert datetime.fromisoformat(payload[0]["start_time"]) == T0
    assert json.loads(render.jobs_json([])) == []


def test_result_lines() -> None:
    def end(status: JobStatus, success: bool, exit_code: int | None,
            reason: str | None = None) -> str:
        return render.result_line(EndData(status=status, success=success, exit_code=exit_code,
                                          reason=reason))
    assert end(JobStatus.COMPLETED, True, 0) == "✓ Tests passed (exit code 0)"
    assert end(JobStatus.COMPLETED, False, 1) == "✗ Tests failed (exit code 1)"
    assert (end(JobStatus.FAILED, False, None, "dependency installation failed")
            == "✗ Job failed: dependency installation failed")
    assert end(JobStatus.CANCELLED, False, None, "cancelled by user") == "✗ Job cancelled"


def test_already_finished_lines_and_exit_codes() -> None:
    passed = job("x", JobStatus.COMPLETED, success=True, exit_code=0)
    failed = job("x", JobStatus.FAILED, success=False, reason="out of memory")
    assert render.already_finished_line(passed) == "Job already completed: passed"
    assert render.already_finished_line(failed) == "Job already failed: out of memory"
    assert render.already_finished_line(job("x", JobStatus.COMPLETED, success=False,
                                            exit_code=2)) == (
        "Job already completed: tests failed (exit code 2)")
    assert render.already_finished_line(job("x", JobStatus.CANCELLED, success=False)) == (
        "Job already cancelled")
    assert [render.exit_code_for(s) for s in (True, False, None)] == [0, 1, 1]


def test_report_lines_count_like_pytest_and_list_the_failing_tests() -> None:
    assert render.report_lines(REPORT) == [
        "✗ 2 failed, 40 passed, 1 skipped in 3.2 s",
        "  tests/test_a.py::test_one",
        "  tests/test_b.py::TestX::test_two",
    ]
    clean = ReportData(passed=3, failed=0, errors=0, skipped=0, duration_s=0.04)
    assert render.report_lines(clean) == ["✓ 3 passed in 0.0 s"]
    many = ReportData(passed=0, failed=60, errors=1, skipped=0, duration_s=1.0,
                      failing=[f"t::{i}" for i in range(50)])
    assert render.report_lines(many)[0] == "✗ 60 failed, 1 error in 1.0 s"
    assert render.report_lines(many)[-1] == "  … and 11 more"
    nothing = ReportData(passed=0, failed=0, errors=0, skipped=0, duration_s=0.0)
    assert render.report_lines(nothing) == ["✓ no tests ran in 0.0 s"]


def test_details_show_counts_failing_and_slowest_tests() -> None:
    shown = render.job_details(job("j", JobStatus.COMPLETED, success=False, start=T0,
                                   end=T0 + timedelta(seconds=4), exit_code=1, report=REPORT),
                               tz=UTC)
    lines = shown.splitlines()
    assert "Tests:     2 failed, 40 passed, 1 skipped in 3.2 s" in lines
    assert "Failing:   tests/test_a.py::test_one" in lines
    assert "Slowest:   1.50 s  tests/test_a.py::test_slow" in lines
    assert "Duration:  4.0 s" in lines
