"""Which gone controllers' jobs this controller takes over, and how: a decision, no I/O.

A controller is gone when its lease expired: no heartbeat for the `CI_CONTROLLER_LEASE` it
runs with (a graceful stop counts too, once that long has passed without a restart). Its
claimed and running jobs go to a live controller on the same Docker engine when there is one:
that one adopts them (it sees their containers), exactly as after a restart. Where no live
controller shares the engine, any live controller takes them: claimed jobs go back to the
queue, running ones fail as `controller lost`, and so do claimed ones whose start was attempted
(they may be running unseen; see ci_persistence.policy.take_over_fate). The repository's
`take_over` makes the change atomically, after checking the lease is still as seen, so of
several controllers deciding at once only one acts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ci_common.models import ControllerLease


@dataclass(frozen=True, slots=True)
class TakeOverPlan:
    """Take the jobs of `gone`; adopt them when this controller shares its engine."""

    gone: ControllerLease
    adopt: bool


def plan_take_overs(leases: list[ControllerLease], me: str, my_engine: str,
                    now: datetime) -> list[TakeOverPlan]:
    """The take-overs controller `me`, running on engine `my_engine`, should attempt now."""
    live_engines = {lease.engine_id for lease in leases
                    if lease.engine_id and lease.is_alive(now)}
    # A live controller that has not reached its engine yet may be on the gone one's engine:
    # failing jobs it could adopt would be wrong, so only same-engine adoptions go ahead.
    engine_unknown = any(lease.is_alive(now) and not lease.engine_id and lease.id != me
                         for lease in leases)
    plans = []
    for lease in leases:
        if lease.id == me or lease.running_jobs == 0 or not lease.is_expired(now):
            continue
        if lease.engine_id and lease.engine_id == my_engine:
            plans.append(TakeOverPlan(lease, adopt=True))
        elif lease.engine_id in live_engines or engine_unknown:
            continue  # a live controller on its engine sees its containers: that one adopts
        else:
            plans.append(TakeOverPlan(lease, adopt=False))
    return plans
