"""Settings of the server, controller and admin CLI: one frozen object built from `CI_*` variables.

Entry points call `Settings.from_env()` once and pass the object down; library code never reads
`os.environ`. Every variable is listed in the README's configuration table.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ci_common.dburl import redact_url
from ci_common.errors import InvalidInput
from ci_common.python_images import PythonImages, parse_python_images

# Sizes live in a light module of their own (the `ci` client parses them at start-up, issue
# #10); re-exported here, where the server side looks for them.
from ci_common.sizes import DEFAULT_MAX_UPLOAD_BYTES
from ci_common.sizes import format_size as format_size
from ci_common.sizes import parse_size as parse_size


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable, with its environment variable in `metadata['env']`."""

    db_path: str = field(default="ci_jobs.db", metadata={"env": "CI_DB_PATH"})
    # PostgreSQL (postgresql://user@host:port/db); when set it wins over db_path. Never in a
    # repr or a message as is: it may hold a password (show it with database_shown()).
    database_url: str | None = field(default=None, repr=False,
                                     metadata={"env": "CI_DATABASE_URL"})

    # --- controller: which engine image, and how it runs jobs ---
    runner_image: str = field(default="python:3.12-slim", metadata={"env": "CI_RUNNER_IMAGE"})
    # Python versions jobs may choose, VERSION=IMAGE,…; unset: runner_image alone (see
    # ci_common.python_images). Servers check a job's version against it, controllers pick
    # the image by it.
    python_images_text: str | None = field(default=None, metadata={"env": "CI_PYTHON_IMAGES"})
    ca_bundle: str | None = field(default=None, metadata={"env": "CI_CA_BUNDLE"})
    container_prefix: str = field(default="ci_job_", metadata={"env": "CI_CONTAINER_PREFIX"})
    controller_id: str = field(default_factory=socket.gethostname,
                               metadata={"env": "CI_CONTROLLER_ID"})
    # A controller whose heartbeat is older than this is no longer alive; its id is free again.
    controller_lease_s: float = field(default=60.0, metadata={"env": "CI_CONTROLLER_LEASE"})
    reconcile_interval_s: float = field(default=2.0, metadata={"env": "CI_RECONCILE_INTERVAL"})
    max_concurrent_jobs: int = field(default=4, metadata={"env": "CI_MAX_CONCURRENT_JOBS"})
    job_timeout_s: float = field(default=3600.0, metadata={"env": "CI_JOB_TIMEOUT"})
    job_memory_bytes: int = field(default=2 * 1024**3, metadata={"env": "CI_JOB_MEMORY"})
    job_pids_limit: int = field(default=512, metadata={"env": "CI_JOB_PIDS"})
    job_cpus: float = field(default=1.0, metadata={"env": "CI_JOB_CPUS"})
    log_limit_bytes: int = field(default=10 * 1024**2, metadata={"env": "CI_LOG_LIMIT"})
    cancel_grace_s: float = field(default=10.0, metadata={"env": "CI_CANCEL_GRACE"})
    # Finished jobs older than this lose their output and archive (0: keep them forever).
    retention_days: float = field(default=30.0, metadata={"env": "CI_RETENTION_DAYS"})
    # Disk the installed-environment cache may use on this controller's engine (LRU beyond
    # it); 0 turns the cache off: every job installs into the container's system Python.
    env_cache_bytes: int = field(default=4 * 1024**3, metadata={"env": "CI_ENV_CACHE_SIZE"})
    # Where the controller serves its Prometheus metrics; None: not at all.
    metrics_port: int | None = field(default=None, metadata={"env": "CI_METRICS_PORT"})

    # --- server: what it accepts ---
    max_upload_bytes: int = field(default=DEFAULT_MAX_UPLOAD_BYTES,
                                  metadata={"env": "CI_MAX_UPLOAD"})
    max_unpacked_bytes: int = field(default=500 * 1024**2, metadata={"env": "CI_MAX_UNPACKED"})
    max_archive_entries: int = field(default=10_000, metadata={"env": "CI_MAX_ENTRIES"})
    # The most a submission may ask for with `timeout` (CI_JOB_TIMEOUT, the default, is the
    # operator's own choice and not bound by it).
    max_job_timeout_s: float = field(default=86_400.0, metadata={"env": "CI_MAX_JOB_TIMEOUT"})
    auth_failures_per_minute: int = field(default=30,
                                          metadata={"env": "CI_AUTH_FAILURES_PER_MINUTE"})
    sse_keepalive_s: float = field(default=15.0, metadata={"env": "CI_SSE_KEEPALIVE"})
    # CI_EVENT_POLL_INTERVAL is gone: the relay and the controller sleep in
    # Repository.wait_for_change and wake on each commit; the variable is ignored if set.

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from `CI_*` variables (default: os.environ), then apply overrides.

        Overrides whose value is None are ignored, so CLI options can be passed straight in.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f.name, f.type, raw, f.metadata["env"])
        settings = cls(**values)
        settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
        settings.python_images()  # a malformed CI_PYTHON_IMAGES stops the service at start
        return settings

    def python_images(self) -> PythonImages:
        """The Python versions jobs may ask for, with their images (the first is the default)."""
        return parse_python_images(self.python_images_text, self.runner_image)

    def database_shown(self) -> str:
        """Where the database is, for messages: the URL without its password, or the file."""
        return redact_url(self.database_url) if self.database_url else self.db_path

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Setting name → environment variable, for documentation and tests."""
        return {f.name: f.metadata["env"] for f in fields(cls)}


def _convert(name: str, type_name: Any, raw: str, env_name: str) -> Any:
    try:
        if name.endswith("_bytes"):
            return parse_size(raw)
        if type_name in ("int", "int | None"):
            return int(raw)
        if type_name in ("float",):
            return float(raw)
        return raw
    except (ValueError, InvalidInput) as exc:
        raise InvalidInput(f"{env_name}={raw!r} is not valid for {name}") from exc
