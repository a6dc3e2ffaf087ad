"""Decide how a job ended from what the controller observed. Pure: no I/O.

Reasons are the ones listed in docs/DESIGN.md. The runner's last phase frame (see
`ci_controller.runner_entry`) is the primary evidence; the container's exit code stands in when
the frame is missing, and the controller's own actions (cancel, timeout) and the engine's OOM
flag explain a run that was cut short.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from pydantic import ValidationError

from ci_common.models import JobOutcome, JobStatus, TestReport
from ci_common.wire import ReportData
from ci_controller.runner_entry import (
    JUNIT_PREFIX,
    MAX_FAILING,
    MAX_JUNIT_KEPT,
    MAX_TEST_ID,
    REPORT_PREFIX,
    SLOWEST,
)

REASON_INSTALL_FAILED = "dependency installation failed"
REASON_TIMED_OUT = "timed out"
REASON_OUT_OF_MEMORY = "out of memory"
REASON_CONTAINER_LOST = "container lost"
REASON_CANCELLED = "cancelled by user"
REASON_INVALID_ARCHIVE_PREFIX = "invalid archive: "
REASON_START_FAILED_PREFIX = "could not start container: "

# Exit codes of runner_entry when its phase frame did not reach the controller.
EXIT_INSTALL_FAILED = 100
EXIT_INVALID_ARCHIVE = 101

_TESTS_EXITED = re.compile(r"tests exited (-?\d+)")
_INSTALL_FAILED = re.compile(r"install failed \(exit (-?\d+)\)")


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What the controller knows once a job's container is gone or has exited."""

    phases: Sequence[str] = ()  # texts of the runner's phase frames, in order
    exit_code: int | None = None  # the container's exit code; None when it never exited
    oom_killed: bool = False
    timed_out: bool = False  # the controller killed it at the deadline
    cancelled: bool = False  # the controller stopped it because the user asked
    container_missing: bool = False  # no container to read an exit code from


@dataclass(frozen=True, slots=True)
class RunnerResult:
    """The runner's own verdict, read from its final phase frame."""

    kind: str  # "tests", "install", "archive"
    code: int | None = None
    detail: str = ""


def runner_result(phases: Sequence[str]) -> RunnerResult | None:
    """The verdict in the last decisive phase frame, if any."""
    for text in reversed(phases):
        if match := _TESTS_EXITED.fullmatch(text):
            return RunnerResult("tests", int(match.group(1)))
        if match := _INSTALL_FAILED.fullmatch(text):
            return RunnerResult("install", int(match.group(1)))
        if text.startswith(REASON_INVALID_ARCHIVE_PREFIX):
            return RunnerResult("archive", detail=text[len(REASON_INVALID_ARCHIVE_PREFIX):])
    return None


def _failed(reason: str, exit_code: int | None) -> JobOutcome:
    return JobOutcome(status=JobStatus.FAILED, exit_code=exit_code, success=False, reason=reason)




def report_from_phases(phases: Sequence[str]) -> TestReport | None:
    """The runner's summary of pytest's JUnit XML (its last report frame), if it is sound.

    The frame comes from inside the job's container, where the tests could forge one: it is
    checked like any input, and bounded, but it only ever describes that same job.
    """
    for text in reversed(phases):
        if not text.startswith(REPORT_PREFIX):
            continue
        try:
            raw = json.loads(text[len(REPORT_PREFIX):])
            raw["slowest"] = [{"test": test, "duration_s": seconds}
                              for test, seconds in raw.get("slowest", [])]
            data = ReportData.model_validate(raw)
        except (ValueError, TypeError, KeyError, AttributeError, ValidationError):
            return None
        counts = (data.passed, data.failed, data.errors, data.skipped)
        seconds = [data.duration_s, *(slow.duration_s for slow in data.slowest)]
        if min(counts) < 0 or not all(math.isfinite(s) and s >= 0 for s in seconds):
            return None
        report = data.to_report()
        return replace(
            report,
            failing=tuple(test[:MAX_TEST_ID] for test in report.failing[:MAX_FAILING]),
            slowest=tuple(replace(slow, test=slow.test[:MAX_TEST_ID])
                          for slow in report.slowest[:SLOWEST]))
    return None


def junit_from_phases(phases: Sequence[str]) -> str | None:
    """pytest's JUnit XML from the runner's `junit` frames, joined; None without any.

    Like the report, it comes from inside the container: bounded here again (a forged
    flood is not stored) and cleaned of NUL, which PostgreSQL's TEXT cannot hold.
    """
    pieces = [text[len(JUNIT_PREFIX):] for text in phases if text.startswith(JUNIT_PREFIX)]
    if not pieces:
        return None
    xml = "".join(pieces)
    if len(xml.encode("utf-8", "replace")) > MAX_JUNIT_KEPT:
        return None
    return xml.replace("\x00", "\ufffd")


def decide_outcome(facts: RunFacts) -> JobOutcome:
    """The job's outcome: `completed` when pytest ran to the end, otherwise why not."""
    result = runner_result(facts.phases)
    if result is None:
        # Cut short: by us (cancel, deadline), by the kernel (OOM), or by something else.
        if facts.cancelled:
            return JobOutcome(status=JobStatus.CANCELLED, exit_code=facts.exit_code,
                              success=False, reason=REASON_CANCELLED)
        if facts.timed_out:
            return _failed(REASON_TIMED_OUT, facts.exit_code)
        if facts.container_missing:
            return _failed(REASON_CONTAINER_LOST, None)
        if facts.oom_killed:
            return _failed(REASON_OUT_OF_MEMORY, facts.exit_code)
        if facts.exit_code == EXIT_INSTALL_FAILED:
            return _failed(REASON_INSTALL_FAILED, facts.exit_code)
        if facts.exit_code == EXIT_INVALID_ARCHIVE:
            return _failed(REASON_INVALID_ARCHIVE_PREFIX + "rejected by the runner",
                           facts.exit_code)
        # Exited without a verdict: the runner died (killed from outside, engine restarted...).
        return _failed(REASON_CONTAINER_LOST, facts.exit_code)
    # A verdict that reached us beats a cancel or deadline that came too late to matter; an
    # OOM kill explains a failed run better than pytest's exit code does.
    if facts.oom_killed and not (result.kind == "tests" and result.code == 0):
        return _failed(REASON_OUT_OF_MEMORY, facts.exit_code)
    if result.kind == "tests":
        assert result.code is not None
        return JobOutcome(status=JobStatus.COMPLETED, exit_code=result.code,
                          success=result.code == 0, reason=None,
                          report=report_from_phases(facts.phases),
                          junit_xml=junit_from_phases(facts.phases))
    if result.kind == "install":
        return _failed(REASON_INSTALL_FAILED, result.code)  # pip's code, not the runner's
    return _failed(REASON_INVALID_ARCHIVE_PREFIX + result.detail, facts.exit_code)


def start_failed(message: str) -> JobOutcome:
    """The outcome of a job whose container could not be started."""
    return _failed(REASON_START_FAILED_PREFIX + message, None)


def cancelled_before_start() -> JobOutcome:
    """The outcome of a claimed job cancelled before its container started."""
    return JobOutcome(status=JobStatus.CANCELLED, exit_code=None, success=False,
                      reason=REASON_CANCELLED)


_FINAL_PREFIXES = ("tests exited ", "install failed ", REASON_INVALID_ARCHIVE_PREFIX, "terminated",
                   "runner error: ")


def is_final_phase(text: str) -> bool:
    """Whether a phase frame is the runner's last word (nothing but stray bytes follows it)."""
    return text.startswith(_FINAL_PREFIXES)
