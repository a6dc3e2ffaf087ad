"""Retention on a real SQLite file: under a steady load with pruning, the file stops growing
with output and archives; what stays per job is its row (status, times, result, report) and its
status and end events, about a kilobyte."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ci_common.models import JobOutcome, JobStatus, OutputChunk, OutputStream
from ci_persistence.sqlite import SqliteRepository
from tests.leases import hold_lease

PASSED = JobOutcome(JobStatus.COMPLETED, 0, True, None)
T0 = datetime(2026, 1, 1, tzinfo=UTC)
ROUND = 2_500  # jobs per simulated day; four days make 10,000 jobs
ARCHIVE = os.urandom(2048)  # incompressible, like a real zip
LINES = [OutputChunk(OutputStream.STDOUT, f"tests/test_{i}.py::test_x PASSED\n" * 8)
         for i in range(4)]


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def run_day(repo: SqliteRepository, user_id: str, day: int) -> None:
    fence = hold_lease(repo, "ctl")
    for _ in range(ROUND):
        job = repo.create_job(user_id, ARCHIVE, None)
        assert repo.claim_next_job(fence) is not None
        repo.mark_running(job.id, "c", T0, fence=fence)
        repo.append_output(job.id, LINES, 4, fence=fence)
        repo.finish_job(job.id, PASSED, T0 + timedelta(days=day), fence=fence)


def test_the_database_stops_growing_under_steady_load_with_retention(tmp_path: Path) -> None:
    path = tmp_path / "ci.db"
    repo = SqliteRepository(str(path))
    try:
        user = repo.create_user("Ada", "ada@example.com")
        sizes = []
        for day in range(4):
            run_day(repo, user.id, day)
            # Keep one day: everything that ended before today goes.
            while repo.prune_jobs(T0 + timedelta(days=day)).jobs:
                pass
            repo._db.connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
            sizes.append(file_bytes(path))
        assert repo.count_jobs(user.id) == 4 * ROUND  # the history stays listed
        first_day = sizes[0] / ROUND  # bytes per job with output and archive kept
        for before, after in zip(sizes[1:], sizes[2:], strict=False):
            # Freed pages are reused: a further day of load adds only the jobs' rows.
            assert (after - before) / ROUND < min(1600, first_day / 4), sizes
    finally:
        repo.close()
