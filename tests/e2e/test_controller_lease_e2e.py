"""One live controller per controller id, with real processes on one database."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from ci_common.models import Fence, utcnow
from tests.e2e.crash_helpers import (
    GatedProxy,
    StartWatch,
    assert_no_traceback,
    container_states,
    wait_for_job,
    wait_until,
)
from tests.e2e.harness import (
    PASSING_TEST,
    Deployment,
    LineReader,
    Process,
    User,
    job_id_from,
    numbered_lines_in,
    numbered_lines_test,
    on_both_backends,
    submit_async,
    write_project,
)

pytestmark = pytest.mark.docker


def controllers(dep: Deployment) -> dict[str, dict[str, object]]:
    rows = json.loads(dep.admin("controller", "list", "--json").stdout)
    return {str(row["id"]): row for row in rows}


@on_both_backends
def test_a_second_controller_with_a_live_id_is_refused(deployment: Deployment) -> None:
    first = deployment.start_controller()
    second = subprocess.run([sys.executable, "-m", "ci_controller"], env=deployment.env(),
                            cwd=deployment.workdir, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), second.stderr
    assert repr(deployment.controller_id) in lines[0] and "CI_CONTROLLER_ID" in lines[0]
    row = controllers(deployment)[deployment.controller_id]
    assert (row["pid"], row["alive"], row["stopped"]) == (first.popen.pid, True, False)

    # A crashed holder is known dead on its own host: the restart takes the id at once.
    first.kill9()
    restarted = deployment.start_controller()
    # Taking it is the restart's first act, not done within start_controller's 0.3 s (opening
    # PostgreSQL takes longer than that).
    wait_until(lambda: controllers(deployment)[deployment.controller_id]["pid"] ==
               restarted.popen.pid, 30, "the restarted controller to take the id", 0.2)

    # A graceful stop releases the lease.
    restarted.terminate()
    row = controllers(deployment)[deployment.controller_id]
    assert (row["alive"], row["stopped"]) == (False, True)


# --------------------------------------------------------------------------- take-over
LEASE_S = "3"  # CI_CONTROLLER_LEASE for these tests: a gone controller is noticed quickly
LINES = 60


@on_both_backends
def test_a_killed_controllers_running_job_is_adopted_by_another_on_its_engine(
        deployment: Deployment, tmp_path: Path) -> None:
    """kill -9 for good; a controller with another id on the same engine finishes the job."""
    dep = deployment
    server = dep.start_server()
    first = dep.start_controller(CI_CONTROLLER_LEASE=LEASE_S)
    user = dep.create_user()
    starts = StartWatch(dep)
    try:
        project = write_project(tmp_path / "p", {"test_lines.py": numbered_lines_test(LINES, 0.1)},
                                capture=False)
        live = LineReader(dep.ci_popen("submit", "test", cwd=project, server=server,
                                       api_key=user.api_key))
        live.wait_for("line 5")
        first.kill9()
        taker = dep.start_controller(CI_CONTROLLER_ID=f"taker-{dep.run_id}",
                                     CI_CONTROLLER_LEASE=LEASE_S)
        out, err, code = live.finish()
        assert code == 0, err
        assert numbered_lines_in(out) == list(range(1, LINES + 1))  # each line exactly once
        job_id = job_id_from(out + err)
        assert starts.starts(job_id) == 1  # adopted, never restarted
    finally:
        starts.close()
    job = wait_for_job(server, user.api_key, job_id)
    assert (job["status"], job["success"]) == ("completed", True)
    rows = controllers(dep)
    assert (rows[dep.controller_id]["alive"], rows[dep.controller_id]["running_jobs"]) == (
        False, 0)
    assert rows[f"taker-{dep.run_id}"]["alive"] is True
    assert_no_traceback(taker)
    wait_until(lambda: not container_states(dep), 30, "the finished job's container to go")


def ghost_claims_a_job(dep: Deployment, tmp_path: Path, started: bool
                       ) -> tuple[Process, User, str]:
    """A job submitted for real, then claimed (and, if started, marked running) by a controller
    on a host that died: its lease, last renewed a minute ago, on that host's engine.

    The gone controller's rows are written exactly as it left them; the server, the controller
    that takes over, the CLI and Docker are all real. Returns the server, the user, the job id.
    """
    server = dep.start_server()
    user = dep.create_user()
    project = write_project(tmp_path / "p", {"test_ok.py": PASSING_TEST})
    job_id = submit_async(dep, server, project, user.api_key)
    repository = dep.open_repository()
    try:
        lease = repository.acquire_lease("ghost", "dead-host", 4242, "0.1.0",
                                         utcnow() - timedelta(seconds=60), 3.0)
        repository.record_engine(lease.fence, "engine-of-the-dead-host")
        claimed = repository.claim_next_job(lease.fence)
        assert claimed is not None and claimed.id == job_id
        if started:
            repository.mark_running(job_id, "a-container-on-the-dead-host", utcnow(),
                                    fence=lease.fence)
    finally:
        repository.close()
    return server, user, job_id


def test_a_gone_controllers_claimed_job_is_queued_again_and_runs(
        deployment: Deployment, tmp_path: Path) -> None:
    dep = deployment
    # Claimed; the host died before it started the job.
    server, user, job_id = ghost_claims_a_job(dep, tmp_path, started=False)
    taker = dep.start_controller(CI_CONTROLLER_LEASE=LEASE_S)
    result = dep.ci("wait", job_id, server=server, api_key=user.api_key)
    assert result.returncode == 0, result.stderr
    assert "1 passed" in result.stdout
    job = wait_for_job(server, user.api_key, job_id)
    assert (job["status"], job["success"]) == ("completed", True)
    assert controllers(dep)["ghost"]["running_jobs"] == 0
    assert_no_traceback(taker)


@on_both_backends
def test_a_gone_controllers_running_job_elsewhere_fails_as_controller_lost(
        deployment: Deployment, tmp_path: Path) -> None:
    dep = deployment
    server, user, job_id = ghost_claims_a_job(dep, tmp_path, started=True)
    live = LineReader(dep.ci_popen("wait", job_id, server=server, api_key=user.api_key))
    taker = dep.start_controller(CI_CONTROLLER_LEASE=LEASE_S)
    out, err, code = live.finish()
    assert code == 1
    job = wait_for_job(server, user.api_key, job_id)
    assert (job["status"], job["success"]) == ("failed", False)
    assert job["reason"].startswith("controller lost: controller 'ghost' on dead-host was last "
                                    "seen "), job
    assert "controller lost" in out + err  # the user is told why, in one line
    assert not container_states(dep)  # nothing was started for it here
    assert_no_traceback(taker)


def test_a_controller_killed_between_container_start_and_running_mark_is_not_rerun_elsewhere(
        deployment: Deployment, tmp_path: Path) -> None:
    """kill -9 while the engine holds the container start; the start then lands, so the job runs
    with its row still `queued`. A controller on another engine must not run it a second time:
    it fails the job as `controller lost`, because its start attempt was recorded."""
    dep = deployment
    proxy = GatedProxy()
    proxy.start()
    starts = StartWatch(dep)
    try:
        server = dep.start_server()
        first = dep.start_controller(DOCKER_HOST=proxy.url, CI_CONTROLLER_LEASE=LEASE_S)
        user = dep.create_user()
        project = write_project(tmp_path / "p", {"test_ok.py": PASSING_TEST})
        proxy.hold(b"/start")
        job_id = submit_async(dep, server, project, user.api_key)
        proxy.wait_held(1)
        first.kill9()
        proxy.stop_holding()
        proxy.release_next()  # the dead controller's start reaches the engine: the job runs
        wait_until(lambda: container_states(dep) in (["running"], ["exited"]), 30,
                   "the late start to run the container with no controller")
        # Seen from the next controller, the dead one was on another host's engine.
        repository = dep.open_repository()
        try:
            lease = repository.get_lease(dep.controller_id)
            assert lease is not None
            repository.record_engine(Fence(dep.controller_id, lease.token),
                                     "engine-of-the-dead-host")
            left = repository.get_job(job_id)
            assert (left.status.value, left.start_attempted_at is not None) == ("queued", True)
        finally:
            repository.close()
        taker = dep.start_controller(CI_CONTROLLER_ID=f"taker-{dep.run_id}",
                                     CI_CONTROLLER_LEASE=LEASE_S)
        job = wait_for_job(server, user.api_key, job_id)
        assert f"job {job_id}: claimed" not in taker.log()  # never went back to the queue
        assert (job["status"], job["success"]) == ("failed", False), job
        assert job["reason"].startswith(f"controller lost: controller {dep.controller_id!r}"), job
        assert starts.starts(job_id) == 1  # the dead controller's run only: never a second
        assert controllers(dep)[dep.controller_id]["running_jobs"] == 0
        assert_no_traceback(taker)
        wait_until(lambda: not container_states(dep), 30, "the lost job's container to be swept")
    finally:
        starts.close()
        proxy.close()
