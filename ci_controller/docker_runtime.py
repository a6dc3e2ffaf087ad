"""The Docker implementation of the container runtime: the only module that imports `docker`.

Uses the SDK's low-level APIClient (one HTTP call per operation, no hidden re-inspects). The
client is created lazily, so a controller starts (and retries) while the engine is down; every
"engine did not answer" becomes `RuntimeUnavailable`, every other engine error a one-line
`CIError`.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import math
import re
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions

from ci_common.errors import CIError, RuntimeUnavailable
from ci_controller.runtime import ContainerSpec, ContainerState, ContainerStatus, OutputFollow

T = TypeVar("T")

API_TIMEOUT_S = 30.0  # one ordinary engine call; waits and followed logs have their own
_STATUSES = {
    "created": ContainerStatus.CREATED,
    "running": ContainerStatus.RUNNING,
    "paused": ContainerStatus.RUNNING,
    "restarting": ContainerStatus.RUNNING,
    "removing": ContainerStatus.EXITED,
    "exited": ContainerStatus.EXITED,
    "dead": ContainerStatus.EXITED,
}
_LISTED_EXIT = re.compile(r"Exited \((-?\d+)\)")


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        text = str(exc.explanation)
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _is_unavailable(exc: BaseException) -> bool:
    # ChunkedEncodingError: the engine closed a long answer (a wait, a log) midway.
    if isinstance(exc, (requests.exceptions.ConnectionError,
                        requests.exceptions.ChunkedEncodingError)):
        return True
    # The SDK wraps a failed version handshake (engine not running) in a bare DockerException.
    return (type(exc) is docker.errors.DockerException
            and "Error while fetching server API version" in str(exc))


def _unavailable(exc: BaseException) -> RuntimeUnavailable:
    """`the Docker engine does not answer (connection refused)`: the root cause, not the chain."""
    # The SDK nests the socket error three deep (requests → urllib3 → OSError); operators need
    # only the innermost reason, in a line that reads the same on every retry.
    reason, pending, seen = _one_line(exc), [exc], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            reason = current.strerror
            break
        nested = [arg for arg in current.args if isinstance(arg, BaseException)]
        nested += [current.__cause__] if current.__cause__ is not None else []
        if not nested and str(current):
            reason = _one_line(current)
        pending.extend(nested)
    reason = reason[:1].lower() + reason[1:]
    return RuntimeUnavailable(f"the Docker engine does not answer ({reason})")


class DockerRuntime:
    """ContainerRuntime on a Docker engine (DOCKER_HOST and friends, as the docker CLI)."""

    def __init__(self, base_url: str | None = None) -> None:
        """Talk to the engine at base_url, or where DOCKER_HOST (default socket) says."""
        self._base_url = base_url
        self._api: Any = None
        self._lock = threading.Lock()

    def _client(self) -> Any:
        with self._lock:
            if self._api is None:
                try:
                    if self._base_url is None:
                        client = docker.from_env(timeout=int(API_TIMEOUT_S))
                    else:
                        client = docker.DockerClient(base_url=self._base_url,
                                                     timeout=int(API_TIMEOUT_S))
                    self._api = client.api
                except Exception as exc:
                    raise _unavailable(exc) from exc
            return self._api

    def _call(self, action: str, func: Callable[[Any], T]) -> T:
        api = self._client()
        try:
            return func(api)
        except (CIError, docker.errors.NotFound):
            raise
        except Exception as exc:
            if _is_unavailable(exc):
                raise _unavailable(exc) from exc
            if isinstance(exc, (docker.errors.DockerException,
                                requests.exceptions.RequestException)):
                raise CIError(f"{action}: {_one_line(exc)}") from exc
            raise

    # ------------------------------------------------------------------ ContainerRuntime
    def engine_id(self) -> str:
        """The daemon's ID from `docker info` (kept in its data root across restarts)."""
        return str(self._call("identify the engine", lambda api: api.info()["ID"]))

    def create(self, spec: ContainerSpec) -> str:
        """Create (not start) the container."""

        def create(api: Any) -> str:
            host_config = api.create_host_config(
                binds={m.source: {"bind": m.target, "mode": "ro" if m.read_only else "rw"}
                       for m in spec.mounts},
                privileged=spec.privileged,
                cap_drop=list(spec.cap_drop) or None,
                cap_add=list(spec.cap_add) or None,
                security_opt=list(spec.security_opt) or None,
                pids_limit=spec.pids_limit,
                mem_limit=spec.mem_limit_bytes,
                memswap_limit=spec.memswap_limit_bytes,
                nano_cpus=spec.nano_cpus,
                init=spec.init or None,
                log_config=dict(spec.log_config) or None,
            )
            created = api.create_container(
                spec.image, command=list(spec.command), name=spec.name,
                labels=dict(spec.labels), environment=dict(spec.environment),
                working_dir=spec.working_dir, host_config=host_config, detach=True,
            )
            return str(created["Id"])

        try:
            return self._call("create container", create)
        except docker.errors.ImageNotFound as exc:
            raise CIError(f"image {spec.image} not found") from exc
        except docker.errors.NotFound as exc:
            raise CIError(f"create container: {_one_line(exc)}") from exc

    def put_files(self, container_id: str, files: Mapping[str, bytes]) -> None:
        """Copy files into the container as root-owned regular files (parents created)."""
        archive = _tar(files)
        try:
            self._call("copy files", lambda api: api.put_archive(container_id, "/", archive))
        except docker.errors.NotFound as exc:
            raise CIError(f"copy files: {_one_line(exc)}") from exc

    def start(self, container_id: str) -> None:
        try:
            self._call("start container", lambda api: api.start(container_id))
        except docker.errors.NotFound as exc:
            raise CIError(f"start container: {_one_line(exc)}") from exc

    def follow_output(self, container_id: str) -> OutputFollow:
        try:
            stream = self._call("read output", lambda api: api.logs(
                container_id, stdout=True, stderr=True, stream=True, follow=True))
        except docker.errors.NotFound as exc:
            raise CIError(f"read output: {_one_line(exc)}") from exc
        return _DockerFollow(stream)

    def wait(self, container_id: str, timeout_s: float) -> bool:
        api = self._client()
        try:
            api.wait(container_id, timeout=max(timeout_s, 0.001))
        except docker.errors.NotFound:
            return True
        except requests.exceptions.RequestException as exc:
            # Over the unix socket the SDK reports the long poll's read timeout as a
            # ConnectionError saying "Read timed out"; anything else means the engine is gone.
            if isinstance(exc, requests.exceptions.ReadTimeout) or "timed out" in str(exc):
                return False
            if _is_unavailable(exc):
                raise _unavailable(exc) from exc
            raise CIError(f"wait for container: {_one_line(exc)}") from exc
        except docker.errors.DockerException as exc:
            raise CIError(f"wait for container: {_one_line(exc)}") from exc
        return True

    def stop(self, container_id: str, grace_s: float) -> None:
        grace = max(0, math.ceil(grace_s))
        with contextlib.suppress(docker.errors.NotFound):
            self._call("stop container", lambda api: api.stop(container_id, timeout=grace))

    def kill(self, container_id: str) -> None:
        try:
            self._call("kill container", lambda api: api.kill(container_id))
        except docker.errors.NotFound:
            pass
        except CIError as exc:
            if "is not running" not in exc.message:
                raise

    def remove(self, container_id: str) -> None:
        try:
            self._call("remove container",
                       lambda api: api.remove_container(container_id, force=True))
        except docker.errors.NotFound:
            pass
        except CIError as exc:
            if "already in progress" not in exc.message:
                raise

    def list(self, labels: Mapping[str, str]) -> list[ContainerState]:
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        rows = self._call("list containers", lambda api: api.containers(all=True, filters=filters))
        return [_listed_state(row) for row in rows]

    def inspect(self, container_id: str) -> ContainerState | None:
        try:
            data = self._call("inspect container",
                              lambda api: api.inspect_container(container_id))
        except docker.errors.NotFound:
            return None
        state = data.get("State") or {}
        status = _STATUSES.get(str(state.get("Status")), ContainerStatus.EXITED)
        return ContainerState(
            id=str(data["Id"]),
            name=str(data.get("Name", "")).lstrip("/"),
            status=status,
            exit_code=int(state["ExitCode"]) if status is ContainerStatus.EXITED else None,
            oom_killed=bool(state.get("OOMKilled")),
            labels=dict((data.get("Config") or {}).get("Labels") or {}),
        )


    # ------------------------------------------------------------------ volumes
    def image_id(self, image: str) -> str:
        try:
            return str(self._call("inspect image", lambda api: api.inspect_image(image))["Id"])
        except docker.errors.NotFound as exc:
            raise CIError(f"image {image} not found") from exc

    def create_volume(self, name: str, labels: Mapping[str, str]) -> None:
        self._call("create volume", lambda api: api.create_volume(
            name=name, driver="local", labels=dict(labels)))

    def volume_exists(self, name: str) -> bool:
        try:
            self._call("inspect volume", lambda api: api.inspect_volume(name))
        except docker.errors.NotFound:
            return False
        return True

    def remove_volume(self, name: str) -> bool:
        def remove(api: Any) -> bool:
            try:
                api.remove_volume(name)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                if exc.status_code == 409:  # in use by a container: try again later
                    return False
                raise
            return True

        return self._call("remove volume", remove)

    def list_volumes(self, labels: Mapping[str, str]) -> builtins.list[str]:
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        answer = self._call("list volumes", lambda api: api.volumes(filters=filters))
        return [str(volume["Name"]) for volume in (answer or {}).get("Volumes") or []]


def _listed_state(row: Mapping[str, Any]) -> ContainerState:
    status = _STATUSES.get(str(row.get("State")), ContainerStatus.EXITED)
    exited = _LISTED_EXIT.search(str(row.get("Status", "")))
    names = row.get("Names") or [""]
    return ContainerState(
        id=str(row["Id"]),
        name=str(names[0]).lstrip("/"),
        status=status,
        exit_code=int(exited.group(1)) if exited and status is ContainerStatus.EXITED else None,
        oom_killed=False,  # not in the listing; inspect() has it
        labels=dict(row.get("Labels") or {}),
    )


def _tar(files: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    now = time.time()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        directories: set[str] = set()
        for path, content in files.items():
            parts = path.strip("/").split("/")
            for depth in range(1, len(parts)):
                directory = "/".join(parts[:depth])
                if directory not in directories:
                    directories.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, now
                    tar.addfile(info)
            info = tarfile.TarInfo("/".join(parts))
            info.size, info.mode, info.mtime = len(content), 0o644, now
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


class _DockerFollow:
    """A followed log stream; ends on close() or when the engine closes it."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._stream:
                if self._closed.is_set():
                    return
                yield bytes(chunk)
        except Exception:
            # The socket was shut down under us (close) or the engine went away: either way
            # the stream is over; the caller learns the container's fate from wait/inspect.
            return

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        # The SDK's close() digs the socket out of the response and can trip over a stream
        # the engine already ended.
        with contextlib.suppress(Exception):
            self._stream.close()
