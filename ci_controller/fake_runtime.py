"""An in-process container runtime for tests: containers that play a script instead of running.

A script is a list of steps played in a thread once the container starts: `bytes` are written
to its output, a `threading.Event` is waited for (the container keeps running meanwhile, which
is how tests hold a job in the middle of its run). Then the container exits with the script's
exit code. `stop` and `kill` end it at once, as the runner does on SIGTERM.

    runtime = FakeRuntime(default=FakeScript(steps=runner_frames(("stdout", "ok\\n"),
                                                                  ("phase", "tests exited 0"))))
"""

from __future__ import annotations

import builtins
import itertools
import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from ci_common.errors import CIError, RuntimeUnavailable
from ci_controller.runtime import ContainerSpec, ContainerState, ContainerStatus, OutputFollow
from ci_controller.spec import LABEL_JOB_ID

EXIT_SIGTERM = 143
EXIT_SIGKILL = 137

Step = bytes | threading.Event


def runner_frames(*records: tuple[str, str], start: int = 1) -> list[bytes]:
    """Frame lines as runner_entry writes them, numbered from `start`, one chunk each."""
    return [
        (json.dumps([number, kind, text], ensure_ascii=False) + "\n").encode("utf-8")
        for number, (kind, text) in enumerate(records, start=start)
    ]


@dataclass(frozen=True)
class FakeScript:
    """What a fake container does once started."""

    steps: Sequence[Step] = ()
    exit_code: int = 0
    oom_killed: bool = False
    ignores_sigterm: bool = False  # `stop` then takes the whole grace period, ending in a kill
    stream_never_ends: bool = False  # like docker's followed logs that outlive the container


@dataclass
class FakeContainer:
    """One fake container; tests may read anything here."""

    id: str
    spec: ContainerSpec
    script: FakeScript
    status: ContainerStatus = ContainerStatus.CREATED
    files: dict[str, bytes] = field(default_factory=dict)
    output: list[bytes] = field(default_factory=list)
    exit_code: int | None = None
    oom_killed: bool = False
    signals: list[str] = field(default_factory=list)

    def state(self) -> ContainerState:
        return ContainerState(id=self.id, name=self.spec.name, status=self.status,
                              exit_code=self.exit_code, oom_killed=self.oom_killed,
                              labels=dict(self.spec.labels))


class FakeRuntime:
    """A ContainerRuntime whose containers play FakeScripts; thread-safe."""

    def __init__(self, default: FakeScript | None = None,
                 script_for: Callable[[ContainerSpec], FakeScript | None] | None = None) -> None:
        self.default = default or FakeScript(steps=runner_frames(("phase", "tests exited 0")))
        self.script_for = script_for
        self.scripts: dict[str, FakeScript] = {}  # job id → script, wins over the default
        self.containers: dict[str, FakeContainer] = {}
        self.removed: list[str] = []
        self.available = True  # False: every call raises RuntimeUnavailable
        self.identity = "fake-engine"  # what engine_id() answers
        self.fail: dict[str, CIError] = {}  # method name → error it raises (once each)
        self.max_running = 0  # most containers running at the same time so far
        self.images: dict[str, str] = {}  # image name → id; unknown names get "sha256:<name>"
        self.volumes: dict[str, dict[str, str]] = {}  # volume name → labels
        self._cond = threading.Condition()
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------ test helpers
    def by_job(self, job_id: str) -> FakeContainer | None:
        """The (not removed) container of a job."""
        with self._cond:
            for container in self.containers.values():
                if container.spec.labels.get(LABEL_JOB_ID) == job_id:
                    return container
        return None

    def running_count(self) -> int:
        with self._cond:
            return sum(c.status is ContainerStatus.RUNNING for c in self.containers.values())

    def _check(self, method: str) -> None:
        if not self.available:
            raise RuntimeUnavailable("fake engine is down")
        error = self.fail.pop(method, None)
        if error is not None:
            raise error

    def _get(self, container_id: str) -> FakeContainer:
        container = self.containers.get(container_id)
        if container is None:
            raise CIError(f"no such container: {container_id}")
        return container

    # ------------------------------------------------------------------ ContainerRuntime
    def engine_id(self) -> str:
        self._check("engine_id")
        return self.identity

    def create(self, spec: ContainerSpec) -> str:
        """Create a container that will play the job's script."""
        self._check("create")
        with self._cond:
            if any(c.spec.name == spec.name for c in self.containers.values()):
                raise CIError(f"container name {spec.name} is already in use")
            job_id = spec.labels.get(LABEL_JOB_ID, "")
            script = self.scripts.get(job_id)
            if script is None and self.script_for is not None:
                script = self.script_for(spec)
            for mount in spec.mounts:  # as Docker does: a missing named volume is made empty
                if mount.volume and mount.source not in self.volumes:
                    self.volumes[mount.source] = {}
            container = FakeContainer(id=f"fake{next(self._ids):06d}", spec=spec,
                                      script=script or self.default)
            self.containers[container.id] = container
            return container.id

    def put_files(self, container_id: str, files: Mapping[str, bytes]) -> None:
        self._check("put_files")
        with self._cond:
            self._get(container_id).files.update(files)

    def start(self, container_id: str) -> None:
        self._check("start")
        with self._cond:
            container = self._get(container_id)
            if container.status is not ContainerStatus.CREATED:
                raise CIError(f"container {container_id} was already started")
            container.status = ContainerStatus.RUNNING
            self.max_running = max(self.max_running, self.running_count())
        threading.Thread(target=self._play, args=(container,), daemon=True,
                         name=f"fake-{container_id}").start()

    def _play(self, container: FakeContainer) -> None:
        for step in container.script.steps:
            if isinstance(step, threading.Event):
                while not step.wait(0.01):
                    with self._cond:
                        if container.status is not ContainerStatus.RUNNING:
                            return
                continue
            with self._cond:
                if container.status is not ContainerStatus.RUNNING:
                    return
                container.output.append(step)
                self._cond.notify_all()
        with self._cond:
            self._exit(container, container.script.exit_code, container.script.oom_killed)

    def _exit(self, container: FakeContainer, code: int, oom_killed: bool = False) -> None:
        if container.status is ContainerStatus.RUNNING:
            container.status = ContainerStatus.EXITED
            container.exit_code = code
            container.oom_killed = oom_killed
            self._cond.notify_all()

    def follow_output(self, container_id: str) -> OutputFollow:
        self._check("follow_output")
        with self._cond:
            return _FakeFollow(self, self._get(container_id))

    def wait(self, container_id: str, timeout_s: float) -> bool:
        self._check("wait")
        with self._cond:
            container = self.containers.get(container_id)
            return self._cond.wait_for(
                lambda: container is None or container.status is not ContainerStatus.RUNNING
                or container.id not in self.containers,
                timeout=timeout_s)

    def stop(self, container_id: str, grace_s: float) -> None:
        self._check("stop")
        with self._cond:
            container = self.containers.get(container_id)
            if container is None:
                return
            container.signals.append("SIGTERM")
            if not container.script.ignores_sigterm:
                self._exit(container, EXIT_SIGTERM)
                return
            if self._cond.wait_for(lambda: container.status is not ContainerStatus.RUNNING,
                                   timeout=grace_s):
                return
            container.signals.append("SIGKILL")
            self._exit(container, EXIT_SIGKILL)

    def kill(self, container_id: str) -> None:
        self._check("kill")
        with self._cond:
            container = self.containers.get(container_id)
            if container is not None:
                container.signals.append("SIGKILL")
                self._exit(container, EXIT_SIGKILL)

    def remove(self, container_id: str) -> None:
        self._check("remove")
        with self._cond:
            container = self.containers.pop(container_id, None)
            if container is not None:
                self._exit(container, EXIT_SIGKILL)
                self.removed.append(container_id)
                self._cond.notify_all()

    def list(self, labels: Mapping[str, str]) -> list[ContainerState]:
        self._check("list")
        with self._cond:
            return [c.state() for c in self.containers.values()
                    if all(c.spec.labels.get(k) == v for k, v in labels.items())]

    def inspect(self, container_id: str) -> ContainerState | None:
        self._check("inspect")
        with self._cond:
            container = self.containers.get(container_id)
            return None if container is None else container.state()


    # ------------------------------------------------------------------ volumes
    def image_id(self, image: str) -> str:
        self._check("image_id")
        return self.images.get(image, f"sha256:{image}")

    def create_volume(self, name: str, labels: Mapping[str, str]) -> None:
        self._check("create_volume")
        with self._cond:
            if name in self.volumes:
                raise CIError(f"volume {name} already exists")
            self.volumes[name] = dict(labels)

    def volume_exists(self, name: str) -> bool:
        self._check("volume_exists")
        with self._cond:
            return name in self.volumes

    def remove_volume(self, name: str) -> bool:
        self._check("remove_volume")
        with self._cond:
            if any(m.volume and m.source == name for c in self.containers.values()
                   for m in c.spec.mounts):
                return False
            self.volumes.pop(name, None)
            return True

    def list_volumes(self, labels: Mapping[str, str]) -> builtins.list[str]:
        self._check("list_volumes")
        with self._cond:
            return [name for name, have in self.volumes.items()
                    if all(have.get(k) == v for k, v in labels.items())]


class _FakeFollow:
    """Output of one fake container from its first chunk, following until exit or close."""

    def __init__(self, runtime: FakeRuntime, container: FakeContainer) -> None:
        self._runtime = runtime
        self._container = container
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        index = 0
        cond = self._runtime._cond
        container = self._container
        while True:
            with cond:
                while not (self._closed or index < len(container.output) or self._ended()):
                    cond.wait()
                if self._closed:
                    return
                if index < len(container.output):
                    chunk = container.output[index]
                    index += 1
                elif self._ended():
                    return
                else:
                    continue
            yield chunk

    def _ended(self) -> bool:
        container = self._container
        if container.id not in self._runtime.containers:
            return True
        return container.status is ContainerStatus.EXITED and not container.script.stream_never_ends

    def close(self) -> None:
        with self._runtime._cond:
            self._closed = True
            self._runtime._cond.notify_all()
