"""The container runtime seam: the few operations the controller needs from a container engine.

Implementations: `ci_controller.docker_runtime.DockerRuntime` (the only module that imports the
docker SDK) and `ci_controller.fake_runtime.FakeRuntime` (in-process, for unit tests).

Every method may raise `ci_common.errors.RuntimeUnavailable` when the engine does not answer;
other engine failures raise `ci_common.errors.CIError` with a one-line message.
"""

from __future__ import annotations

import builtins
import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol


class ContainerStatus(enum.StrEnum):
    """The part of a container's state the controller acts on."""

    CREATED = "created"  # created, never started
    RUNNING = "running"  # started and not yet exited (paused and restarting count as running)
    EXITED = "exited"  # started and finished (or dead)


@dataclass(frozen=True, slots=True)
class Mount:
    """A host file or directory bind-mounted into the container, or a named volume."""

    source: str  # a host path, or the volume's name when `volume`
    target: str
    read_only: bool = True
    volume: bool = False


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """Everything needed to create one job container; built by `ci_controller.spec`."""

    image: str
    name: str
    command: tuple[str, ...]
    labels: Mapping[str, str]
    environment: Mapping[str, str]
    working_dir: str
    mounts: tuple[Mount, ...] = ()
    privileged: bool = False
    cap_drop: tuple[str, ...] = ()
    cap_add: tuple[str, ...] = ()
    security_opt: tuple[str, ...] = ()
    pids_limit: int | None = None
    mem_limit_bytes: int | None = None
    memswap_limit_bytes: int | None = None  # equal to mem_limit_bytes: no swap
    nano_cpus: int | None = None  # CPU quota in units of 1e-9 CPUs
    init: bool = False  # a tiny init as PID 1 that forwards signals and reaps zombies
    log_config: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ContainerState:
    """A container as the engine reports it."""

    id: str
    name: str
    status: ContainerStatus
    exit_code: int | None  # set once EXITED
    oom_killed: bool
    labels: Mapping[str, str]


class OutputFollow(Protocol):
    """A container's raw output from its first byte, following until it ends or is closed.

    Iterating yields byte chunks in order; chunk boundaries mean nothing (a line, even a UTF-8
    character, can straddle two chunks). `close()` may be called from another thread and makes
    the iteration end.
    """

    def __iter__(self) -> Iterator[bytes]:
        """The output chunks."""
        ...

    def close(self) -> None:
        """Stop following; safe to call twice."""
        ...


class ContainerRuntime(Protocol):
    """Create, start, follow, wait for, stop and remove job containers."""

    def engine_id(self) -> str:
        """The engine's own stable id: two controllers with the same id see the same containers."""
        ...

    def create(self, spec: ContainerSpec) -> str:
        """Create (not start) a container; returns its id."""
        ...

    def put_files(self, container_id: str, files: Mapping[str, bytes]) -> None:
        """Copy files (absolute path in the container → content) into a created container."""
        ...

    def start(self, container_id: str) -> None:
        """Start a created container."""
        ...

    def follow_output(self, container_id: str) -> OutputFollow:
        """The container's stdout and stderr, merged, from the beginning, following."""
        ...

    def wait(self, container_id: str, timeout_s: float) -> bool:
        """Block until the container is not running (True) or timeout_s passed (False).

        A container that no longer exists counts as not running.
        """
        ...

    def stop(self, container_id: str, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after grace_s. A missing or exited container is ignored."""
        ...

    def kill(self, container_id: str) -> None:
        """SIGKILL now. A missing or exited container is ignored."""
        ...

    def remove(self, container_id: str) -> None:
        """Remove the container, running or not. A missing container is ignored."""
        ...

    def list(self, labels: Mapping[str, str]) -> list[ContainerState]:
        """All containers (running or not) carrying every one of these labels."""
        ...

    def inspect(self, container_id: str) -> ContainerState | None:
        """The container's state, or None when it does not exist."""
        ...

    # Volumes hold cached environments (see ci_controller.envcache).
    def image_id(self, image: str) -> str:
        """The image's content id (`sha256:…`). CIError when the engine has no such image."""
        ...

    def create_volume(self, name: str, labels: Mapping[str, str]) -> None:
        """Create an empty named volume."""
        ...

    def volume_exists(self, name: str) -> bool:
        """Whether the named volume exists."""
        ...

    def remove_volume(self, name: str) -> bool:
        """Remove a volume: True once it is gone (or never existed), False while in use."""
        ...

    def list_volumes(self, labels: Mapping[str, str]) -> builtins.list[str]:
        """Names of the volumes carrying every one of these labels."""
        ...
