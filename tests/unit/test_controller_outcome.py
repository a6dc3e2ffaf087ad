"""Outcome decisions: one test per way a job can end."""

from __future__ import annotations

import json

import pytest

from ci_common.models import JobOutcome, JobStatus, SlowTest, TestReport
from ci_controller.outcome import (
    RunFacts,
    cancelled_before_start,
    decide_outcome,
    is_final_phase,
    report_from_phases,
    start_failed,
)


def failed(reason: str, exit_code: int | None) -> JobOutcome:
    return JobOutcome(JobStatus.FAILED, exit_code, False, reason)


@pytest.mark.parametrize("code", [0, 1, 5])
def test_pytest_ran_means_completed(code: int) -> None:
    facts = RunFacts(phases=["install started", "tests started", f"tests exited {code}"],
                     exit_code=code)
    assert decide_outcome(facts) == JobOutcome(JobStatus.COMPLETED, code, code == 0, None)


def test_install_failure() -> None:
    facts = RunFacts(phases=["install started", "install failed (exit 1)"], exit_code=100)
    assert decide_outcome(facts) == failed("dependency installation failed", 1)  # pip's code


def test_invalid_archive_keeps_the_runner_reason() -> None:
    facts = RunFacts(phases=["invalid archive: path escapes the project: ../x"], exit_code=101)
    assert decide_outcome(facts) == failed("invalid archive: path escapes the project: ../x", 101)


def test_timeout() -> None:
    facts = RunFacts(phases=["install started", "tests started"], exit_code=137, timed_out=True)
    assert decide_outcome(facts) == failed("timed out", 137)


def test_out_of_memory_without_a_verdict() -> None:
    facts = RunFacts(phases=["tests started"], exit_code=137, oom_killed=True)
    assert decide_outcome(facts) == failed("out of memory", 137)


def test_out_of_memory_explains_a_failing_test_run() -> None:
    facts = RunFacts(phases=["tests exited -9"], exit_code=137, oom_killed=True)
    assert decide_outcome(facts) == failed("out of memory", 137)


def test_passing_run_stays_passing_despite_an_oom_kill_of_a_helper() -> None:
    facts = RunFacts(phases=["tests exited 0"], exit_code=0, oom_killed=True)
    assert decide_outcome(facts).status is JobStatus.COMPLETED


def test_cancelled() -> None:
    facts = RunFacts(phases=["tests started", "terminated"], exit_code=143, cancelled=True)
    assert decide_outcome(facts) == JobOutcome(JobStatus.CANCELLED, 143, False,
                                               "cancelled by user")


def test_a_verdict_beats_a_cancel_that_came_too_late() -> None:
    facts = RunFacts(phases=["tests exited 0"], exit_code=0, cancelled=True)
    assert decide_outcome(facts) == JobOutcome(JobStatus.COMPLETED, 0, True, None)


def test_container_missing_is_lost() -> None:
    facts = RunFacts(phases=["tests started"], container_missing=True)
    assert decide_outcome(facts) == failed("container lost", None)


def test_runner_died_without_a_verdict_is_lost() -> None:
    facts = RunFacts(phases=["tests started"], exit_code=137)
    assert decide_outcome(facts) == failed("container lost", 137)


@pytest.mark.parametrize(("code", "reason"), [(100, "dependency installation failed"),
                                              (101, "invalid archive: rejected by the runner")])
def test_exit_code_stands_in_for_a_missing_phase_frame(code: int, reason: str) -> None:
    assert decide_outcome(RunFacts(exit_code=code)) == failed(reason, code)


def test_start_failure_and_cancel_before_start() -> None:
    assert start_failed("image x not found") == failed(
        "could not start container: image x not found", None)
    assert cancelled_before_start() == JobOutcome(JobStatus.CANCELLED, None, False,
                                                  "cancelled by user")


def test_final_phases() -> None:
    for text in ("tests exited 0", "install failed (exit 2)", "invalid archive: x",
                 "terminated", "runner error: boom"):
        assert is_final_phase(text)
    for text in ("install started", "tests started"):
        assert not is_final_phase(text)


# --------------------------------------------------------------------------- the test report
def _report_phase(**overrides: object) -> str:
    report: dict[str, object] = {"passed": 3, "failed": 1, "errors": 0, "skipped": 2,
                                 "duration_s": 1.25, "failing": ["tests/t.py::test_a"],
                                 "slowest": [["tests/t.py::test_a", 0.5]]}
    report.update(overrides)
    return "report " + json.dumps(report)


def test_a_completed_run_carries_the_runners_report() -> None:
    outcome = decide_outcome(RunFacts(phases=["tests started", _report_phase(),
                                              "tests exited 1"], exit_code=1))
    assert outcome.report == TestReport(passed=3, failed=1, errors=0, skipped=2, duration_s=1.25,
                                        failing=("tests/t.py::test_a",),
                                        slowest=(SlowTest("tests/t.py::test_a", 0.5),))


def test_a_forged_or_broken_report_is_ignored_and_a_huge_one_bounded() -> None:
    for bad in ("report {", "report []", _report_phase(passed=-1), _report_phase(passed="x"),
                _report_phase(duration_s=float("inf")), _report_phase(slowest=[["t", -1]]),
                _report_phase(slowest=[["t"]]), _report_phase(failing="not a list")):
        assert report_from_phases(["tests started", bad, "tests exited 0"]) is None, bad
    huge = report_from_phases([_report_phase(failing=["x" * 5000] * 500,
                                             slowest=[["y" * 5000, 1.0]] * 50)])
    assert huge is not None
    assert len(huge.failing) == 50 and all(len(t) == 1000 for t in huge.failing)
    assert len(huge.slowest) == 5 and len(huge.slowest[0].test) == 1000


def test_a_run_that_never_finished_its_tests_has_no_report() -> None:
    outcome = decide_outcome(RunFacts(phases=["tests started", _report_phase()],
                                      timed_out=True, exit_code=137))
    assert (outcome.reason, outcome.report) == ("timed out", None)
