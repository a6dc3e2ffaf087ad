"""The words of a job's life: its statuses, the kinds of its events, its output streams.

Enums only, no dataclasses: the `ci` client needs these at start-up and nothing else of
`ci_common.models` (which re-exports them), so they cost it nothing to import (issue #10).
"""

from __future__ import annotations

import enum


class JobStatus(enum.StrEnum):
    """Lifecycle of a job: queued → running → one of the three terminal states."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"  # the tests ran; `success` says whether they passed
    FAILED = "failed"  # the tests could not run (install failed, timeout, OOM, lost container…)
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


class EventKind(enum.StrEnum):
    """What a job event carries."""

    STATUS = "status"  # text is the new JobStatus value (queued, running)
    OUTPUT = "output"  # text is a chunk of the job's output (stdout or stderr)
    END = "end"  # the terminal event: text is JobOutcome as JSON (see ci_common.wire)


class OutputStream(enum.StrEnum):
    STDOUT = "stdout"
    STDERR = "stderr"
