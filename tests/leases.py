"""Controller leases for tests that write for jobs the way a controller does.

Every controller write for a job carries the lease's Fence (see ci_common.models.Fence); these
helpers give a test the fence a live controller would hold.
"""

from __future__ import annotations

from ci_common.models import Fence, utcnow
from ci_common.repository import Repository


def hold_lease(repo: Repository, controller_id: str, lease_s: float = 60.0) -> Fence:
    """The fence of the live lease on controller_id, taking the lease if nobody holds it."""
    held = repo.get_lease(controller_id)
    if held is not None and held.is_alive(utcnow()):
        return held.fence
    return repo.acquire_lease(controller_id, "test-host", 1, "test", utcnow(), lease_s).fence


TEST_CONTROLLER = "test-controller"


def owner_fence(repo: Repository, job_id: str) -> Fence:
    """The fence of the controller that claimed the job.

    An unclaimed job is claimed first by TEST_CONTROLLER, as a controller would before writing
    for it; it must then be the job the queue hands out next.
    """
    owner = repo.get_job(job_id).controller_id
    if owner is None:
        claimed = repo.claim_next_job(hold_lease(repo, TEST_CONTROLLER))
        assert claimed is not None and claimed.id == job_id, f"job {job_id} is not next"
        owner = TEST_CONTROLLER
    return hold_lease(repo, owner)
