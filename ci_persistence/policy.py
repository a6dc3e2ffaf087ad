"""Decisions every repository implementation shares, so they behave identically."""

from __future__ import annotations

import enum
import heapq
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime

from ci_common.errors import ControllerIdInUse, LeaseLost
from ci_common.models import (
    ControllerLease,
    EnvEntry,
    Fence,
    Job,
    JobOutcome,
    JobStatus,
    QueueSnapshot,
    TakeOver,
    WaitingJob,
)
from ci_common.wire import EndData

CANCELLED_BY_USER = "cancelled by user"
CONTROLLER_LOST = "controller lost"
POLL_BATCH = 5000  # events per poll_events call: one call stays bounded, the caller loops


def env_lru_order(entry: EnvEntry) -> tuple[datetime, str]:
    """Sort key of cached environments: least recently used (or built, or begun) first."""
    return (entry.last_used_at or entry.built_at or entry.created_at, entry.id)


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


def check_lease_free(holder: ControllerLease | None, now: datetime,
                     replace_token: str | None) -> None:
    """Raise ControllerIdInUse when a live controller other than a known-dead one holds the id."""
    if holder is None or not holder.is_alive(now) or holder.token == replace_token:
        return
    raise ControllerIdInUse(
        f"controller id {holder.id!r} is held by a live controller (host {holder.host}, "
        f"pid {holder.pid}, heartbeat {holder.heartbeat_age_s(now):.0f} s ago); stop it or "
        f"give this controller another CI_CONTROLLER_ID")


def lease_lost(fence: Fence) -> LeaseLost:
    """The refusal of a write whose fence no longer holds (see ci_common.models.Fence)."""
    return LeaseLost(f"controller {fence.controller_id!r} lost its lease (silent longer than "
                     f"CI_CONTROLLER_LEASE, or its id was taken by another controller); its "
                     f"jobs are no longer its to write")


def can_take_over(holder: ControllerLease | None, seen_token: str, now: datetime) -> bool:
    """A take-over goes ahead only on the expired lease the taker saw, unchanged since."""
    return holder is not None and holder.token == seen_token and holder.is_expired(now)


def controller_lost_outcome(gone: ControllerLease) -> JobOutcome:
    """A running job whose controller is gone and whose container no live controller can see."""
    last_seen = gone.heartbeat_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    return JobOutcome(status=JobStatus.FAILED, exit_code=None, success=False,
                      reason=f"{CONTROLLER_LOST}: controller {gone.id!r} on {gone.host} was "
                             f"last seen {last_seen}")


class Fate(enum.Enum):
    """What a take-over does with one claimed or running job of the gone controller."""

    ADOPTED = "adopted"  # becomes the taker's (same engine): recovered as after a restart
    REQUEUED = "requeued"  # claimed, no start attempted: back to the queue
    CANCELLED = "cancelled"  # claimed, not running, cancel asked: nobody will run it (again)
    # running, or claimed with a start attempted, where no live controller can see its
    # container: controller lost (it may have run, so it never runs a second time)
    FAILED = "failed"


def take_over_fate(job: Job, adopt: bool) -> Fate:
    """The fate of one claimed or running job of a gone controller in a take-over.

    The gone controller records a start attempt (fenced) before it creates the container and
    marks the job running only after starting it; a claimed job with an attempt may thus be
    running unseen on the gone one's engine. Requeueing it could run it twice: it fails as lost.
    """
    if adopt:
        return Fate.ADOPTED  # the taker sees the engine's containers: it recovers as a restart
    if job.status is JobStatus.RUNNING:
        return Fate.FAILED
    if job.cancel_requested:
        return Fate.CANCELLED  # the user's wish: it ends now, whether or not it began
    if job.start_attempted_at is not None:
        return Fate.FAILED
    return Fate.REQUEUED


@dataclass
class TakeOverFates:
    """Decides each job's fate in a take-over and collects the job ids by fate."""

    ids: dict[Fate, list[str]] = field(default_factory=lambda: {fate: [] for fate in Fate})

    def decide(self, job: Job, adopt: bool) -> Fate:
        fate = take_over_fate(job, adopt)
        self.ids[fate].append(job.id)
        return fate

    def result(self, controller_id: str) -> TakeOver:
        return TakeOver(controller_id=controller_id,
                        requeued=tuple(self.ids[Fate.REQUEUED]),
                        adopted=tuple(self.ids[Fate.ADOPTED]),
                        failed=tuple(self.ids[Fate.FAILED]),
                        cancelled=tuple(self.ids[Fate.CANCELLED]))


def claim_key(job: WaitingJob, busy: int, turn: int) -> tuple[int, int, datetime, str]:
    """The claim order of every repository: fewest busy jobs of the user; among users as busy,
    the one whose last claim is oldest (`turn`, 0 for never: round robin); then oldest, id."""
    return (busy, turn, job.created_at, job.id)


def jobs_ahead(snapshot: QueueSnapshot, wanted: Collection[str] | None = None) -> dict[str, int]:
    """How many waiting jobs will be claimed before each one, if nothing else changes.

    Replays claim_next_job's choice: each claim takes the waiting job with the smallest
    claim_key, makes its user one job busier and gives it the newest turn. So a user's own
    jobs go in age order, and a user who submits many waits between each for users with fewer
    busy jobs, or as many and an older turn. Finished jobs
    and new submissions change the answer; callers recompute when the database changed.
    With `wanted`, stops once all of those are placed. O(n log users).
    """
    per_user: dict[str, list[WaitingJob]] = {}
    for job in sorted(snapshot.waiting, key=lambda j: (j.created_at, j.id)):
        per_user.setdefault(job.user_id, []).append(job)
    busy = dict(snapshot.busy)
    turns = {job.user_id: job.turn for job in snapshot.waiting}
    last_turn = max(turns.values(), default=0)
    # One heap entry per user: the key of that user's oldest waiting job.
    heap = [(claim_key(jobs[0], busy.get(user, 0), turns[user]), user, 0)
            for user, jobs in per_user.items()]
    heapq.heapify(heap)
    remaining = None if wanted is None else set(wanted)
    ahead: dict[str, int] = {}
    while heap and (remaining is None or remaining):
        _, user, index = heapq.heappop(heap)
        job = per_user[user][index]
        ahead[job.id] = len(ahead)
        if remaining is not None:
            remaining.discard(job.id)
        busy[user] = busy.get(user, 0) + 1
        last_turn += 1  # a claim gives its user the newest turn
        turns[user] = last_turn
        if index + 1 < len(per_user[user]):
            heapq.heappush(heap, (claim_key(per_user[user][index + 1], busy[user], turns[user]),
                                  user, index + 1))
    return ahead if wanted is None else {job_id: n for job_id, n in ahead.items()
                                         if job_id in wanted}
