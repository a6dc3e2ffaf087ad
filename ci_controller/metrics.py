"""The controller's own Prometheus metrics, served on CI_METRICS_PORT (off when unset).

    ci_controller_running_jobs                gauge: jobs being started, run or adopted now
    ci_container_start_seconds                histogram: claim → container started
    ci_job_duration_seconds{status}           histogram: start → end of the jobs it finished
    ci_engine_errors_total                    counter: times the container engine did not answer
    ci_env_cache_hits_total                   counter: jobs started from a cached environment
    ci_env_cache_misses_total                 counter: jobs that install (and cache) afresh

Job durations are observed here, by the one controller that finishes a job, rather than by the
server replicas, which all see every job and would each count it (summing them would double
it), or from the database at scrape time (a histogram over every finished job is a full scan).
A controller's histogram covers the jobs it finished since it started; Prometheus' `rate()`
and `sum by (le)` across controllers give the service's figures.

A new instrument is one line in `ControllerMetrics.__init__` and one call where it happens.
"""

from __future__ import annotations

from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ci_common.errors import CIError
from ci_common.models import JobStatus

MAX_PORT = 65535

# Seconds. A container starts in about 0.3-0.5 s on a quiet engine; seconds mean trouble.
START_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Seconds. From a tiny project (a few seconds) to the default time limit (one hour).
DURATION_BUCKETS_S = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class ControllerMetrics:
    """One controller's instruments in a registry of their own (tests run several at once)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Read at scrape time from the controller (Controller sets the function).
        self.running_jobs = Gauge("ci_controller_running_jobs",
                                  "Jobs this controller is starting, running or adopting.",
                                  registry=self.registry)
        self.container_start = Histogram("ci_container_start_seconds",
                                         "Seconds from claiming a job to its container running.",
                                         buckets=START_BUCKETS_S, registry=self.registry)
        self.job_duration = Histogram("ci_job_duration_seconds",
                                      "Seconds from start to end of the jobs this controller "
                                      "finished, by final status.", ["status"],
                                      buckets=DURATION_BUCKETS_S, registry=self.registry)
        self.engine_errors = Counter("ci_engine_errors",
                                     "Times the container engine did not answer.",
                                     registry=self.registry)

        self.env_cache_hits = Counter("ci_env_cache_hits",
                                      "Jobs started from a cached installed environment.",
                                      registry=self.registry)
        self.env_cache_misses = Counter("ci_env_cache_misses",
                                        "Jobs that installed their requirements afresh (no "
                                        "cached environment, or --no-cache).",
                                        registry=self.registry)

    def observe_job(self, status: JobStatus, start: datetime | None, end: datetime | None) -> None:
        """A job this controller finished; one that never started has no duration."""
        if start is not None and end is not None:
            self.job_duration.labels(status.value).observe(max((end - start).total_seconds(), 0))

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Serve the metrics on `port` from a daemon thread; CIError if it cannot listen there."""
        if not 1 <= port <= MAX_PORT:
            raise CIError(f"CI_METRICS_PORT={port} is not a port (1-{MAX_PORT})")
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise CIError(f"cannot serve metrics on port {port}: "
                          f"{exc.strerror or exc}") from exc
