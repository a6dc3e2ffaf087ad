"""The installed-environment cache's I/O: its rows in the repository, its volumes on the engine.

Decisions are in `envcache.py`. One `EnvStore` per controller, shared by its job supervisors
(each calls `prepare` before creating its container and `settle` once the job ended, from its
own thread: nothing here serialises jobs) and its reconcile pass (`maintain`: evict beyond the
budget, remove the volumes of entries marked `removing`, and of builds that died).

Entries live in the database so `ci-admin cache list|prune` works without Docker; volumes live
on one engine, so each controller looks after the entries of its own engine only. A volume is
recorded (state building) before it is created, so a labelled volume without a row is always a
leftover. Volumes a job of this controller mounts are never removed under it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

from ci_common.errors import CIError, NotFound, RuntimeUnavailable
from ci_common.models import EnvKey, EnvState, Job, utcnow
from ci_common.repository import Repository
from ci_common.settings import Settings, format_size
from ci_controller.envcache import (
    LABEL_ENV,
    MISS_NOTE,
    NO_CACHE,
    NO_CACHE_NOTE,
    EnvMode,
    EnvPlan,
    env_report,
    hit_note,
    new_volume_name,
    plan_eviction,
)
from ci_controller.metrics import ControllerMetrics
from ci_controller.runtime import ContainerRuntime
from ci_controller.spec import LABEL_CONTROLLER_ID, LABEL_INSTALLATION_ID

log = logging.getLogger(__name__)


class EnvStore:
    """Finds, builds, settles and removes cached environments on this controller's engine."""

    def __init__(self, settings: Settings, repository: Repository, runtime: ContainerRuntime,
                 installation_id: str, metrics: ControllerMetrics | None = None) -> None:
        self._settings = settings
        self._repository = repository
        self._runtime = runtime
        self._installation_id = installation_id
        self._metrics = metrics or ControllerMetrics()
        self._lock = threading.Lock()
        self._in_use: Counter[str] = Counter()  # volume → jobs of ours mounting it now
        self._engine_id: str | None = None

    @property
    def enabled(self) -> bool:
        return self._settings.env_cache_bytes > 0

    def _engine(self) -> str:
        if self._engine_id is None:
            self._engine_id = self._runtime.engine_id()
        return self._engine_id

    def in_use(self) -> set[str]:
        with self._lock:
            return {volume for volume, count in self._in_use.items() if count > 0}

    def _hold(self, volume: str) -> None:
        with self._lock:
            self._in_use[volume] += 1

    def release(self, plan: EnvPlan) -> None:
        """The job of this plan is over: its volume may be evicted or removed again."""
        if plan.entry is None:
            return
        with self._lock:
            self._in_use[plan.entry.volume] -= 1
            if self._in_use[plan.entry.volume] <= 0:
                del self._in_use[plan.entry.volume]

    # ------------------------------------------------------------------ one job
    def prepare(self, job: Job, sha256: str | None) -> EnvPlan:
        """The job's plan: use a ready entry of its key, or build a new one.

        Never fails the job: a cache that cannot be used (a database or engine error other
        than the engine being down) means installing as without it. RuntimeUnavailable passes
        (the job goes back to the queue).
        """
        if not self.enabled or sha256 is None:
            return NO_CACHE
        try:
            # The job's own image (its Python version picks it): its id pins the interpreter.
            image = self._settings.python_images().image_for(job.python_version)
            key = EnvKey(user_id=job.user_id, engine_id=self._engine(),
                         image_id=self._runtime.image_id(image), requirements_sha256=sha256)
            if not job.no_cache:
                plan = self._hit(key)
                if plan is not None:
                    self._metrics.env_cache_hits.inc()
                    return plan
            volume = new_volume_name(self._settings.container_prefix)
            entry = self._repository.begin_env(key, volume, job.id, utcnow())
            self._hold(volume)
            try:
                self._runtime.create_volume(volume, self._labels())
            except CIError:
                self.release(EnvPlan(EnvMode.BUILD, entry))
                self._repository.retire_envs([entry.id])
                raise
        except RuntimeUnavailable:
            raise
        except CIError as exc:
            log.warning("job %s: environment cache unavailable, installing without it: %s",
                        job.id, exc.message)
            return NO_CACHE
        self._metrics.env_cache_misses.inc()
        return EnvPlan(EnvMode.BUILD, entry, NO_CACHE_NOTE if job.no_cache else MISS_NOTE)

    def _hit(self, key: EnvKey) -> EnvPlan | None:
        entry = self._repository.find_env(key)
        if entry is None:
            return None
        self._hold(entry.volume)  # from here on, maintain() leaves the volume alone
        if not self._runtime.volume_exists(entry.volume):
            # Gone from the engine (a `docker volume prune`, a new data root): rebuild.
            log.warning("cached environment %s: its volume %s is gone; rebuilding", entry.id,
                        entry.volume)
            self.release(EnvPlan(EnvMode.USE, entry))
            self._repository.retire_envs([entry.id])
            return None
        now = utcnow()
        self._repository.touch_env(entry.id, now)
        return EnvPlan(EnvMode.USE, entry, hit_note(entry, now))

    def settle(self, job: Job, plan: EnvPlan | None, phases: list[str]) -> None:
        """After the job: a successful build becomes ready, anything else built is retired,
        a broken entry is retired. `plan` is None for a job adopted after a restart."""
        report = env_report(phases)
        try:
            if plan is None:
                plan = self._adopted_plan(job, report.broken_id)
            entry = plan.entry
            if entry is None:
                return
            if plan.mode is EnvMode.BUILD:
                if report.built_id == entry.id:
                    ready = self._repository.env_built(entry.id, report.python_version,
                                                       report.size_bytes, utcnow())
                    if ready is not None:
                        log.info("job %s: cached its environment %s (%s)", job.id, entry.id,
                                 format_size(ready.size_bytes))
                        return
                self._repository.retire_envs([entry.id])  # failed, cut short, or pruned
            elif report.broken_id == entry.id:
                log.warning("job %s: cached environment %s was unusable (%s); removing it",
                            job.id, entry.id, report.broken_reason)
                self._repository.retire_envs([entry.id])
        except CIError as exc:  # maintain() retires a build whose job is over
            log.warning("job %s: could not settle its cached environment: %s", job.id,
                        exc.message)
        finally:
            if plan is not None:
                self.release(plan)

    def _adopted_plan(self, job: Job, broken_id: str | None) -> EnvPlan:
        """An adopted job's plan as far as settling needs it: the entry it built, or the
        entry of its user it found broken."""
        for entry in self._repository.list_envs(self._engine()):
            if entry.job_id == job.id and entry.state is EnvState.BUILDING:
                self._hold(entry.volume)
                return EnvPlan(EnvMode.BUILD, entry)
            if entry.id == broken_id and entry.key.user_id == job.user_id:
                self._hold(entry.volume)
                return EnvPlan(EnvMode.USE, entry)
        return NO_CACHE

    # ------------------------------------------------------------------ reconcile
    def maintain(self, live_job_ids: set[str]) -> None:
        """Evict beyond the budget, retire builds whose job is gone, remove retired volumes."""
        if not self.enabled and not self._repository.list_envs(self._engine()):
            return
        # Volumes first, rows second: a volume listed here had its row written before it.
        volumes: set[str] = set(self._runtime.list_volumes(self._labels(own_controller=False)))
        entries = self._repository.list_envs(self._engine())
        in_use = self.in_use()
        retire = [entry for entry in entries if entry.state is EnvState.BUILDING
                  and entry.job_id not in live_job_ids and entry.volume not in in_use
                  and self._job_is_over(entry.job_id)]
        retire += plan_eviction(entries, self._settings.env_cache_bytes, in_use)
        if retire:
            for entry in retire:
                log.info("cached environment %s (%s): retiring it (%s)", entry.id,
                         format_size(entry.size_bytes),
                         "build ended" if entry.state is EnvState.BUILDING else "evicted, LRU")
            self._repository.retire_envs([entry.id for entry in retire])
            entries = self._repository.list_envs(self._engine())
        known = {entry.volume for entry in self._repository.list_envs()}
        for entry in entries:
            if (entry.state is EnvState.REMOVING and entry.volume not in in_use
                    and self._runtime.remove_volume(entry.volume)):
                self._repository.delete_env(entry.id)
        for volume in volumes - known - in_use:
            log.info("removing leftover environment volume %s", volume)
            self._runtime.remove_volume(volume)

    def _job_is_over(self, job_id: str) -> bool:
        """Whether a build's job ended (or is unknown): another controller on this engine may
        still be running it."""
        try:
            return self._repository.get_job(job_id).status.is_terminal
        except NotFound:
            return True

    def _labels(self, own_controller: bool = True) -> dict[str, str]:
        labels = {LABEL_ENV: "1", LABEL_INSTALLATION_ID: self._installation_id}
        if own_controller:
            labels[LABEL_CONTROLLER_ID] = self._settings.controller_id
        return labels
