"""Helpers for the crash-safety tests: live output readers, job polling, Docker start counts."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import docker
import httpx

from tests.e2e.docker_proxy import DockerProxy
from tests.e2e.harness import Deployment, Process


def read_line(pipe: Any, timeout: float = 60) -> str:
    """One line from a text pipe, failing (not hanging) when none comes in time."""
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    threading.Thread(target=lambda: lines.put(pipe.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no line in {timeout} s") from None


def get_job(server: Process, api_key: str, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/jobs/{job_id}", timeout=10,
                         headers={"Authorization": f"Bearer {api_key}"})
    response.raise_for_status()
    return dict(response.json())


def wait_for_job(server: Process, api_key: str, job_id: str, *, status: str | None = None,
                 timeout: float = 120) -> dict[str, Any]:
    """Poll a job until it is terminal (or has the given status); its JobView."""
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = get_job(server, api_key, job_id)
        if status is not None and job["status"] == status:
            return job
        if status is None and job["status"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not get there in {timeout} s: {job}")


def container_states(dep: Deployment) -> list[str]:
    """The states ("created", "running", "exited"...) of the deployment's containers.

    One listing call: the SDK's high-level list inspects each container after listing, and
    fails on one removed in between.
    """
    client = docker.from_env()
    try:
        rows = client.api.containers(
            all=True, filters={"label": dep.label()})
        return [str(row["State"]) for row in rows]
    finally:
        client.close()


class StartWatch:
    """Records the engine's container start events for one deployment, from creation on.

    It subscribes at once: the engine keeps only its last 256 events, so a query after the run
    can miss some while other tests share the engine.
    """

    def __init__(self, dep: Deployment) -> None:
        self._client = docker.from_env()
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stream = self._client.events(
            since=int(time.time()) - 1, decode=True,
            filters={"type": "container", "event": "start",
                     "label": dep.label()})
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                with self._lock:
                    self._events.append(event)
        except Exception:  # noqa: BLE001 - close() ends the read this way
            pass

    def starts(self, job_id: str, settle_s: float = 0.5) -> int:
        """How many times a container of this job was started (after settle_s for stragglers)."""
        time.sleep(settle_s)
        with self._lock:
            return sum(1 for event in self._events
                       if event["Actor"]["Attributes"].get("ci.job_id") == job_id)

    def close(self) -> None:
        self._stream.close()
        self._thread.join(10)
        self._client.close()


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def assert_no_traceback(process: Process) -> str:
    """The process's log, which must hold no traceback; returned for further checks."""
    text = process.log()
    assert "Traceback" not in text, f"{process.name} log has a traceback:\n{text}"
    return text


class GatedProxy(DockerProxy):
    """A DockerProxy that holds requests matching a pattern until the test releases them.

    Held requests are released one at a time, oldest first, so a test decides exactly when a
    dead controller's request reaches the engine relative to what its successor does.
    """

    MAX_HOLD_S = 60.0  # a forgotten request is let through eventually: nothing hangs

    def __init__(self) -> None:
        super().__init__()
        self._gate = threading.Condition()
        self._pattern: bytes | None = None
        self._held: list[threading.Event] = []

    def hold(self, pattern: bytes) -> None:
        """Hold every request containing pattern from now on."""
        with self._gate:
            self._pattern = pattern

    def stop_holding(self) -> None:
        """Let new requests through; those already held stay held."""
        with self._gate:
            self._pattern = None

    def wait_held(self, count: int, timeout: float = 60) -> None:
        """Block until `count` requests in all have been held."""
        with self._gate:
            if not self._gate.wait_for(lambda: len(self._held) >= count, timeout):
                raise AssertionError(f"the proxy held {len(self._held)} requests, not {count}")

    def release_next(self) -> None:
        """Forward the oldest request still held."""
        with self._gate:
            gate = next(g for g in self._held if not g.is_set())
            gate.set()

    def close(self) -> None:
        with self._gate:
            for gate in self._held:
                gate.set()
        super().close()

    def _maybe_delay(self, data: bytes) -> None:
        with self._gate:
            held = self._pattern is not None and self._pattern in data
            gate = threading.Event()
            if held:
                self._held.append(gate)
                self._gate.notify_all()
        if held:
            gate.wait(self.MAX_HOLD_S)
        super()._maybe_delay(data)
