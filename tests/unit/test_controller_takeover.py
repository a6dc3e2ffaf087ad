"""Take-over of a gone controller's jobs, and fencing of a controller that lost its lease.

The decision (`plan_take_overs`) is checked on its own; each branch of a take-over is then
played by a real Controller against the fake runtime and the in-memory repository.
"""

# Fixtures come from test_controller_reconciler; pytest passes them in as same-named parameters.
# ruff: noqa: F811

from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, datetime, timedelta

import pytest

from ci_common.errors import LeaseLost
from ci_common.models import (
    ControllerLease,
    Fence,
    Job,
    JobStatus,
    OutputChunk,
    OutputStream,
    utcnow,
)
from ci_controller.fake_runtime import FakeRuntime, FakeScript, runner_frames
from ci_controller.reconciler import Controller
from ci_controller.runtime import ContainerStatus
from ci_controller.spec import LABEL_JOB_ID, job_container_spec
from ci_controller.supervisor import JobSupervisor
from ci_controller.takeover import plan_take_overs
from ci_persistence.policy import Fate, take_over_fate
from tests.unit.test_controller_reconciler import (
    CountingRepository,
    controllers,  # noqa: F401
    expected_lines,
    finish,
    make_controller,
    numbered,
    repo,  # noqa: F401
    runtime,  # noqa: F401
    settings,
    submit,
    text_of,
    wait_until,
)

LEASE_S = 60.0  # Settings' default CI_CONTROLLER_LEASE
NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)


# --------------------------------------------------------------------------- the decision
def lease(controller_id: str, age_s: float, engine_id: str = "", jobs: int = 1,
          stopped: bool = False) -> ControllerLease:
    when = NOW - timedelta(seconds=age_s)
    return ControllerLease(id=controller_id, host="h", pid=1, version="v", token="t",
                           started_at=when, heartbeat_at=when, stopped=stopped,
                           running_jobs=jobs, engine_id=engine_id, lease_s=LEASE_S)


def plans(*leases: ControllerLease, me: str = "me", engine: str = "e1") -> list[tuple[str, bool]]:
    return [(plan.gone.id, plan.adopt)
            for plan in plan_take_overs(list(leases), me, engine, NOW)]


def test_only_expired_controllers_with_jobs_are_taken_over() -> None:
    assert plans(lease("me", 999, "e1"), lease("fresh", 59, "e1"), lease("idle", 999, jobs=0),
                 lease("gone", 60, "e1")) == [("gone", True)]


def test_a_gone_controller_on_my_engine_is_adopted_even_if_it_stopped_gracefully() -> None:
    assert plans(lease("quit", 120, "e1", stopped=True)) == [("quit", True)]


def test_a_gone_controller_elsewhere_is_left_to_a_live_one_on_its_engine() -> None:
    assert plans(lease("gone", 120, "e2"), lease("other", 1, "e2")) == []
    # ...unless that one is gone too (or stopped): then nobody can see its containers.
    assert plans(lease("gone", 120, "e2"), lease("other", 1, "e2", jobs=0, stopped=True)) == [
        ("gone", False)]
    assert plans(lease("gone", 120, "")) == [("gone", False)]  # never reached an engine


# --------------------------------------------------------------------------- with a controller
def gone_controller(repo: CountingRepository, controller_id: str = "ctl-gone",
                    engine_id: str = "fake-engine") -> Fence:
    """A controller that took its lease 2 leases ago and has been silent since."""
    then = utcnow() - timedelta(seconds=2 * LEASE_S)
    held = repo.acquire_lease(controller_id, "host-gone", 4242, "0.1.0", then, LEASE_S)
    repo.record_engine(held.fence, engine_id)
    return held.fence


def running_under(repo: CountingRepository, runtime: FakeRuntime, fence: Fence,
                  stored_through: int) -> tuple[Job, str]:
    """A job the gone controller claimed, started and stored frames 1..stored_through of."""
    job = submit(repo)
    assert repo.claim_next_job(fence) is not None
    container_id = runtime.create(job_container_spec(settings(controller_id=fence.controller_id),
                                                     job.id, repo.installation_id()))
    runtime.start(container_id)
    repo.mark_running(job.id, container_id, utcnow(), fence=fence)
    if stored_through:
        repo.append_output(job.id, [OutputChunk(OutputStream.STDOUT,
                                                expected_lines(1, stored_through))],
                           stored_through, fence=fence)
    return job, container_id


def test_same_engine_running_job_is_adopted_with_output_exactly_once(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller]) -> None:
    runtime.default = FakeScript(steps=runner_frames(*numbered(1, 6), ("phase", "tests exited 0")))
    gone = gone_controller(repo)
    job, container_id = running_under(repo, runtime, gone, stored_through=3)
    controller = make_controller(repo, runtime, controllers)
    controller.run_once()  # takes the jobs over
    assert repo.get_job(job.id).controller_id == "ctl-1"
    controller.run_once()  # adopts the container as after a restart
    done = finish(controller, repo, job.id)
    assert (done.status, done.success, done.container_id) == (
        JobStatus.COMPLETED, True, container_id)
    assert text_of(repo, job.id) == expected_lines(1, 6)
    with pytest.raises(LeaseLost):  # the gone controller, back, may write nothing
        repo.append_output(job.id, [OutputChunk(OutputStream.STDOUT, "late\n")], 7, fence=gone)


def test_same_engine_claimed_job_is_started_by_the_taker(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller]) -> None:
    gone = gone_controller(repo)
    job = submit(repo)
    assert repo.claim_next_job(gone) is not None
    controller = make_controller(repo, runtime, controllers)
    controller.run_once()
    controller.run_once()
    done = finish(controller, repo, job.id)
    assert (done.status, done.success, done.controller_id) == (JobStatus.COMPLETED, True, "ctl-1")


def test_elsewhere_running_job_fails_as_controller_lost_and_claimed_job_is_requeued(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller]) -> None:
    gone = gone_controller(repo, engine_id="engine-of-a-dead-host")
    lost = submit(repo)
    assert repo.claim_next_job(gone) is not None
    repo.mark_running(lost.id, "container-on-the-dead-host", utcnow(), fence=gone)
    waiting = submit(repo)
    assert repo.claim_next_job(gone) is not None
    controller = make_controller(repo, runtime, controllers)
    controller.run_once()  # takes over: the waiting job is queued again and claimed at once
    failed = repo.get_job(lost.id)
    assert failed.status is JobStatus.FAILED
    assert failed.reason is not None and failed.reason.startswith(
        "controller lost: controller 'ctl-gone' on host-gone was last seen ")
    done = finish(controller, repo, waiting.id)
    assert (done.status, done.success, done.controller_id) == (JobStatus.COMPLETED, True, "ctl-1")


def test_a_gone_controllers_jobs_are_left_to_a_live_controller_on_its_engine(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller]) -> None:
    gone = gone_controller(repo, engine_id="engine-2")
    neighbour = repo.acquire_lease("ctl-neighbour", "host-2", 1, "0.1.0", utcnow(), LEASE_S)
    repo.record_engine(neighbour.fence, "engine-2")
    job = submit(repo)
    assert repo.claim_next_job(gone) is not None
    repo.mark_running(job.id, "container-on-engine-2", utcnow(), fence=gone)
    controller = make_controller(repo, runtime, controllers)
    controller.run_once()
    assert repo.get_job(job.id).controller_id == "ctl-gone"  # the neighbour's to adopt
    assert repo.get_job(job.id).status is JobStatus.RUNNING


def test_a_controller_whose_jobs_were_taken_over_stops_and_leaves_the_container(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller]) -> None:
    """The zombie: stalled past its lease, its job taken over; it must write nothing more."""
    more = threading.Event()
    runtime.default = FakeScript(steps=[
        *runner_frames(*numbered(1, 2)), more,
        *runner_frames(*numbered(3, 4), ("phase", "tests exited 0"), start=3)])
    stalled = make_controller(repo, runtime, controllers, controller_id="ctl-stalled")
    job = submit(repo)
    stalled.run_once()
    wait_until(lambda: text_of(repo, job.id) == expected_lines(1, 2))
    # Its lease expires (as seen two leases from now) and ctl-1 takes the job over.
    taker = make_controller(repo, runtime, controllers)
    seen = repo.get_lease("ctl-stalled")
    assert seen is not None
    later = utcnow() + timedelta(seconds=2 * LEASE_S)
    taken = repo.take_over(seen, taker.fence, True, later)
    assert taken is not None and taken.adopted == (job.id,)
    container = runtime.by_job(job.id)
    assert container is not None
    more.set()  # the stalled controller's next write is refused: it stops following
    wait_until(lambda: stalled.lease_lost is not None)
    assert stalled.join(5)
    assert container.id not in runtime.removed and container.signals == []
    taker.run_once()  # adopts the same container; the rest of the output, once
    done = finish(taker, repo, job.id)
    assert (done.status, done.success) == (JobStatus.COMPLETED, True)
    assert text_of(repo, job.id) == expected_lines(1, 4)
    stalled.run_once()  # it claims nothing and touches nothing any more
    assert repo.list_controller_jobs("ctl-stalled") == []


def test_run_forever_raises_lease_lost_when_the_lease_is_gone(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller]) -> None:
    controller = make_controller(repo, runtime, controllers)
    repo.acquire_lease("ctl-1", "elsewhere", 1, "0.1.0", utcnow() + timedelta(seconds=LEASE_S),
                       LEASE_S)  # the id was taken by another controller
    submit(repo)
    stop = threading.Event()
    with pytest.raises(LeaseLost, match="'ctl-1'"):
        controller.run_forever(stop)
    assert runtime.containers == {}


def test_the_sweep_spares_a_container_whose_job_another_controller_now_owns(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller]) -> None:
    """A controller back under its old id finds its old container: not its job any more."""
    hold = threading.Event()
    runtime.default = FakeScript(steps=[hold, *runner_frames(("phase", "tests exited 0"))])
    old = gone_controller(repo, controller_id="ctl-1")
    job, container_id = running_under(repo, runtime, old, stored_through=0)
    taker = make_controller(repo, runtime, controllers, controller_id="ctl-taker")
    taker.run_once()
    assert repo.get_job(job.id).controller_id == "ctl-taker"
    back = make_controller(repo, runtime, controllers)  # ctl-1 again, with a new lease
    back.run_once()
    assert container_id not in runtime.removed
    assert runtime.containers[container_id].status is ContainerStatus.RUNNING
    taker.run_once()
    hold.set()
    assert finish(taker, repo, job.id).status is JobStatus.COMPLETED


def test_failing_jobs_waits_while_a_live_controller_has_not_reached_its_engine() -> None:
    starting = lease("starting", 1, "")  # alive, engine not known yet: it may be on e2
    assert plans(lease("gone", 120, "e2"), starting) == []
    assert plans(lease("gone", 120, "e1"), starting) == [("gone", True)]  # mine: adopt


def test_a_stalled_supervisor_never_removes_the_container_of_the_new_owner(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller]) -> None:
    """A claims, stalls past its lease; B takes over and starts the job; A's thread resumes."""
    hold = threading.Event()
    runtime.default = FakeScript(steps=[hold, *runner_frames(("phase", "tests exited 0"))])
    stalled = repo.acquire_lease("ctl-a", "host-a", 1, "0.1.0", utcnow(), LEASE_S)
    job = submit(repo)
    claimed = repo.claim_next_job(stalled.fence)
    assert claimed is not None
    taker = make_controller(repo, runtime, controllers)
    seen = repo.get_lease("ctl-a")
    assert seen is not None
    assert repo.take_over(seen, taker.fence, True, utcnow() + timedelta(seconds=2 * LEASE_S))
    taker.run_once()  # starts the job afresh: claimed, never started
    wait_until(lambda: repo.get_job(job.id).status is JobStatus.RUNNING)
    running = runtime.by_job(job.id)
    assert running is not None
    lost: list[LeaseLost] = []
    resumed = JobSupervisor(settings(controller_id="ctl-a"), repo, runtime, claimed,
                            installation_id=repo.installation_id(), fence=stalled.fence,
                            on_lease_lost=lost.append)
    resumed.start()
    assert resumed.join(5) and len(lost) == 1
    assert running.id not in runtime.removed and running.signals == []
    hold.set()
    done = finish(taker, repo, job.id)
    assert (done.status, done.success, done.container_id) == (JobStatus.COMPLETED, True,
                                                              running.id)


def test_the_sweep_removes_a_finished_jobs_container_whoever_made_it(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller]) -> None:
    """A job failed as `controller lost` leaves its container on its engine: the next
    controller there, whatever its id, removes it."""
    gone = gone_controller(repo, engine_id="engine-of-a-host-that-came-back")
    job, container_id = running_under(repo, runtime, gone, stored_through=0)
    elsewhere = make_controller(repo, runtime, controllers, controller_id="ctl-elsewhere")
    runtime.identity = "another-engine"
    elsewhere.run_once()  # fails it: its engine is not this one
    assert repo.get_job(job.id).status is JobStatus.FAILED
    runtime.identity = "engine-of-a-host-that-came-back"
    newcomer = make_controller(repo, runtime, controllers)  # ctl-1, on the job's engine
    newcomer.run_once()
    assert container_id in runtime.removed


# --------------------------------------------------------------------------- start, then crash
def test_the_fate_of_a_job_depends_on_adoption_status_cancel_and_start_attempt() -> None:
    claimed = Job(id="j", user_id="u", status=JobStatus.QUEUED, created_at=NOW,
                  start_time=None, end_time=None, exit_code=None, success=None, reason=None,
                  timeout_seconds=None, archive_size=1, controller_id="gone", container_id=None,
                  cancel_requested=False, log_cursor=0, output_bytes=0, dropped_bytes=0)
    attempted = dataclasses.replace(claimed, start_attempted_at=NOW)
    running = dataclasses.replace(attempted, status=JobStatus.RUNNING, container_id="c")
    for job in (claimed, attempted, running):
        assert take_over_fate(job, adopt=True) is Fate.ADOPTED
    assert take_over_fate(claimed, adopt=False) is Fate.REQUEUED
    assert take_over_fate(attempted, adopt=False) is Fate.FAILED  # may run unseen: never twice
    assert take_over_fate(running, adopt=False) is Fate.FAILED
    for job in (claimed, attempted):
        cancelled = dataclasses.replace(job, cancel_requested=True)
        assert take_over_fate(cancelled, adopt=False) is Fate.CANCELLED


class Killed(Exception):
    """The controller process dies here (kill -9): nothing after this point happens."""


def die_between_start_and_mark(repo: CountingRepository, monkeypatch: pytest.MonkeyPatch,
                               controller_id: str) -> None:
    """mark_running of `controller_id` never happens: its container started, unrecorded."""
    mark_running = repo.mark_running

    def dying(job_id: str, container_id: str, start_time: datetime, *, fence: Fence) -> Job:
        if fence.controller_id == controller_id:
            raise Killed
        return mark_running(job_id, container_id, start_time, fence=fence)

    monkeypatch.setattr(repo, "mark_running", dying)


def count_creates(runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The job id of every container created from now on, in order."""
    created: list[str] = []
    create = runtime.create

    def counting(spec):  # type: ignore[no-untyped-def]
        created.append(spec.labels[LABEL_JOB_ID])
        return create(spec)

    monkeypatch.setattr(runtime, "create", counting)
    return created


def start_then_die(repo: CountingRepository, runtime: FakeRuntime, gone: Fence,
                   monkeypatch: pytest.MonkeyPatch) -> tuple[Job, str]:
    """The gone controller claims a job, starts its container and dies before marking it."""
    die_between_start_and_mark(repo, monkeypatch, gone.controller_id)
    job = submit(repo)
    claimed = repo.claim_next_job(gone)
    assert claimed is not None
    dying = JobSupervisor(settings(controller_id=gone.controller_id), repo, runtime, claimed,
                          installation_id=repo.installation_id(), fence=gone)
    dying.start()
    assert dying.join(5)
    container = runtime.by_job(job.id)
    assert container is not None and container.status is ContainerStatus.RUNNING
    left = repo.get_job(job.id)
    assert (left.status, left.controller_id, left.container_id) == (
        JobStatus.QUEUED, gone.controller_id, None)
    assert left.start_attempted_at is not None
    return job, container.id


def test_a_job_started_but_not_marked_by_a_dead_controller_fails_elsewhere_never_reruns(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller],
        monkeypatch: pytest.MonkeyPatch) -> None:
    hold = threading.Event()
    runtime.default = FakeScript(steps=[hold, *runner_frames(("phase", "tests exited 0"))])
    created = count_creates(runtime, monkeypatch)
    gone = gone_controller(repo, engine_id="engine-of-a-dead-host")
    job, _ = start_then_die(repo, runtime, gone, monkeypatch)
    taker = make_controller(repo, runtime, controllers)  # on "fake-engine": cannot adopt
    taker.run_once()
    lost = repo.get_job(job.id)
    assert (lost.status, lost.success) == (JobStatus.FAILED, False)
    assert lost.reason is not None and lost.reason.startswith(
        "controller lost: controller 'ctl-gone' on host-gone was last seen ")
    taker.run_once()
    hold.set()
    assert taker.join(5)
    assert created == [job.id]  # the dead controller's container, and no second run
    assert repo.count_queued_jobs() == 0 and repo.list_controller_jobs("ctl-1") == []


def test_a_job_started_but_not_marked_is_adopted_on_the_same_engine(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller],
        monkeypatch: pytest.MonkeyPatch) -> None:
    hold = threading.Event()
    runtime.default = FakeScript(steps=[hold, *runner_frames(*numbered(1, 3),
                                                             ("phase", "tests exited 0"))])
    created = count_creates(runtime, monkeypatch)
    gone = gone_controller(repo)  # on "fake-engine", as the taker
    job, container_id = start_then_die(repo, runtime, gone, monkeypatch)
    taker = make_controller(repo, runtime, controllers)
    taker.run_once()  # takes the job over
    taker.run_once()  # adopts its started container and marks it running
    wait_until(lambda: repo.get_job(job.id).status is JobStatus.RUNNING)
    hold.set()
    done = finish(taker, repo, job.id)
    assert (done.status, done.success, done.container_id) == (JobStatus.COMPLETED, True,
                                                              container_id)
    assert text_of(repo, job.id) == expected_lines(1, 3)
    assert created == [job.id]


def test_a_claim_with_no_start_attempt_is_requeued_and_its_stalled_supervisor_makes_nothing(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Stalled between claim and the start attempt: requeued, and the fence stops it later."""
    created = count_creates(runtime, monkeypatch)
    gone = gone_controller(repo, engine_id="engine-of-a-stalled-host")
    job = submit(repo)
    claimed = repo.claim_next_job(gone)
    assert claimed is not None
    taker = make_controller(repo, runtime, controllers)
    taker.run_once()  # requeues it, then claims and starts it at once
    done = finish(taker, repo, job.id)
    assert (done.status, done.success, done.controller_id) == (JobStatus.COMPLETED, True, "ctl-1")
    lost: list[LeaseLost] = []
    resumed = JobSupervisor(settings(controller_id="ctl-gone"), repo, runtime, claimed,
                            installation_id=repo.installation_id(), fence=gone,
                            on_lease_lost=lost.append)
    resumed.start()
    assert resumed.join(5) and len(lost) == 1
    assert created == [job.id]  # the taker's run only: the stalled one made no container
