"""Retention: every so often, remove the output and archives of old finished jobs.

Run by every controller (pruning is idempotent and each pass is one short transaction, so
several controllers sharing a database do no harm). `ci-admin jobs prune` does it on demand.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta

from ci_common.errors import InvalidInput
from ci_common.models import PruneResult
from ci_common.repository import Repository
from ci_common.settings import format_size

log = logging.getLogger(__name__)

EVERY_S = 3600.0  # how often a controller prunes
MAX_PASSES = 20  # passes per run (500 jobs each): a backlog is worked off over several runs


def prune_before(now: datetime, retention_days: float) -> datetime | None:
    """The cutoff: jobs that ended before it are pruned; None when retention is off."""
    if retention_days <= 0:
        return None
    return now - timedelta(days=retention_days)


_AGE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "": 86400}


def parse_age(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `2w`, `3600s`; a bare number is days. Raises InvalidInput."""
    match = _AGE.fullmatch(text)
    if match is None:
        raise InvalidInput(f"not an age: {text!r} (use e.g. 30d, 12h, 90m)")
    seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if seconds > timedelta.max.total_seconds() / 2:
        raise InvalidInput(f"not an age: {text!r} (too large)")
    return timedelta(seconds=seconds)


def prune(repository: Repository, cutoff: datetime, max_passes: int = MAX_PASSES) -> PruneResult:
    """Prune in short passes until nothing is left (or max_passes ran); the total."""
    jobs = freed = 0
    for _ in range(max_passes):
        done = repository.prune_jobs(cutoff)
        jobs, freed = jobs + done.jobs, freed + done.freed_bytes
        if done.jobs == 0:
            break
    if jobs:
        log.info("retention: removed the output and archives of %d jobs finished before %s "
                 "(%s)", jobs, cutoff.strftime("%Y-%m-%d %H:%M UTC"), format_size(freed))
    return PruneResult(jobs=jobs, freed_bytes=freed)
