"""The controller against a fake runtime and the in-memory repository: every way a job goes."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import timedelta

import pytest

from ci_common.errors import CIError, RuntimeUnavailable
from ci_common.models import (
    EventKind,
    Fence,
    Job,
    JobEvent,
    JobOutcome,
    JobStatus,
    OutputChunk,
    OutputStream,
    utcnow,
)
from ci_common.settings import Settings
from ci_controller.fake_runtime import FakeRuntime, FakeScript, runner_frames
from ci_controller.reconciler import Controller
from ci_controller.runtime import ContainerSpec, ContainerStatus
from ci_controller.spec import ARCHIVE_PATH, RUNNER_PATH, job_container_spec
from ci_controller.supervisor import runner_source
from ci_persistence.memory import InMemoryRepository
from tests.leases import hold_lease, owner_fence

ARCHIVE = b"PK fake zip bytes"
PASSING = FakeScript(steps=runner_frames(
    ("phase", "install started"), ("phase", "tests started"), ("stdout", "test_a PASSED\n"),
    ("stderr", "a warning\n"), ("phase", "tests exited 0")))


class CountingRepository(InMemoryRepository):
    """The in-memory repository, counting output transactions."""

    def __init__(self) -> None:
        super().__init__()
        self.append_calls = 0

    def append_output(self, job_id: str, chunks: Sequence[OutputChunk], log_cursor: int, *,
                      fence: Fence, keep_bytes: int | None = None,
                      skipped_bytes: int = 0) -> list[JobEvent]:
        self.append_calls += 1
        return super().append_output(job_id, chunks, log_cursor, fence=fence,
                                     keep_bytes=keep_bytes, skipped_bytes=skipped_bytes)


@pytest.fixture
def repo() -> CountingRepository:
    return CountingRepository()


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime(default=PASSING)


@pytest.fixture
def controllers() -> Iterator[list[Controller]]:
    made: list[Controller] = []
    yield made
    for controller in made:
        controller.detach()


def settings(**overrides: object) -> Settings:
    base = Settings(controller_id="ctl-1", container_prefix="t_", runner_image="img:test",
                    reconcile_interval_s=0.0, cancel_grace_s=0.2)
    return replace(base, **overrides)  # type: ignore[arg-type]


def make_controller(repo: InMemoryRepository, runtime: FakeRuntime,
                    made: list[Controller], **overrides: object) -> Controller:
    cfg = settings(**overrides)
    controller = Controller(cfg, repo, runtime, fence=hold_lease(repo, cfg.controller_id))
    made.append(controller)
    return controller


def submit(repo: InMemoryRepository, email: str = "a@example.com",
           timeout: float | None = None) -> Job:
    try:
        user = repo.get_user_by_email(email)
    except CIError:
        user = repo.create_user(email.split("@")[0], email)
    return repo.create_job(user.id, ARCHIVE, timeout)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


def output_of(repo: InMemoryRepository, job_id: str) -> list[tuple[OutputStream | None, str]]:
    return [(e.stream, e.text) for e in repo.list_events(job_id) if e.kind is EventKind.OUTPUT]


def text_of(repo: InMemoryRepository, job_id: str) -> str:
    return "".join(text for _, text in output_of(repo, job_id))


def finish(controller: Controller, repo: InMemoryRepository, job_id: str) -> Job:
    assert controller.join(10), "the job's supervisor did not finish"
    return repo.get_job(job_id)


def numbered(first: int, last: int) -> list[tuple[str, str]]:
    return [("stdout", f"line {i}\n") for i in range(first, last + 1)]


def expected_lines(first: int, last: int) -> str:
    return "".join(f"line {i}\n" for i in range(first, last + 1))


# ----------------------------------------------------------------------------- happy path
def test_claim_run_finish(repo: CountingRepository, runtime: FakeRuntime,
                          controllers: list[Controller], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ci_controller")
    controller = make_controller(repo, runtime, controllers)
    job = submit(repo)
    assert controller.run_once() is True
    done = finish(controller, repo, job.id)
    assert (done.status, done.success, done.exit_code, done.reason) == (
        JobStatus.COMPLETED, True, 0, None)
    assert done.container_id is not None and done.start_time is not None
    assert output_of(repo, job.id) == [(OutputStream.STDOUT, "test_a PASSED\n"),
                                       (OutputStream.STDERR, "a warning\n")]
    assert done.log_cursor == 4  # the last output frame stored
    kinds = [e.kind for e in repo.list_events(job.id)]
    assert kinds[:2] == [EventKind.STATUS, EventKind.STATUS] and kinds[-1] is EventKind.END
    # the container got the runner and the job's archive, and is gone afterwards
    container_id = done.container_id
    assert container_id in runtime.removed and runtime.by_job(job.id) is None
    spec = job_container_spec(controller.settings, job.id, repo.installation_id())
    assert runtime.removed and spec.name == f"t_{job.id}"
    messages = [r.getMessage() for r in caplog.records]
    assert any("claimed" in m and job.id in m for m in messages)
    assert any("started in container" in m for m in messages)
    assert any("finished: completed (exit 0, passed)" in m for m in messages)
    assert controller.run_once() is False  # nothing left to do


def test_the_runners_test_report_is_stored_with_the_outcome(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller]) -> None:
    summary = {"passed": 1, "failed": 1, "errors": 0, "skipped": 0, "duration_s": 0.5,
               "failing": ["tests/test_a.py::test_b"],
               "slowest": [["tests/test_a.py::test_b", 0.4]]}
    job = submit(repo)
    runtime.scripts[job.id] = FakeScript(steps=runner_frames(
        ("phase", "tests started"), ("stdout", "test_b FAILED\n"),
        ("phase", "report " + json.dumps(summary)), ("phase", "tests exited 1")), exit_code=1)
    controller = make_controller(repo, runtime, controllers)
    controller.run_once()
    done = finish(controller, repo, job.id)
    assert done.report is not None
    assert (done.report.passed, done.report.failed, done.report.failing) == (
        1, 1, ("tests/test_a.py::test_b",))
    assert "report" not in text_of(repo, job.id)  # a phase frame, never output
    end = repo.list_events(job.id)[-1]
    assert json.loads(end.text)["report"]["failed"] == 1


def test_container_gets_runner_and_archive(repo: CountingRepository,
                                           controllers: list[Controller]) -> None:
    held = threading.Event()
    runtime = FakeRuntime(default=FakeScript(steps=[held]))
    controller = make_controller(repo, runtime, controllers)
    job = submit(repo)
    controller.run_once()
    wait_until(lambda: repo.get_job(job.id).status is JobStatus.RUNNING)
    container = runtime.by_job(job.id)
    assert container is not None
    assert container.files == {RUNNER_PATH: runner_source(), ARCHIVE_PATH: ARCHIVE}
    assert container.spec == job_container_spec(controller.settings, job.id, repo.installation_id())
    held.set()
    finish(controller, repo, job.id)


def test_failing_tests_complete_unsuccessfully(repo: CountingRepository, runtime: FakeRuntime,
                                               controllers: list[Controller]) -> None:
    job = submit(repo)
    runtime.scripts[job.id] = FakeScript(steps=runner_frames(
        ("stdout", "test_a FAILED\n"), ("phase", "tests exited 1")), exit_code=1)
    controller = make_controller(repo, runtime, controllers)
    controller.run_once()
    done = finish(controller, repo, job.id)
    assert (done.status, done.success, done.exit_code) == (JobStatus.COMPLETED, False, 1)


def test_install_failure(repo: CountingRepository, runtime: FakeRuntime,
                         controllers: list[Controller]) -> None:
    job = submit(repo)
    runtime.scripts[job.id] = FakeScript(steps=runner_frames(
        ("phase", "install started"),
        ("stderr", "ERROR: No matching distribution found for nope==9\n"),
        ("phase", "install failed (exit 1)")), exit_code=100)
    controller = make_controller(repo, runtime, controllers)
    controller.run_once()
    done = finish(controller, repo, job.id)
    assert (done.status, done.reason) == (JobStatus.FAILED, "dependency installation failed")
    assert "No matching distribution" in text_of(repo, job.id)


def test_invalid_archive(repo: CountingRepository, runtime: FakeRuntime,
                         controllers: list[Controller]) -> None:
    job = submit(repo)
    runtime.scripts[job.id] = FakeScript(steps=runner_frames(
        ("phase", "invalid archive: path escapes the project: ../x")), exit_code=101)
    controller = make_controller(repo, runtime, controllers)
    controller.run_once()
    done = finish(controller, repo, job.id)
    assert done.reason == "invalid archive: path escapes the project: ../x"


# ----------------------------------------------------------------------------- cut short
def test_timeout_kills_the_container(repo: CountingRepository, runtime: FakeRuntime,
                                     controllers: list[Controller]) -> None:
    job = submit(repo, timeout=0.2)
    never = threading.Event()
    runtime.scripts[job.id] = FakeScript(steps=[*runner_frames(("phase", "tests started")),
                                                never])
    controller = make_controller(repo, runtime, controllers, job_timeout_s=3600.0)
    started = time.monotonic()
    controller.run_once()
    done = finish(controller, repo, job.id)
    assert (done.status, done.reason, done.exit_code) == (JobStatus.FAILED, "timed out", 137)
    assert 0.2 <= time.monotonic() - started < 5
    assert runtime.by_job(job.id) is None  # removed


def test_setting_timeout_applies_without_a_job_timeout(repo: CountingRepository,
                                                       runtime: FakeRuntime,
                                                       controllers: list[Controller]) -> None:
    job = submit(repo)
    runtime.scripts[job.id] = FakeScript(steps=[threading.Event()])
    controller = make_controller(repo, runtime, controllers, job_timeout_s=0.1)
    controller.run_once()
    assert finish(controller, repo, job.id).reason == "timed out"


def test_out_of_memory(repo: CountingRepository, runtime: FakeRuntime,
                       controllers: list[Controller]) -> None:
    job = submit(repo)
    runtime.scripts[job.id] = FakeScript(steps=runner_frames(("phase", "tests started")),
                                         exit_code=137, oom_killed=True)
    controller = make_controller(repo, runtime, controllers)
    controller.run_once()
    done = finish(controller, repo, job.id)
    assert (done.status, done.reason, done.exit_code) == (JobStatus.FAILED, "out of memory", 137)


def test_cancel_stops_a_running_job(repo: CountingRepository, runtime: FakeRuntime,
                                    controllers: list[Controller]) -> None:
    job = submit(repo)
    runtime.scripts[job.id] = FakeScript(steps=[*runner_frames(("stdout", "before\n")),
                                                threading.Event()])
    controller = make_controller(repo, runtime, controllers)
    controller.run_once()
    wait_until(lambda: text_of(repo, job.id) == "before\n")
    repo.request_cancel(job.id, job.user_id)
    assert controller.run_once() is True
    done = finish(controller, repo, job.id)
    assert (done.status, done.reason) == (JobStatus.CANCELLED, "cancelled by user")
    assert text_of(repo, job.id) == "before\n"
    assert runtime.removed  # and its container is gone


def test_cancel_kills_after_the_grace_period(repo: CountingRepository, runtime: FakeRuntime,
                                             controllers: list[Controller]) -> None:
    job = submit(repo)
    runtime.scripts[job.id] = FakeScript(steps=[threading.Event()], ignores_sigterm=True)
    controller = make_controller(repo, runtime, controllers, cancel_grace_s=0.1)
    controller.run_once()
    wait_until(lambda: repo.get_job(job.id).status is JobStatus.RUNNING)
    container = runtime.by_job(job.id)
    assert container is not None
    repo.request_cancel(job.id, job.user_id)
    controller.run_once()
    done = finish(controller, repo, job.id)
    assert done.status is JobStatus.CANCELLED
    assert container.signals == ["SIGTERM", "SIGKILL"]


def test_stream_that_outlives_its_container_is_closed(repo: CountingRepository,
                                                      runtime: FakeRuntime,
                                                      controllers: list[Controller]) -> None:
    job = submit(repo)
    runtime.scripts[job.id] = replace(PASSING, stream_never_ends=True)
    controller = make_controller(repo, runtime, controllers)
    started = time.monotonic()
    controller.run_once()
    assert finish(controller, repo, job.id).status is JobStatus.COMPLETED
    assert time.monotonic() - started < 1.0  # the last phase frame ends the drain early


# ----------------------------------------------------------------------------- restarts
def test_adoption_after_a_crash_stores_every_line_once(repo: CountingRepository,
                                                       runtime: FakeRuntime,
                                                       controllers: list[Controller]) -> None:
    job = submit(repo)
    hold = threading.Event()
    runtime.scripts[job.id] = FakeScript(steps=[
        *runner_frames(*numbered(1, 5)), hold,
        *runner_frames(*numbered(6, 10), ("phase", "tests exited 0"), start=6)])
    first = make_controller(repo, runtime, controllers)
    first.run_once()
    wait_until(lambda: repo.get_job(job.id).log_cursor == 5)
    first.detach()  # the controller goes away; its container keeps running
    assert first.join(5)
    assert repo.get_job(job.id).status is JobStatus.RUNNING
    hold.set()
    second = make_controller(repo, runtime, controllers)
    assert second.run_once() is True
    done = finish(second, repo, job.id)
    assert (done.status, done.success) == (JobStatus.COMPLETED, True)
    assert text_of(repo, job.id) == expected_lines(1, 10)


def test_detach_in_the_middle_of_a_frame_loses_and_repeats_nothing(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller]) -> None:
    job = submit(repo)
    hold = threading.Event()
    first_frame, second_frame, last = runner_frames(
        ("stdout", "one\n"), ("stdout", "two\n"), ("phase", "tests exited 0"))
    runtime.scripts[job.id] = FakeScript(steps=[first_frame, second_frame[:9], hold,
                                                second_frame[9:], last])
    first = make_controller(repo, runtime, controllers)
    first.run_once()
    wait_until(lambda: repo.get_job(job.id).log_cursor == 1)
    time.sleep(0.05)  # the reader holds half of frame 2 now
    first.detach()
    hold.set()
    second = make_controller(repo, runtime, controllers)
    second.run_once()
    assert finish(second, repo, job.id).status is JobStatus.COMPLETED
    assert text_of(repo, job.id) == "one\ntwo\n"


def test_adoption_of_an_exited_container_skips_stored_frames(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller]) -> None:
    # A controller stored frames 1-3, crashed; the container finished meanwhile.
    job = submit(repo)
    cfg = settings()
    claimed = repo.claim_next_job(hold_lease(repo, cfg.controller_id))
    assert claimed is not None and claimed.id == job.id
    runtime.scripts[job.id] = FakeScript(steps=runner_frames(
        *numbered(1, 6), ("phase", "tests exited 1")), exit_code=1)
    container_id = runtime.create(job_container_spec(cfg, job.id, repo.installation_id()))
    runtime.start(container_id)
    assert runtime.wait(container_id, 5)
    repo.mark_running(job.id, container_id, claimed.created_at, fence=owner_fence(repo, job.id))
    repo.append_output(job.id, [OutputChunk(OutputStream.STDOUT, expected_lines(1, 3))],
                       log_cursor=3, fence=owner_fence(repo, job.id))
    controller = make_controller(repo, runtime, controllers)
    assert controller.run_once() is True
    done = finish(controller, repo, job.id)
    assert (done.status, done.exit_code) == (JobStatus.COMPLETED, 1)
    assert text_of(repo, job.id) == expected_lines(1, 6)
    assert runtime.by_job(job.id) is None


def test_claimed_but_never_started_is_started_fresh(repo: CountingRepository,
                                                    runtime: FakeRuntime,
                                                    controllers: list[Controller]) -> None:
    job = submit(repo)
    cfg = settings()
    assert repo.claim_next_job(hold_lease(repo, cfg.controller_id)) is not None
    # created, never started
    leftover = runtime.create(job_container_spec(cfg, job.id, repo.installation_id()))
    controller = make_controller(repo, runtime, controllers)
    assert controller.run_once() is True
    done = finish(controller, repo, job.id)
    assert done.status is JobStatus.COMPLETED
    assert leftover in runtime.removed


class LateCreateRuntime(FakeRuntime):
    """The first create finds its name taken: a killed controller's create just landed."""

    def __init__(self) -> None:
        super().__init__(default=PASSING)
        self.late: str | None = None

    def create(self, spec: ContainerSpec) -> str:
        if self.late is None:
            self.late = super().create(spec)
        return super().create(spec)


def test_a_late_create_of_a_killed_controller_is_replaced(repo: CountingRepository,
                                                          controllers: list[Controller]) -> None:
    runtime = LateCreateRuntime()
    job = submit(repo)
    controller = make_controller(repo, runtime, controllers)
    controller.run_once()
    done = finish(controller, repo, job.id)
    assert (done.status, done.reason) == (JobStatus.COMPLETED, None)
    assert runtime.late in runtime.removed


def test_running_job_whose_container_is_gone_is_lost(repo: CountingRepository,
                                                     runtime: FakeRuntime,
                                                     controllers: list[Controller],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ci_controller")
    job = submit(repo)
    runtime.scripts[job.id] = FakeScript(steps=[threading.Event()])
    first = make_controller(repo, runtime, controllers)
    first.run_once()
    wait_until(lambda: repo.get_job(job.id).status is JobStatus.RUNNING)
    first.detach()
    container_id = repo.get_job(job.id).container_id
    assert container_id is not None
    runtime.remove(container_id)  # someone removed it while no controller watched
    second = make_controller(repo, runtime, controllers)
    assert second.run_once() is True
    done = repo.get_job(job.id)
    assert (done.status, done.reason, done.exit_code) == (JobStatus.FAILED, "container lost",
                                                          None)
    assert any("lost" in r.getMessage() for r in caplog.records)


def test_container_removed_under_a_running_job_is_lost(repo: CountingRepository,
                                                       runtime: FakeRuntime,
                                                       controllers: list[Controller]) -> None:
    job = submit(repo)
    runtime.scripts[job.id] = FakeScript(steps=[threading.Event()])
    controller = make_controller(repo, runtime, controllers)
    controller.run_once()
    wait_until(lambda: repo.get_job(job.id).status is JobStatus.RUNNING)
    container_id = repo.get_job(job.id).container_id
    assert container_id is not None
    runtime.remove(container_id)
    assert finish(controller, repo, job.id).reason == "container lost"


def test_sweep_removes_containers_of_finished_jobs(repo: CountingRepository,
                                                   runtime: FakeRuntime,
                                                   controllers: list[Controller]) -> None:
    job = submit(repo)
    cfg = settings()
    orphan = runtime.create(job_container_spec(cfg, job.id, repo.installation_id()))
    other = runtime.create(job_container_spec(replace(cfg, controller_id="someone-else"),
                                              "other-job", repo.installation_id()))
    repo.request_cancel(job.id, job.user_id)  # the job is over; its container is not
    controller = make_controller(repo, runtime, controllers)
    assert controller.run_once() is True
    assert orphan in runtime.removed
    assert other not in runtime.removed  # not ours


# ----------------------------------------------------------------------------- capacity
def test_concurrency_limit_is_never_exceeded(repo: CountingRepository, runtime: FakeRuntime,
                                             controllers: list[Controller]) -> None:
    release = threading.Event()
    runtime.default = FakeScript(steps=[release, *runner_frames(("phase", "tests exited 0"))])
    jobs = [submit(repo, f"u{i}@example.com") for i in range(5)]
    controller = make_controller(repo, runtime, controllers, max_concurrent_jobs=2)
    for _ in range(5):
        controller.run_once()
    wait_until(lambda: runtime.running_count() == 2)
    for _ in range(5):
        controller.run_once()
    assert controller.active_jobs() == 2
    assert repo.count_queued_jobs() == 3
    release.set()
    deadline = time.monotonic() + 10
    while not all(repo.get_job(j.id).status.is_terminal for j in jobs):
        assert time.monotonic() < deadline
        controller.run_once()
        time.sleep(0.002)
    assert runtime.max_running == 2
    assert all(repo.get_job(j.id).status is JobStatus.COMPLETED for j in jobs)


def test_claims_are_fair_between_users(repo: CountingRepository, runtime: FakeRuntime,
                                       controllers: list[Controller]) -> None:
    hold = threading.Event()
    runtime.default = FakeScript(steps=[hold])
    busy_user_jobs = [submit(repo, "busy@example.com") for _ in range(3)]
    late = submit(repo, "late@example.com")
    controller = make_controller(repo, runtime, controllers, max_concurrent_jobs=2)
    controller.run_once()
    claimed = {j.id for j in repo.list_controller_jobs("ctl-1")}
    assert claimed == {busy_user_jobs[0].id, late.id}
    hold.set()
    controller.join(10)


def test_output_is_batched_under_load(repo: CountingRepository, runtime: FakeRuntime,
                                      controllers: list[Controller]) -> None:
    job = submit(repo)
    runtime.scripts[job.id] = FakeScript(steps=[
        b"".join(runner_frames(*numbered(1, 3000))),
        *runner_frames(("phase", "tests exited 0"), start=3001)])
    controller = make_controller(repo, runtime, controllers)
    controller.run_once()
    finish(controller, repo, job.id)
    assert text_of(repo, job.id) == expected_lines(1, 3000)
    assert repo.append_calls < 100  # not a transaction per line
    assert len(output_of(repo, job.id)) < 10  # consecutive stdout merged into big events


def test_unframed_output_is_kept(repo: CountingRepository, runtime: FakeRuntime,
                                 controllers: list[Controller]) -> None:
    job = submit(repo)
    frames = runner_frames(("stdout", "framed\n"), ("phase", "tests exited 0"))
    runtime.scripts[job.id] = FakeScript(steps=[frames[0], b"raw \xff to pid 1\n", frames[1]])
    controller = make_controller(repo, runtime, controllers)
    controller.run_once()
    assert finish(controller, repo, job.id).status is JobStatus.COMPLETED
    assert text_of(repo, job.id) == "framed\nraw \ufffd to pid 1\n"


# ----------------------------------------------------------------------------- engine trouble
def test_engine_down_keeps_jobs_queued_and_logs_once(repo: CountingRepository,
                                                     runtime: FakeRuntime,
                                                     controllers: list[Controller],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ci_controller")
    runtime.available = False
    job = submit(repo)
    now = [1000.0]
    controller = Controller(settings(reconcile_interval_s=1.0), repo, runtime,
                            fence=hold_lease(repo, "ctl-1"), clock=lambda: now[0])
    controllers.append(controller)
    for _ in range(20):  # 20 loops within one retry window
        controller.run_once()
        controller.join(5)
        now[0] += 0.01
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "engine unavailable" in errors[0].getMessage()
    current = repo.get_job(job.id)
    assert (current.status, current.controller_id) == (JobStatus.QUEUED, None)
    runtime.available = True
    controller.run_once()
    assert repo.get_job(job.id).controller_id is None  # still inside the retry window
    now[0] += 60.0
    assert controller.run_once() is True
    assert finish(controller, repo, job.id).status is JobStatus.COMPLETED
    assert any("available again" in r.getMessage() for r in caplog.records)


def test_engine_lost_while_starting_releases_the_job(repo: CountingRepository,
                                                     runtime: FakeRuntime,
                                                     controllers: list[Controller]) -> None:
    job = submit(repo)
    runtime.fail["start"] = RuntimeUnavailable("engine went away")
    controller = make_controller(repo, runtime, controllers)
    controller.run_once()
    controller.join(5)
    current = repo.get_job(job.id)
    assert (current.status, current.controller_id) == (JobStatus.QUEUED, None)
    assert runtime.by_job(job.id) is None  # the half-made container is gone


def test_start_failure_fails_the_job(repo: CountingRepository, runtime: FakeRuntime,
                                     controllers: list[Controller]) -> None:
    job = submit(repo)
    runtime.fail["create"] = CIError("image img:test not found")
    controller = make_controller(repo, runtime, controllers)
    controller.run_once()
    done = finish(controller, repo, job.id)
    assert (done.status, done.reason) == (JobStatus.FAILED,
                                          "could not start container: image img:test not found")


def test_put_failure_removes_the_half_made_container(repo: CountingRepository,
                                                     runtime: FakeRuntime,
                                                     controllers: list[Controller]) -> None:
    job = submit(repo)
    runtime.fail["put_files"] = CIError("copy files: no space left")
    controller = make_controller(repo, runtime, controllers)
    controller.run_once()
    assert finish(controller, repo, job.id).reason == (
        "could not start container: copy files: no space left")
    assert runtime.by_job(job.id) is None and len(runtime.removed) == 1


# ----------------------------------------------------------------------------- the loop
def test_run_forever_starts_a_new_job_quickly_and_stops_warm(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller]) -> None:
    hold = threading.Event()
    runtime.default = FakeScript(steps=[hold])
    controller = make_controller(repo, runtime, controllers, reconcile_interval_s=30.0)
    stop = threading.Event()
    loop = threading.Thread(target=controller.run_forever, args=(stop,))
    loop.start()
    try:
        time.sleep(0.1)  # idle: the next job arrives between full reconciles
        submitted = time.monotonic()
        job = submit(repo)
        wait_until(lambda: runtime.running_count() == 1, timeout=2)
        assert time.monotonic() - submitted < 0.5
        # the running mark follows the container's start: stop only once it is recorded
        wait_until(lambda: repo.get_job(job.id).status is JobStatus.RUNNING, timeout=2)
    finally:
        stop.set()
        loop.join(10)
    assert not loop.is_alive()
    # warm stop: the container keeps running, the job stays running for the next controller
    assert runtime.running_count() == 1
    assert repo.get_job(job.id).status is JobStatus.RUNNING
    container = runtime.by_job(job.id)
    assert container is not None and container.status is ContainerStatus.RUNNING
    hold.set()


def test_a_crashed_supervisor_keeps_its_slot_until_its_container_is_adopted(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller]) -> None:
    """The container of a supervisor that died runs on: its slot must not go to another job."""
    release = threading.Event()
    runtime.default = FakeScript(steps=[release, *runner_frames(("phase", "tests exited 0"))])
    jobs = [submit(repo, "a@example.com"), submit(repo, "b@example.com")]
    runtime.fail["follow_output"] = CIError("the log stream broke")  # the first supervisor dies
    skipped_s = [0.0]  # lets the test jump over the controller's pause before re-adopting
    controller = Controller(settings(max_concurrent_jobs=1), repo, runtime,
                            fence=hold_lease(repo, "ctl-1"),
                            clock=lambda: time.monotonic() + skipped_s[0])
    controllers.append(controller)
    deadline = time.monotonic() + 10
    while not all(repo.get_job(j.id).status.is_terminal for j in jobs):
        assert time.monotonic() < deadline, "the jobs did not finish"
        controller.run_once()
        assert runtime.running_count() <= 1, "a second container started beside the orphan"
        if runtime.running_count() == 1 and not release.is_set():
            skipped_s[0] += 60.0  # past RETRY_AFTER_ERROR_S: the orphan is adopted now
            for _ in range(20):
                controller.run_once()
                assert runtime.running_count() <= 1
            release.set()
        time.sleep(0.002)
    assert runtime.max_running == 1
    assert all(repo.get_job(j.id).status is JobStatus.COMPLETED for j in jobs)


# ----------------------------------------------------------------------------- installations
def test_another_installations_containers_are_never_touched(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller]) -> None:
    """Two installations on one engine, same controller id: neither sweeps the other's jobs."""
    neighbour = InMemoryRepository()  # the other installation's database
    theirs = submit(neighbour)
    hold = threading.Event()
    runtime.scripts[theirs.id] = FakeScript(steps=[hold])  # runs until the test ends
    running = runtime.create(job_container_spec(settings(), theirs.id,
                                                neighbour.installation_id()))
    runtime.start(running)
    finished = runtime.create(job_container_spec(settings(), "finished-elsewhere",
                                                 neighbour.installation_id()))
    controller = make_controller(repo, runtime, controllers)
    job = submit(repo)
    controller.run_once()
    assert finish(controller, repo, job.id).status is JobStatus.COMPLETED
    controller.run_once()  # a full reconcile (interval 0) with the neighbour's containers there
    assert running not in runtime.removed and finished not in runtime.removed
    assert runtime.containers[running].status is ContainerStatus.RUNNING
    assert runtime.containers[running].signals == []
    hold.set()


def _legacy_spec(job_id: str) -> ContainerSpec:
    """A container as made before installation labels: job id and controller id only."""
    spec = job_container_spec(settings(), job_id, "unused")
    labels = {k: v for k, v in spec.labels.items() if k != "ci.installation_id"}
    return replace(spec, labels=labels)


def test_an_unlabelled_container_of_our_running_job_is_adopted(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller]) -> None:
    runtime.default = FakeScript(steps=runner_frames(*numbered(1, 3), ("phase", "tests exited 0")))
    job = submit(repo)
    repo.claim_next_job(hold_lease(repo, "ctl-1"))
    container_id = runtime.create(_legacy_spec(job.id))
    runtime.start(container_id)
    repo.mark_running(job.id, container_id, job.created_at, fence=owner_fence(repo, job.id))
    controller = make_controller(repo, runtime, controllers)
    controller.run_once()
    done = finish(controller, repo, job.id)
    assert (done.status, done.success) == (JobStatus.COMPLETED, True)
    assert text_of(repo, job.id) == expected_lines(1, 3)


def test_an_unlabelled_container_of_an_unknown_job_is_left_alone_and_logged_once(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ci_controller")
    stranger = runtime.create(_legacy_spec("job-of-another-installation"))
    runtime.start(stranger)
    controller = make_controller(repo, runtime, controllers)
    controller.run_once()
    controller.run_once()
    assert stranger not in runtime.removed
    assert runtime.containers[stranger].signals == []
    assert sum("no installation label" in r.getMessage() for r in caplog.records) == 1


# ----------------------------------------------------------------------------- retention
def test_the_controller_prunes_jobs_older_than_the_retention(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller]) -> None:
    old, recent = submit(repo), submit(repo, "b@example.com")
    fence = hold_lease(repo, "ctl-1")
    for job, age_days in ((old, 31), (recent, 29)):
        assert repo.claim_next_job(fence) is not None
        repo.finish_job(job.id, JobOutcome(JobStatus.CANCELLED, None, False, "cancelled by user"),
                        utcnow() - timedelta(days=age_days), fence=fence)
    off = make_controller(repo, runtime, controllers, retention_days=0.0)
    off.run_once()
    assert repo.get_job(old.id).pruned_at is None  # retention off: kept forever
    controller = make_controller(repo, runtime, controllers)  # the default: 30 days
    controller.run_once()
    assert repo.get_job(old.id).pruned_at is not None
    assert repo.get_job(recent.id).pruned_at is None


def test_the_jobs_python_and_arguments_choose_its_container_and_its_xml_is_stored(
        repo: CountingRepository, runtime: FakeRuntime, controllers: list[Controller]) -> None:
    user = repo.create_user("py", "py@example.com")
    job = repo.create_job(user.id, ARCHIVE, None, pytest_args=["-k", "a b"],
                          python_version="3.13")
    held = threading.Event()
    runtime.scripts[job.id] = FakeScript(steps=[held, *runner_frames(
        ("phase", "tests started"), ("phase", "junit <testsuites>"),
        ("phase", "junit </testsuites>"), ("phase", "tests exited 0"))])
    controller = make_controller(repo, runtime, controllers,
                                 python_images_text="3.11=img:311,3.13=img:313")
    controller.run_once()
    wait_until(lambda: runtime.by_job(job.id) is not None)
    container = runtime.by_job(job.id)
    assert container is not None and container.spec.image == "img:313"
    assert container.spec.command[-2:] == ("--pytest-args", '["-k", "a b"]')
    held.set()
    done = finish(controller, repo, job.id)
    assert done.status is JobStatus.COMPLETED, done.reason
    assert repo.get_junit(job.id) == "<testsuites></testsuites>"
    assert "testsuites" not in text_of(repo, job.id)  # phase frames, never output

    elsewhere = repo.create_job(user.id, ARCHIVE, None, python_version="3.9")
    controller.run_once()
    failed = finish(controller, repo, elsewhere.id)
    assert (failed.status, failed.reason) == (
        JobStatus.FAILED, "could not start container: no runner image for Python 3.9 on this "
                          "controller (its CI_PYTHON_IMAGES offers 3.11, 3.13)")
