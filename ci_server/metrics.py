"""`GET /metrics` of one server replica, in Prometheus' text format (prometheus-client).

    ci_jobs{status="queued"|"running"|"completed"|"failed"|"cancelled"}   gauge, from the database
    ci_queue_depth                        gauge: queued jobs no controller has claimed yet
    ci_sse_watchers                       gauge: event streams this replica is serving now
    ci_auth_failures_total                counter: requests this replica refused with 401

Replicas are stateless and share the database, so what is the database's (jobs by status, queue
depth) is read from it when Prometheus scrapes, by a custom collector: two aggregate reads, no
loop and no cache to go stale, the same numbers from every replica (aggregate them with `max`,
not `sum`). What is the replica's own (watchers, refused keys) is kept in its memory and adds
up across replicas. Job durations are observed by the controller that finished the job (see
ci_controller/metrics.py): exactly one process finishes a job, so nothing is counted twice.

Each app has its own registry, not prometheus-client's global one: several apps in one process
(tests) would otherwise share, or refuse to register, the same names.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ci_common.errors import CIError
from ci_common.repository import Repository

log = logging.getLogger(__name__)


class DatabaseCollector(Collector):
    """Jobs by status and queue depth, read from the shared database at scrape time."""

    def __init__(self, repository: Callable[[], Repository | None]) -> None:
        self._repository = repository

    def describe(self) -> list[GaugeMetricFamily]:
        # Declared up front so registering the collector does not call collect() (no database
        # read before the app has even started).
        return [_jobs_family(), _queue_family()]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        repository = self._repository()
        if repository is None:  # not started (or stopping): no database to read
            return
        try:
            by_status = repository.count_jobs_by_status()
            queued = repository.count_queued_jobs()
        except (CIError, sqlite3.Error) as exc:
            # The replica's own numbers are still worth a scrape while the database is away.
            log.warning("metrics: cannot read job counts from the database: %s", exc)
            return
        jobs = _jobs_family()
        for status, count in by_status.items():
            jobs.add_metric([status.value], count)
        queue = _queue_family()
        queue.add_metric([], queued)
        yield jobs
        yield queue


def _jobs_family() -> GaugeMetricFamily:
    return GaugeMetricFamily("ci_jobs", "Jobs in the database by status (all users).",
                             labels=["status"])


def _queue_family() -> GaugeMetricFamily:
    return GaugeMetricFamily("ci_queue_depth", "Queued jobs no controller has claimed yet.")


class ServerMetrics:
    """The registry `GET /metrics` renders, and the replica's own instruments."""

    def __init__(self, repository: Callable[[], Repository | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.sse_watchers = Gauge("ci_sse_watchers", "Event streams this replica is serving.",
                                  registry=self.registry)
        self.auth_failures = Counter("ci_auth_failures",
                                     "Requests this replica answered 401 (bad or missing key).",
                                     registry=self.registry)
        self.registry.register(DatabaseCollector(repository))
