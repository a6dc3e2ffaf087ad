"""The installed-environment cache: decisions only (no I/O). `envstore.py` does the I/O.

After a job's requirements installed successfully, the virtualenv they went into is kept in a
Docker volume; later jobs of the same key (user, engine, runner image id, SHA-256 of
requirements.txt) mount it read-only at the same path and skip pip. Rules, and where each is
kept:

- never shared between users: the user id is part of the key, and a volume is mounted only
  into jobs whose key it was built for (install scripts are user code);
- only a successful install is cached: the runner reports `env built` only after pip and the
  pytest check succeeded, before the tests start (a frame after `tests started` is ignored:
  the tests could forge one);
- a missing, half-written or broken entry is rebuilt, never a failed job: the runner checks a
  marker written last into the environment and installs afresh when it is not sound;
- bounded: ready entries beyond the disk budget are evicted least recently used first.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import uuid
import zipfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

from ci_common.models import EnvEntry, EnvState
from ci_common.settings import format_size
from ci_controller.runner_entry import (
    ENV_BROKEN_PREFIX,
    ENV_BUILT_PREFIX,
    ENV_USED_PREFIX,
    TESTS_STARTED,
    InvalidArchive,
    safe_relative_parts,
)

ENV_DIR = "/ci/env"  # where every cached environment lives: a virtualenv is not relocatable
LABEL_ENV = "ci.env_cache"  # on the volumes the cache made (value "1")
MAX_REQUIREMENTS_BYTES = 1024 * 1024  # a larger requirements.txt is installed uncached
MISS_NOTE = "installing dependencies (no cached environment)"
NO_CACHE_NOTE = "installing dependencies (--no-cache: a fresh environment replaces the cached one)"


class EnvMode(enum.StrEnum):
    """What the runner does with the environment (its `--env-mode`)."""

    NONE = "none"  # no cache: install into the container's system Python, as before
    BUILD = "build"  # install into a new volume at ENV_DIR, report `env built`
    USE = "use"  # the volume at ENV_DIR holds a ready environment: check it, use it


@dataclass(frozen=True, slots=True)
class EnvPlan:
    """How one job's container gets its environment."""

    mode: EnvMode
    entry: EnvEntry | None = None  # the entry being built or used
    note: str = ""  # the line the job's output starts with


NO_CACHE = EnvPlan(EnvMode.NONE)


@dataclass(frozen=True, slots=True)
class EnvReport:
    """What the runner said about the environment, from the phases before the tests."""

    built_id: str | None = None
    python_version: str = ""
    size_bytes: int = 0
    used_id: str | None = None
    broken_id: str | None = None
    broken_reason: str = ""


def requirements_sha256(archive: bytes) -> str | None:
    """SHA-256 of the project's requirements.txt as the runner will unpack it (the last entry
    of that name wins, as in extraction); None when there is none, it is too large, or the
    archive cannot be read (the runner then says why)."""
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            found = None
            for info in zf.infolist():
                try:
                    parts = safe_relative_parts(info.filename)
                except InvalidArchive:
                    return None
                if parts == ["requirements.txt"] and not info.is_dir():
                    found = info
            if found is None or found.file_size > MAX_REQUIREMENTS_BYTES:
                return None
            with zf.open(found) as handle:
                data = handle.read(MAX_REQUIREMENTS_BYTES + 1)
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, NotImplementedError, EOFError):
        return None
    if len(data) > MAX_REQUIREMENTS_BYTES:
        return None
    return hashlib.sha256(data).hexdigest()


def new_volume_name(container_prefix: str) -> str:
    """A name no other build uses: two first builds of one key never share a volume."""
    return f"{container_prefix}env_{uuid.uuid4().hex}"


def age_text(seconds: float) -> str:
    """`12 s`, `5 min`, `3 h`, `2 d`: how long ago, roughly."""
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def hit_note(entry: EnvEntry, now: datetime) -> str:
    """`using cached environment (built 3 h ago, 48.0 MB)`."""
    built = entry.built_at or entry.created_at
    return (f"using cached environment (built {age_text((now - built).total_seconds())} ago, "
            f"{format_size(entry.size_bytes)})")


def runner_args(plan: EnvPlan, sha256: str) -> tuple[str, ...]:
    """The runner's command-line options for this plan."""
    if plan.mode is EnvMode.NONE or plan.entry is None:
        return ()
    return ("--env-mode", plan.mode.value, "--env-dir", ENV_DIR, "--env-id", plan.entry.id,
            "--env-sha256", sha256, "--env-note", plan.note)


def env_report(phases: Sequence[str]) -> EnvReport:
    """The runner's env phases, up to `tests started` (later ones may be forged by tests)."""
    report = EnvReport()
    for text in phases:
        if text == TESTS_STARTED:
            break
        if text.startswith(ENV_BUILT_PREFIX):
            try:
                data = json.loads(text[len(ENV_BUILT_PREFIX):])
                report = EnvReport(built_id=str(data["id"]), python_version=str(data["python"]),
                                   size_bytes=max(int(data["size"]), 0))
            except (ValueError, TypeError, KeyError):
                continue
        elif text.startswith(ENV_USED_PREFIX):
            report = EnvReport(used_id=text[len(ENV_USED_PREFIX):])
        elif text.startswith(ENV_BROKEN_PREFIX):
            entry_id, _, reason = text[len(ENV_BROKEN_PREFIX):].partition(": ")
            report = EnvReport(broken_id=entry_id, broken_reason=reason)
    return report


def plan_eviction(entries: Sequence[EnvEntry], budget_bytes: int,
                  in_use: Collection[str]) -> list[EnvEntry]:
    """Ready entries to evict, least recently used first, until the rest fit the budget.

    `entries` are one engine's, least recently used first. An entry a job is using right now
    is kept (its volume could not be removed anyway); it still counts against the budget.
    """
    ready = [entry for entry in entries if entry.state is EnvState.READY]
    total = sum(entry.size_bytes for entry in ready)
    evict = []
    for entry in ready:
        if total <= budget_bytes:
            break
        if entry.volume in in_use:
            continue
        evict.append(entry)
        total -= entry.size_bytes
    return evict
