"""The controller: reconciles this controller's job rows with its containers.

`run_once()` compares the jobs this controller owns with the containers of its installation on
its engine (containers of another installation are never listed, let alone touched): it
forwards cancel requests, adopts containers nobody follows (after a restart or a take-over),
restarts claimed jobs whose container never started, fails running jobs whose container is
gone, takes over the jobs of controllers whose lease expired (see takeover.py), removes
containers of its finished jobs, and claims queued jobs while fewer than `max_concurrent_jobs`
run. Each job in flight is owned by a `JobSupervisor` thread.

Every write for a job carries this controller's lease (its Fence): once the lease is lost (a
take-over, or another controller took the id) the repository refuses the write with LeaseLost,
and the controller stops following its jobs and stops, leaving their containers alone.

`run_forever(stop)` calls it whenever the repository's change token moves (it sleeps in
`Repository.wait_for_change`, so a new job starts at once and an idle controller makes no
query) and at least every `reconcile_interval_s`. Stopping is warm: no new claims, running
containers are left alone and adopted by the next controller with this id.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from ci_common import retention
from ci_common.errors import CIError, LeaseLost, NotFound, RuntimeUnavailable
from ci_common.models import Fence, Job, JobOutcome, JobStatus, TakeOver, utcnow
from ci_common.repository import Repository
from ci_common.settings import Settings
from ci_controller.envstore import EnvStore
from ci_controller.metrics import ControllerMetrics
from ci_controller.outcome import REASON_CONTAINER_LOST, cancelled_before_start
from ci_controller.runtime import ContainerRuntime, ContainerState, ContainerStatus
from ci_controller.spec import LABEL_CONTROLLER_ID, LABEL_INSTALLATION_ID, LABEL_JOB_ID
from ci_controller.supervisor import JobSupervisor, describe
from ci_controller.takeover import plan_take_overs

log = logging.getLogger(__name__)

# run_forever sleeps in Repository.wait_for_change, which returns as soon as anyone commits (a
# new job starts at once). It looks at `stop` this often (one cheap token read when idle).
STOP_CHECK_S = 0.25
MIN_RECONCILE_GAP_S = 0.02  # reconciles triggered by changes alone are at least this far apart
RETRY_AFTER_ERROR_S = 5.0  # a job whose supervisor crashed is left alone this long
# While the engine is away it is probed every reconcile interval (so jobs resume within one of
# its return), but reported once per window, the window doubling from MIN to MAX: no log flood.
ENGINE_REPORT_MIN_S = 2.0
ENGINE_REPORT_MAX_S = 60.0


class Controller:
    """Runs the jobs of one controller id in containers; see the module docstring."""

    def __init__(self, settings: Settings, repository: Repository, runtime: ContainerRuntime,
                 *, fence: Fence, clock: Callable[[], float] = time.monotonic,
                 metrics: ControllerMetrics | None = None) -> None:
        self.settings = settings
        self.fence = fence  # this controller's lease, shown with every write for a job
        self.lease_lost: LeaseLost | None = None  # set once a write was refused
        self._engine_id: str | None = None  # recorded on the lease at the first engine contact
        self._clock = clock  # monotonic seconds for reconcile and retry windows (tests step it)
        self.repository = repository
        self.runtime = runtime
        self.installation_id = repository.installation_id()
        self._legacy_reported: set[str] = set()  # unlabelled containers logged once each
        self._lock = threading.Lock()
        self._supervisors: dict[str, JobSupervisor] = {}
        self._retry_at: dict[str, float] = {}  # job id → when to try adopting it again
        self._wake = threading.Event()
        self._next_full = 0.0  # monotonic time of the next full reconcile
        self._engine_down = False
        self._engine_report_s = max(settings.reconcile_interval_s, ENGINE_REPORT_MIN_S)
        self._engine_report_at = 0.0  # the next error line is due then
        self._engine_retry_at = 0.0  # the next probe of the engine is due then
        self._stopping = False
        self._prune_at = 0.0  # monotonic time of the next retention pass
        # claim → container started, for the most recent fresh starts (tests, diagnostics)
        self.start_latencies_s: deque[float] = deque(maxlen=100)
        self.metrics = metrics or ControllerMetrics()
        self.metrics.running_jobs.set_function(self.active_jobs)
        self.env_store = EnvStore(settings, repository, runtime, self.installation_id,
                                  self.metrics)

    # ------------------------------------------------------------------ public
    def active_jobs(self) -> int:
        """Jobs being started, run or adopted by this controller right now."""
        with self._lock:
            return len(self._supervisors)

    def run_once(self) -> bool:
        """One reconcile pass; True when it changed something (claimed, adopted, finished...)."""
        if self._stopping:
            return False
        did_work = False
        # Snapshot first: a job listed below without a supervisor here truly had none.
        with self._lock:
            attached = dict(self._supervisors)
        jobs = self.repository.list_controller_jobs(self.settings.controller_id)
        live = {job.id for job in jobs}
        with self._lock:  # a job no longer ours and live gives its slot back (see _claim)
            for job_id in [job_id for job_id in self._retry_at if job_id not in live]:
                del self._retry_at[job_id]
        for job in jobs:
            supervisor = attached.get(job.id)
            if supervisor is not None and job.cancel_requested and not supervisor.cancelling:
                supervisor.cancel()
                did_work = True
        now = self._clock()
        unattached = [job for job in jobs
                      if job.id not in attached and self._retry_at.get(job.id, 0.0) <= now]
        full = now >= self._next_full
        if unattached or full:
            if self._engine_down and now < self._engine_retry_at:
                return did_work
            try:
                containers = self.runtime.list({LABEL_INSTALLATION_ID: self.installation_id})
                legacy = self._legacy_containers(jobs)
                if full:
                    did_work = self._take_over_gone() or did_work
            except RuntimeUnavailable as exc:
                self.note_engine_down(exc)
                return did_work
            self._note_engine_up()
            self._next_full = now + self.settings.reconcile_interval_s
            by_job = {c.labels.get(LABEL_JOB_ID, ""): c for c in [*legacy, *containers]}
            for job in unattached:
                try:
                    did_work = self._recover(job, by_job.get(job.id)) or did_work
                except RuntimeUnavailable as exc:
                    self.note_engine_down(exc)
                    return did_work
                except LeaseLost:
                    raise
                except CIError as exc:
                    log.warning("job %s: could not take it over: %s", job.id, exc.message)
                    self._retry_at[job.id] = now + RETRY_AFTER_ERROR_S
            if full:
                did_work = self._sweep(containers, {job.id for job in jobs}) or did_work
                self._maintain_env_cache({job.id for job in jobs})
        self._retention(now)
        return self._claim() or did_work

    def run_forever(self, stop: threading.Event) -> None:
        """Reconcile until `stop` is set, then stop warmly (see the module docstring)."""
        log.info("controller %s: running up to %d jobs in %s", self.settings.controller_id,
                 self.settings.max_concurrent_jobs, self.settings.runner_image)
        token: int | None = None  # the change token the last reconcile started from
        current: int | None = None
        last_run = -MIN_RECONCILE_GAP_S
        failing = False
        try:
            while not stop.is_set() and self.lease_lost is None:
                try:
                    if current is None:
                        current = self.repository.change_token()
                    if (current != token or self._wake.is_set()
                            or self._clock() >= self._next_full):
                        # Our own output writes move the token too: at most one reconcile
                        # per gap, as when the token was polled.
                        gap = MIN_RECONCILE_GAP_S - (time.monotonic() - last_run)
                        if gap > 0 and stop.wait(gap):
                            break
                        token = current
                        self._wake.clear()
                        last_run = time.monotonic()
                        self.run_once()
                    failing = False
                    current = self.repository.wait_for_change(token, self._wait_s())
                except LeaseLost as exc:
                    self.note_lease_lost(exc)
                except Exception as exc:  # the database may be busy or gone for a while
                    if not failing:
                        message = exc.message if isinstance(exc, CIError) else str(exc)
                        log.error("controller: reconcile failed: %s", message)
                        log.debug("reconcile failure", exc_info=True)
                    failing = True
                    current = None
                    stop.wait(self.settings.reconcile_interval_s)
        finally:
            self.detach()
            log.info("controller %s: stopped; running containers are left to the next start",
                     self.settings.controller_id)
        if self.lease_lost is not None:
            raise self.lease_lost

    def _wait_s(self) -> float:
        """How long run_forever may sleep on the repository: until the next full reconcile,
        but at most STOP_CHECK_S, so a `stop` set from outside is noticed in time."""
        return max(0.0, min(self._next_full - self._clock(), STOP_CHECK_S))

    def _wake_up(self) -> None:
        """Reconcile now, though the database may not have changed."""
        self._wake.set()
        self.repository.interrupt_waits()

    def note_lease_lost(self, exc: LeaseLost) -> None:
        """A write was refused: these jobs are not ours any more. Stop (run_forever raises)."""
        with self._lock:
            first = self.lease_lost is None
            self.lease_lost = self.lease_lost or exc
        if first:
            log.error("controller %s: %s; stopping without touching its containers",
                      self.settings.controller_id, exc.message)
        self._stopping = True
        self._wake_up()

    def detach(self) -> None:
        """Warm stop: claim nothing more, store output read so far, leave containers running."""
        self._stopping = True
        with self._lock:
            supervisors = list(self._supervisors.values())
        for supervisor in supervisors:
            supervisor.detach()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no job is in flight (tests, shutdown); True when none is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                supervisors = list(self._supervisors.values())
            if not supervisors:
                return True
            for supervisor in supervisors:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                if not supervisor.join(left):
                    return False

    def note_engine_down(self, exc: RuntimeUnavailable) -> None:
        """Stop claiming until the engine answers; one error line per report window."""
        self.metrics.engine_errors.inc()
        now = self._clock()
        with self._lock:
            self._engine_retry_at = now + self.settings.reconcile_interval_s
            self._next_full = self._engine_retry_at  # no engine calls until then
            if self._engine_down and now < self._engine_report_at:
                return
            if self._engine_down:
                self._engine_report_s = min(self._engine_report_s * 2, ENGINE_REPORT_MAX_S)
            self._engine_down = True
            self._engine_report_at = now + self._engine_report_s
            report_s = self._engine_report_s
        log.error("container engine unavailable: %s; queued jobs stay queued, retrying every "
                  "%g s (next report in %.0f s)", exc.message, self.settings.reconcile_interval_s,
                  report_s)

    # ------------------------------------------------------------------ reconcile steps
    def _note_engine_up(self) -> None:
        with self._lock:
            was_down = self._engine_down
            self._engine_down = False
            self._engine_report_s = max(self.settings.reconcile_interval_s, ENGINE_REPORT_MIN_S)
        if was_down:
            log.info("container engine is available again")

    def _claim(self) -> bool:
        claimed = False
        while not self._stopping and not self._engine_down:
            # A job whose supervisor crashed keeps its slot until it is adopted again: its
            # container may still be running, and the limit counts running containers.
            if self.active_jobs() + len(self._retry_at) >= self.settings.max_concurrent_jobs:
                break
            # A read first: claiming is a write transaction, and this runs on every change.
            if self.repository.count_queued_jobs() == 0:
                break
            job = self.repository.claim_next_job(self.fence)
            if job is None:
                break
            log.info("job %s: claimed", job.id)
            self._spawn(job)
            claimed = True
        return claimed

    def _recover(self, job: Job, container: ContainerState | None) -> bool:
        """Take charge of a job of ours that no supervisor follows (after a restart)."""
        started = container is not None and container.status is not ContainerStatus.CREATED
        if started:
            assert container is not None
            self._spawn(job, container_id=container.id)
            return True
        if container is not None:  # created, never started: it never ran
            self.runtime.remove(container.id)
        if job.cancel_requested:
            self.repository.finish_job(job.id, cancelled_before_start(), utcnow(),
                                       fence=self.fence)
            log.info("job %s: finished: %s", job.id, describe(cancelled_before_start()))
        elif job.status is JobStatus.QUEUED:
            log.info("job %s: claimed but never started; starting it now", job.id)
            self._spawn(job)
        else:
            outcome = self._lost()
            self.repository.finish_job(job.id, outcome, utcnow(), fence=self.fence)
            log.info("job %s: lost: its container is gone; finished: %s", job.id,
                     describe(outcome))
        return True

    @staticmethod
    def _lost() -> JobOutcome:
        return JobOutcome(status=JobStatus.FAILED, exit_code=None, success=False,
                          reason=REASON_CONTAINER_LOST)

    def _legacy_containers(self, jobs: list[Job]) -> list[ContainerState]:
        """Containers made before installation labels existed that are surely ours.

        Such a container carries only the controller id, which another installation on this
        engine may share (it defaults to the host name). It is ours only when its job id is a
        running job of ours in this database; any other is left alone, and logged once.
        """
        running = {job.id for job in jobs if job.status is JobStatus.RUNNING}
        found = []
        for container in self.runtime.list({LABEL_CONTROLLER_ID: self.settings.controller_id}):
            if LABEL_INSTALLATION_ID in container.labels:
                continue
            if container.labels.get(LABEL_JOB_ID, "") in running:
                found.append(container)
            elif container.id not in self._legacy_reported:
                self._legacy_reported.add(container.id)
                log.info("leaving container %s alone: it has no installation label and its job "
                         "is not a running job of this installation", container.id[:12])
        return found

    def _retention(self, now: float) -> None:
        """Prune old finished jobs about once an hour (see retention.py)."""
        if now < self._prune_at:
            return
        self._prune_at = now + retention.EVERY_S
        cutoff = retention.prune_before(utcnow(), self.settings.retention_days)
        if cutoff is not None:
            retention.prune(self.repository, cutoff)

    def _take_over_gone(self) -> bool:
        """Take over the jobs of controllers whose lease expired (see takeover.py)."""
        if self._engine_id is None:
            engine_id = self.runtime.engine_id()
            self.repository.record_engine(self.fence, engine_id)
            self._engine_id = engine_id
        now = utcnow()
        plans = plan_take_overs(self.repository.list_leases(), self.settings.controller_id,
                                self._engine_id, now)
        took = False
        for plan in plans:
            done = self.repository.take_over(plan.gone, self.fence, plan.adopt, now)
            if done is not None:
                took = True
                log.warning("controller %s on %s was last seen %.0f s ago; took over its "
                            "jobs: %s", plan.gone.id, plan.gone.host,
                            plan.gone.heartbeat_age_s(now), _fates(done))
        return took

    def _sweep(self, containers: list[ContainerState], live_job_ids: set[str]) -> bool:
        """Remove containers of finished (or unknown) jobs of ours that nobody follows."""
        removed = False
        for container in containers:
            job_id = container.labels.get(LABEL_JOB_ID, "")
            with self._lock:
                followed = job_id in self._supervisors
            if job_id in live_job_ids or followed or not self._job_is_over(container):
                continue
            log.info("removing container %s of finished job %s", container.id[:12], job_id)
            self.runtime.remove(container.id)
            removed = True
        return removed

    def _maintain_env_cache(self, live_job_ids: set[str]) -> None:
        """Evict and remove cached environments (envstore.py); a failure waits for next time."""
        try:
            self.env_store.maintain(live_job_ids)
        except RuntimeUnavailable as exc:
            self.note_engine_down(exc)
        except CIError as exc:
            log.warning("environment cache upkeep failed: %s", exc.message)

    def _job_is_over(self, container: ContainerState) -> bool:
        """Whether a container of this installation that nobody here follows may be removed.

        Yes once its job is finished, whichever controller made it: that also clears
        containers of jobs failed as `controller lost` once a controller runs on their engine
        again. A job not finished belongs to whoever owns it now (a take-over moves jobs;
        labels cannot follow), so its container is left alone. A job this database does not
        know is judged by the label alone: only our own such containers are removed.
        """
        try:
            job = self.repository.get_job(container.labels.get(LABEL_JOB_ID, ""))
        except NotFound:
            return container.labels.get(LABEL_CONTROLLER_ID) == self.settings.controller_id
        return job.status.is_terminal

    def _spawn(self, job: Job, container_id: str | None = None) -> None:
        supervisor = JobSupervisor(self.settings, self.repository, self.runtime, job,
                                   installation_id=self.installation_id, fence=self.fence,
                                   on_lease_lost=self.note_lease_lost,
                                   container_id=container_id, on_done=self._supervisor_done,
                                   on_engine_down=self.note_engine_down,
                                   on_started=self.metrics.container_start.observe,
                                   claimed_at=time.monotonic(), env_store=self.env_store)
        with self._lock:
            self._supervisors[job.id] = supervisor
        self._retry_at.pop(job.id, None)
        supervisor.start()

    def _supervisor_done(self, supervisor: JobSupervisor) -> None:
        with self._lock:
            if self._supervisors.get(supervisor.job_id) is supervisor:
                del self._supervisors[supervisor.job_id]
            if supervisor.start_latency_s is not None:
                self.start_latencies_s.append(supervisor.start_latency_s)
            if supervisor.job.status.is_terminal:
                job = supervisor.job
                self.metrics.observe_job(job.status, job.start_time, job.end_time)
            if not supervisor.job.status.is_terminal:
                self._retry_at[supervisor.job_id] = self._clock() + RETRY_AFTER_ERROR_S
        self._wake_up()


def _fates(done: TakeOver) -> str:
    """`1 adopted, 2 queued again`: what a take-over did, for the log."""
    parts = [f"{len(ids)} {what}" for ids, what in (
        (done.adopted, "adopted"), (done.requeued, "queued again"),
        (done.cancelled, "cancelled (cancel was asked)"), (done.failed, "failed (controller lost)"))
        if ids]
    return ", ".join(parts) or "none left"
