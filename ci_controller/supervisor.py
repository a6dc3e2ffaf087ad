"""One job from claim (or adoption) to finish: a thread that owns the job's container.

Starting: record the start attempt (fenced), create the container, copy in runner_entry.py and
the job's source.zip, start it, then mark the job running. Running: follow the output into the
repository and wait on the container in this one place, killing it at the deadline; a cancel
from the controller stops it (SIGTERM, SIGKILL after the grace period). Finishing: drain the
output, read the exit code and OOM flag, record the outcome, remove the container.

A detached supervisor (warm stop of the controller) leaves the container alone: the next
controller adopts it and resumes the output after the job's log cursor.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from ci_common.errors import CIError, DatabaseUnavailable, LeaseLost, RuntimeUnavailable
from ci_common.models import Fence, Job, JobOutcome, JobStatus, utcnow
from ci_common.repository import Repository
from ci_common.settings import Settings
from ci_controller import runner_entry
from ci_controller.envcache import NO_CACHE, EnvPlan, requirements_sha256
from ci_controller.envstore import EnvStore
from ci_controller.follower import OutputFollower
from ci_controller.outcome import (
    RunFacts,
    cancelled_before_start,
    decide_outcome,
    runner_result,
    start_failed,
)
from ci_controller.runtime import ContainerRuntime, ContainerStatus
from ci_controller.spec import (
    ARCHIVE_PATH,
    LABEL_CONTROLLER_ID,
    LABEL_INSTALLATION_ID,
    LABEL_JOB_ID,
    RUNNER_PATH,
    job_container_spec,
)

log = logging.getLogger(__name__)

WAIT_SLICE_S = 1.0  # the longest a supervisor is deaf to a detach while waiting on its container
DRAIN_S = 2.0  # after exit, how long to wait for the rest of a killed container's output
EXIT_AFTER_VERDICT_S = 5.0  # how long a failed run's verdict waits for its container to exit
FINISH_RETRY_MAX_S = 2.0  # the longest pause between attempts to record an outcome


def runner_source() -> bytes:
    """The bytes of runner_entry.py, as copied into every job container."""
    return Path(runner_entry.__file__).read_bytes()


def describe(outcome: JobOutcome) -> str:
    """`completed (exit 0)`, `failed (timed out)`: one state change for the log."""
    if outcome.status is JobStatus.COMPLETED:
        verdict = "passed" if outcome.success else "tests failed"
        return f"completed (exit {outcome.exit_code}, {verdict})"
    return f"{outcome.status.value} ({outcome.reason})"


class _ExitWatch:
    """Waits for a container's exit in its own thread, so the supervisor can wake on either."""

    def __init__(self, runtime: ContainerRuntime, container_id: str, detached: threading.Event,
                 wake: threading.Event) -> None:
        self.exited = threading.Event()
        self._failure: BaseException | None = None
        self._runtime = runtime
        self._container_id = container_id
        self._detached = detached
        self._wake = wake
        threading.Thread(target=self._wait, daemon=True,
                         name=f"exit-{container_id[:8]}").start()

    def _wait(self) -> None:
        try:
            while not self._detached.is_set():
                if self._runtime.wait(self._container_id, WAIT_SLICE_S):
                    self.exited.set()
                    return
        except BaseException as exc:  # re-raised in the supervisor's thread
            self._failure = exc
        finally:
            self._wake.set()

    def raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


class JobSupervisor:
    """Runs (or adopts) one job's container in a thread until the job is finished."""

    def __init__(self, settings: Settings, repository: Repository, runtime: ContainerRuntime,
                 job: Job, *, installation_id: str, fence: Fence,
                 container_id: str | None = None,
                 on_done: Callable[[JobSupervisor], None] = lambda supervisor: None,
                 on_engine_down: Callable[[RuntimeUnavailable], None] = lambda exc: None,
                 on_lease_lost: Callable[[LeaseLost], None] = lambda exc: None,
                 on_started: Callable[[float], None] = lambda latency_s: None,
                 claimed_at: float | None = None, env_store: EnvStore | None = None) -> None:
        self.job = job
        self._env_store = env_store
        self._env_plan: EnvPlan | None = None  # None: adopted (the store finds its entry)
        self._env_sha256 = ""
        self._env_settled = False
        self._fence = fence
        self._on_lease_lost = on_lease_lost
        self._settings = settings
        self._repository = repository
        self._runtime = runtime
        self._installation_id = installation_id
        self._adopting = container_id is not None
        self._container_id = container_id
        self._on_done = on_done
        self._on_engine_down = on_engine_down
        self._on_started = on_started  # claim → container started, in seconds
        self._claimed_at = claimed_at if claimed_at is not None else time.monotonic()
        self._lock = threading.Lock()
        self._cancelled = False
        self._stop_sent = False
        self._detached = threading.Event()
        self._wake = threading.Event()  # set on detach, container exit, or the runner's verdict
        self._follower: OutputFollower | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"job-{job.id[:8]}")
        self.start_latency_s: float | None = None  # claim → container started

    @property
    def job_id(self) -> str:
        return self.job.id

    @property
    def cancelling(self) -> bool:
        return self._cancelled

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True when it ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ requests from outside
    def cancel(self) -> None:
        """The user asked: stop the container (SIGTERM, then SIGKILL after the grace period)."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            container_id = self._container_id if not self._stop_sent else None
            if container_id is not None:
                self._stop_sent = True
        log.info("job %s: cancel requested, stopping its container", self.job_id)
        if container_id is not None:
            self._stop_in_background(container_id)

    def detach(self) -> None:
        """Warm stop: store what was read, leave the container running for the next controller."""
        self._detached.set()
        self._wake.set()
        follower = self._follower
        if follower is not None:
            follower.detach()

    def _stop_in_background(self, container_id: str) -> None:
        # docker's stop blocks for the whole grace period: never on the controller's loop.
        def stop() -> None:
            try:
                self._runtime.stop(container_id, self._settings.cancel_grace_s)
            except CIError as exc:
                log.warning("job %s: stopping the container failed: %s", self.job_id, exc.message)

        threading.Thread(target=stop, daemon=True, name=f"stop-{self.job_id[:8]}").start()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            if self._adopting:
                self._adopt()
            else:
                self._start_fresh()
        except RuntimeUnavailable as exc:
            log.warning("job %s: container engine unavailable (%s); the job is resumed when it "
                        "answers again", self.job_id, exc.message)
            self._detach_follower()
            self._on_engine_down(exc)
        except LeaseLost as exc:
            # Whoever holds the job now may be following this very container: leave it be.
            log.warning("job %s: no longer this controller's; stopped following it and left "
                        "its container alone", self.job_id)
            self._detach_follower()
            self._on_lease_lost(exc)
        except Exception:
            log.exception("job %s: supervising the container failed; it will be re-adopted",
                          self.job_id)
            self._detach_follower()
        finally:
            if not self._env_settled and self._env_plan is not None and self._env_store:
                self._env_store.release(self._env_plan)  # the next supervisor settles it
            self._on_done(self)

    def _settle_env(self, phases: list[str]) -> None:
        """Record what became of the job's environment (see envstore.EnvStore.settle)."""
        if self._env_store is None or self._env_settled:
            return
        self._env_settled = True
        self._env_store.settle(self.job, self._env_plan, phases)

    def _detach_follower(self) -> None:
        if self._follower is not None:
            self._follower.detach()

    def _start_fresh(self) -> None:
        job = self.job
        if job.cancel_requested or self._cancelled:
            self._finish(cancelled_before_start())
            return
        # Fenced, before the container can exist: from here on a take-over from another engine
        # fails the job as lost rather than requeueing it (it may run before mark_running).
        self.job = job = self._repository.mark_start_attempt(job.id, utcnow(), fence=self._fence)
        container_id: str | None = None
        try:
            for leftover in self._runtime.list(self._own_labels(job)):
                self._runtime.remove(leftover.id)
            archive = self._repository.get_archive(job.id)
            self._env_plan = NO_CACHE  # a fresh start: never settled as an adopted job
            if self._env_store is not None:
                sha256 = requirements_sha256(archive)
                self._env_sha256 = sha256 or ""
                self._env_plan = self._env_store.prepare(job, sha256)
            container_id = self._create(job)
            self._runtime.put_files(container_id, {RUNNER_PATH: runner_source(),
                                                   ARCHIVE_PATH: archive})
            self._runtime.start(container_id)
        except RuntimeUnavailable as exc:
            self._remove_quietly(container_id)
            self._settle_env([])
            self._repository.release_job(job.id, fence=self._fence)
            log.warning("job %s: released back to the queue: %s", job.id, exc.message)
            self._on_engine_down(exc)
            return
        except CIError as exc:
            self._remove_quietly(container_id)
            outcome = start_failed(exc.message)
            self._finish(outcome)
            self._settle_env([])
            return
        self.start_latency_s = time.monotonic() - self._claimed_at
        self._on_started(self.start_latency_s)
        with self._lock:
            self._container_id = container_id
            stop_now = self._cancelled and not self._stop_sent
            self._stop_sent = self._stop_sent or stop_now
        if stop_now:
            self._stop_in_background(container_id)
        self.job = self._repository.mark_running(job.id, container_id, utcnow(),
                                                 fence=self._fence)
        log.info("job %s: started in container %s (%.0f ms after claim)", job.id,
                 container_id[:12], self.start_latency_s * 1000)
        self._follow(container_id, stored_through=0)

    def _own_labels(self, job: Job) -> dict[str, str]:
        """Labels of this job's containers made by this controller id, in this installation.

        Only those are leftovers to remove before a fresh start. Should this controller have
        stalled past its lease, the job may already run in a container another controller made
        after taking it over: that one carries the other's id and is never touched here.
        """
        return {LABEL_JOB_ID: job.id, LABEL_INSTALLATION_ID: self._installation_id,
                LABEL_CONTROLLER_ID: self._fence.controller_id}

    def _create(self, job: Job) -> str:
        """Create the job's container, replacing one a killed controller's late request made."""
        spec = job_container_spec(self._settings, job.id, self._installation_id,
                                  pytest_args=job.pytest_args, python_version=job.python_version,
                                  env=self._env_plan or NO_CACHE,
                                  requirements_sha256=self._env_sha256)
        try:
            return self._runtime.create(spec)
        except RuntimeUnavailable:
            raise
        except CIError:
            # A create sent just before the previous controller was killed can reach the engine
            # after the leftover check: the name is then taken by a container that never ran.
            leftovers = self._runtime.list(self._own_labels(job))
            if not leftovers or any(c.status is not ContainerStatus.CREATED for c in leftovers):
                raise
        for leftover in leftovers:
            log.info("job %s: removing container %s, created by an earlier attempt and never "
                     "started", job.id, leftover.id[:12])
            self._runtime.remove(leftover.id)
        return self._runtime.create(spec)

    def _adopt(self) -> None:
        job = self.job
        container_id = self._container_id
        assert container_id is not None
        if job.status is JobStatus.QUEUED:
            # It started, but the controller stopped before recording that.
            self.job = self._repository.mark_running(job.id, container_id, utcnow(),
                                                     fence=self._fence)
        log.info("job %s: adopted container %s, resuming after output frame %d", job.id,
                 container_id[:12], job.log_cursor)
        if job.cancel_requested:
            self.cancel()
        self._follow(container_id, stored_through=job.log_cursor)

    def _deadline(self) -> float:
        """The monotonic time at which the job times out."""
        limit = self.job.timeout_seconds or self._settings.job_timeout_s
        started: datetime = self.job.start_time or utcnow()
        elapsed = (utcnow() - started).total_seconds()
        return time.monotonic() + limit - max(elapsed, 0.0)

    def _follow(self, container_id: str, stored_through: int) -> None:
        follower = OutputFollower(self.job_id, self._runtime.follow_output(container_id),
                                  self._repository, stored_through,
                                  self._settings.log_limit_bytes, fence=self._fence,
                                  on_verdict=self._wake.set, on_lease_lost=self._wake.set)
        follower.start()
        self._follower = follower
        if self._detached.is_set():  # detach() ran before the follower was there to stop
            follower.detach()
            return
        exit_watch = _ExitWatch(self._runtime, container_id, self._detached, self._wake)
        deadline = self._deadline()
        timed_out = False
        # Wake on whichever comes first: the container's exit, or the runner's verdict frame.
        # The verdict is the end of the job for the user; the container's teardown (~0.1 s)
        # need not stand between the last line of pytest and the result.
        while not self._detached.is_set():
            self._wake.clear()
            exit_watch.raise_failure()
            follower.raise_lease_lost()
            if exit_watch.exited.is_set() or follower.verdict_seen.is_set():
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0 and not timed_out:
                timed_out = True
                log.info("job %s: timed out, killing its container", self.job_id)
                self._runtime.kill(container_id)
            self._wake.wait(WAIT_SLICE_S if timed_out
                            else min(WAIT_SLICE_S, max(remaining, 0.001)))
        if self._detached.is_set():
            return
        follower.finish(DRAIN_S)
        if self._detached.is_set():
            return
        # Docker (20.10 here, cgroup v1) sets State.OOMKilled only once the container has exited,
        # even when the kernel killed pytest long before: unless the tests passed (where an OOM
        # kill changes nothing), wait for the exit, which follows the runner's verdict at once.
        verdict = runner_result(follower.phases)
        if not (verdict is not None and verdict.kind == "tests" and verdict.code == 0):
            exit_watch.exited.wait(EXIT_AFTER_VERDICT_S)
        state = self._runtime.inspect(container_id)
        exited = exit_watch.exited.is_set()
        facts = RunFacts(
            phases=follower.phases,
            exit_code=state.exit_code if state is not None and exited else None,
            oom_killed=state.oom_killed if state is not None else False,
            timed_out=timed_out,
            cancelled=self._cancelled,
            container_missing=state is None,
        )
        # The environment first: once the user sees the result, a next job can start from it
        # (and a controller stopped right after the result loses no finished build).
        self._settle_env(follower.phases)
        self._finish(decide_outcome(facts))
        if not exit_watch.exited.wait(self._settings.cancel_grace_s):
            log.warning("job %s: the runner reported but its container did not exit; killing "
                        "it", self.job_id)
            with contextlib.suppress(CIError):
                self._runtime.kill(container_id)
        self._remove_quietly(container_id)

    def _finish(self, outcome: JobOutcome) -> None:
        # The outcome is known only here (the container may be gone soon): while the database
        # is away, keep it and try again rather than leave the job to a re-adoption.
        # finish_job is fenced and idempotent, so a commit whose answer was lost is harmless.
        delay = 0.1
        while True:
            try:
                self.job = self._repository.finish_job(self.job_id, outcome, utcnow(),
                                                       fence=self._fence)
                break
            except DatabaseUnavailable as exc:
                if self._detached.is_set():
                    raise
                if delay == 0.1:
                    log.warning("job %s: recording its end failed (%s); retrying", self.job_id,
                                exc.message)
                self._detached.wait(delay)
                delay = min(delay * 2, FINISH_RETRY_MAX_S)
        log.info("job %s: finished: %s", self.job_id, describe(self.job_outcome(outcome)))

    def job_outcome(self, fallback: JobOutcome) -> JobOutcome:
        """The outcome as recorded (the first one wins if someone else finished the job)."""
        job = self.job
        if not job.status.is_terminal:
            return fallback
        return JobOutcome(status=job.status, exit_code=job.exit_code, success=bool(job.success),
                          reason=job.reason)

    def _remove_quietly(self, container_id: str | None) -> None:
        if container_id is None:
            return
        try:
            self._runtime.remove(container_id)
        except CIError as exc:
            # The controller's periodic sweep removes containers of finished jobs.
            log.warning("job %s: could not remove container %s: %s", self.job_id,
                        container_id[:12], exc.message)
