"""Decisions every repository implementation shares, so they behave identically."""

from __future__ import annotations

from datetime import datetime

from ci_common.errors import ControllerIdInUse
from ci_common.models import ControllerLease, JobOutcome, JobStatus
from ci_common.wire import EndData

CANCELLED_BY_USER = "cancelled by user"
POLL_BATCH = 5000  # events per poll_events call: one call stays bounded, the caller loops


def cancelled_outcome() -> JobOutcome:
    """The outcome of a job cancelled before any controller started it."""
    return JobOutcome(status=JobStatus.CANCELLED, exit_code=None, success=False,
                      reason=CANCELLED_BY_USER)


def end_event_text(outcome: JobOutcome) -> str:
    """The text of a job's END event: the outcome as the wire's EndData JSON."""
    return EndData.from_outcome(outcome).model_dump_json()


def check_terminal(outcome: JobOutcome) -> None:
    """finish_job only records terminal outcomes; anything else is a programming error."""
    if not outcome.status.is_terminal:
        raise ValueError(f"finish_job needs a terminal status, not {outcome.status.value!r}")


def check_lease_free(holder: ControllerLease | None, now: datetime, lease_s: float,
                     replace_token: str | None) -> None:
    """Raise ControllerIdInUse when a live controller other than a known-dead one holds the id."""
    if holder is None or not holder.is_alive(now, lease_s) or holder.token == replace_token:
        return
    raise ControllerIdInUse(
        f"controller id {holder.id!r} is held by a live controller (host {holder.host}, "
        f"pid {holder.pid}, heartbeat {holder.heartbeat_age_s(now):.0f} s ago); stop it or "
        f"give this controller another CI_CONTROLLER_ID")
