"""The Docker engine going away under a running controller, for real.

The controller talks to the engine through `DockerProxy`; `cut()` makes the engine vanish for it
(live connections closed, new ones refused) while the real engine, shared with every other test,
keeps running. The test removes a job's container through the real socket during the outage.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.e2e.docker_proxy import DockerProxy
from tests.e2e.harness import (
    PASSING_TEST,
    Deployment,
    LineReader,
    Process,
    numbered_lines_in,
    numbered_lines_test,
    submit_async,
    write_project,
)

pytestmark = pytest.mark.docker

OUTAGE_S = 10.0
# Doubling windows from 2 s report at about 0, 2 and 6 s into a 10 s outage: 3 lines at most.
MAX_ENGINE_ERRORS = 3
# The controller notices the engine is back within about one reconcile interval (1 s here),
# whatever the length of the outage: the doubling report window must not hold recovery back
# (with probes only once per window, it would notice at 14 s into the outage, 3 s late).
NOTICED_S = 2.5
STARTED_S = 10.0  # and the queued jobs are running soon after (container start, under load)
SURVIVOR_LINES = 200  # 0.1 s apart: still running when the engine comes back
TRICKLE_SLICE = 4096  # bytes
FILLER_FRAME_START = re.compile(rb'\[\d+, "stdout", "xxx')  # a runner frame of filler begins
CUT_INTO_FRAME = 20_000  # bytes: past the engine's first 16 KB message of the frame
CUT_LAG_S = 0.5  # between the log connection's end and the other connections' end
BURST_LINES = 40
FILLER_CHARS = 60_000  # one print: the runner's frame is split into 16 KB engine log messages
BURST_TEST = (
    "import time\n"
    "def test_burst():\n"
    "    print()\n"
    f"    for i in range(1, {BURST_LINES} + 1):\n"
    "        print(f'line {i}')\n"
    f"        print('x' * {FILLER_CHARS}, flush=True)\n"
    "    time.sleep(3)  # running through the cut: its end does not race the outage\n"
)
ERROR_LINE = re.compile(r"^\S+ \S+ ERROR .*$", re.MULTILINE)
RAW_FRAME = re.compile(r'\[\d+, "(stdout|stderr|phase)"')  # a runner frame cut by the outage


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[str]]]:
    """Client processes the test starts; killed at the end whatever happened."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


class _Trickle:
    """The engine → controller side of one connection: trickled, and cut on the proxy's cue."""

    def __init__(self, sock: socket.socket, proxy: SlowEngineProxy) -> None:
        self._sock = sock
        self._proxy = proxy
        self._tail = b""  # the end of what was sent, so a frame start split in two is found

    def sendall(self, data: bytes) -> None:
        for start in range(0, len(data), TRICKLE_SLICE):
            piece = data[start:start + TRICKLE_SLICE]
            keep = self._proxy.bytes_to_keep(self._tail, piece)
            self._sock.sendall(piece[:keep])
            if keep < len(piece):
                # This connection (the followed log) ends first; the rest a moment later: the
                # controller's reader sees the end of the stream before anything else fails.
                threading.Timer(CUT_LAG_S, self._proxy.cut).start()
                raise OSError("cut inside a frame")
            self._tail = (self._tail + piece)[-64:]
            time.sleep(self._proxy.pause_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class SlowEngineProxy(DockerProxy):
    """The engine answers at a trickle, and can vanish in the middle of a runner frame.

    `cut_inside_frame()` waits for the next frame of filler in the engine's answer, lets
    CUT_INTO_FRAME bytes of it through (one whole 16 KB log message of the engine, and part of
    the next), then cuts: the controller holds a frame's first part and not its end.
    """

    def __init__(self, bytes_per_s: float) -> None:
        super().__init__()
        self.pause_s = TRICKLE_SLICE / bytes_per_s
        self._armed = False
        self._left: int | None = None  # bytes still let through after the frame start
        self.cut_done = threading.Event()

    def cut_inside_frame(self) -> None:
        with self._lock:
            self._armed = True

    def bytes_to_keep(self, tail: bytes, piece: bytes) -> int:
        """How much of this piece goes through before the cut (all of it when none is due)."""
        with self._lock:
            if not self._armed or self.cut_done.is_set():
                return len(piece)
            if self._left is None:
                found = FILLER_FRAME_START.search(tail + piece)
                if found is None:
                    return len(piece)
                self._left = CUT_INTO_FRAME + found.start() - len(tail)
            if self._left >= len(piece):
                self._left -= len(piece)
                return len(piece)
            self.cut_done.set()
            return max(self._left, 0)

    def _pipe(self, source: socket.socket, target: socket.socket, to_engine: bool) -> None:
        if not to_engine:
            target = _Trickle(target, self)  # type: ignore[assignment]
        super()._pipe(source, target, to_engine)


def listed(dep: Deployment, server: Process, key: str) -> dict[str, dict[str, Any]]:
    """job id → its row in `ci list --json`."""
    result = dep.ci("list", "--json", server=server, api_key=key)
    assert result.returncode == 0, result.stderr
    return {job["id"]: job for job in json.loads(result.stdout)}


def wait_for(dep: Deployment, server: Process, key: str, job_ids: list[str],
              done: Any, timeout: float, what: str) -> dict[str, dict[str, Any]]:
    """Poll `ci list --json` until done(job row) holds for every job; the last listing."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = listed(dep, server, key)
        if all(done(jobs[job_id]) for job_id in job_ids):
            return jobs
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: "
                                 f"{[jobs[job_id] for job_id in job_ids]}")
        time.sleep(0.2)


def terminal(job: dict[str, Any]) -> bool:
    return job["status"] in ("completed", "failed", "cancelled")


def remove_job_container(job_id: str) -> None:
    """Remove the job's container through the REAL engine socket (not the cut proxy)."""
    client = docker.from_env()
    try:
        containers = client.containers.list(all=True, filters={"label": f"ci.job_id={job_id}"})
        assert len(containers) == 1, containers
        containers[0].remove(force=True)
    finally:
        client.close()


def test_engine_outage_queues_jobs_reports_calmly_and_recovers(
    deployment: Deployment, proxy: DockerProxy, spawned: list[subprocess.Popen[str]],
    tmp_path: Path
) -> None:
    dep = deployment
    server = dep.start_server()
    controller = dep.start_controller(DOCKER_HOST=proxy.url)
    user = dep.create_user()
    survivor_project = write_project(
        tmp_path / "survivor",
        {"test_lines.py": numbered_lines_test(SURVIVOR_LINES, 0.1)}, capture=False)
    victim_project = write_project(
        tmp_path / "victim", {"test_lines.py": numbered_lines_test(600, 0.1)}, capture=False)
    queued_project = write_project(tmp_path / "queued", {"test_ok.py": PASSING_TEST})

    survivor = submit_async(dep, server, survivor_project, user.api_key)
    victim = submit_async(dep, server, victim_project, user.api_key)
    watcher = LineReader(dep.ci_popen("wait", survivor, "--all", server=server,
                                      api_key=user.api_key))
    spawned.append(watcher.popen)
    watcher.wait_for("line 5")
    wait_for(dep, server, user.api_key, [victim], lambda job: job["status"] == "running",
             60, "the victim to run")

    # ---------------------------------------------------------------- the engine goes away
    log_mark = len(controller.log())
    cut_at = time.monotonic()
    proxy.cut()
    queued = [submit_async(dep, server, queued_project, user.api_key) for _ in range(2)]
    remove_job_container(victim)
    time.sleep(max(OUTAGE_S - (time.monotonic() - cut_at), 0))
    during = controller.log()[log_mark:]
    jobs = listed(dep, server, user.api_key)
    assert [jobs[job_id]["status"] for job_id in queued] == ["queued", "queued"], during
    # The database still says running: nobody can know better while the engine is away.
    assert jobs[survivor]["status"] == jobs[victim]["status"] == "running"
    errors = ERROR_LINE.findall(during)
    assert 1 <= len(errors) <= MAX_ENGINE_ERRORS, f"{len(errors)} error lines:\n{during}"
    assert all("engine" in line for line in errors), during
    assert "Traceback" not in during, during

    # ---------------------------------------------------------------- the engine is back
    proxy.restore()
    restored_at = time.time()
    wait_for(dep, server, user.api_key, queued, lambda job: job["status"] != "queued",
             STARTED_S, "queued jobs to start after the engine came back")
    jobs = wait_for(dep, server, user.api_key, [survivor, victim, *queued], terminal, 120,
                    "every job to finish")
    for job_id in [survivor, *queued]:
        assert (jobs[job_id]["status"], jobs[job_id]["exit_code"]) == ("completed", 0), \
            jobs[job_id]
    assert jobs[victim]["status"] == "failed"
    assert jobs[victim]["reason"] == "container lost"
    back = re.search(r"^(\S+ \S+) INFO .*container engine is available again$", controller.log(),
                     re.MULTILINE)
    assert back, controller.log()
    noticed_s = datetime.strptime(back.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() - restored_at
    assert noticed_s <= NOTICED_S, f"the engine's return was noticed {noticed_s:.1f} s late"

    # The survivor was adopted: the live stream and a replay both hold every line exactly once.
    out, err, code = watcher.finish()
    assert code == 0, err
    assert numbered_lines_in(out) == list(range(1, SURVIVOR_LINES + 1))
    replay = dep.ci("wait", survivor, "--all", server=server, api_key=user.api_key)
    assert replay.returncode == 0, replay.stderr
    assert numbered_lines_in(replay.stdout) == list(range(1, SURVIVOR_LINES + 1))
    assert not RAW_FRAME.search(replay.stdout), "a runner frame leaked into the output"

    whole = controller.log()
    assert f"job {survivor}: adopted container" in whole
    assert "container engine is available again" in whole
    assert "Traceback" not in whole, whole
    deadline = time.monotonic() + 20
    while dep.containers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert dep.containers() == []  # finished jobs' containers are removed


def test_engine_cut_mid_line_loses_and_repeats_nothing(
    deployment: Deployment, spawned: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    """The cut lands inside a big frame; the adopted job's output is still exact."""
    dep = deployment
    proxy = SlowEngineProxy(bytes_per_s=1024 * 1024).start()
    try:
        server = dep.start_server()
        controller = dep.start_controller(DOCKER_HOST=proxy.url)
        user = dep.create_user()
        project = write_project(tmp_path / "burst", {"test_burst.py": BURST_TEST}, capture=False)
        job = submit_async(dep, server, project, user.api_key)
        watcher = LineReader(dep.ci_popen("wait", job, "--all", server=server,
                                          api_key=user.api_key))
        spawned.append(watcher.popen)
        # The burst is 2.4 MB; at 1 MB/s the controller is seconds behind the container here.
        watcher.wait_for("line 3")
        proxy.cut_inside_frame()
        assert proxy.cut_done.wait(30), "no frame of filler went through the proxy"
        time.sleep(2.0)
        proxy.restore()
        jobs = wait_for(dep, server, user.api_key, [job], terminal, 120, "the job to finish")
        assert (jobs[job]["status"], jobs[job]["exit_code"]) == ("completed", 0), jobs[job]
        out, err, code = watcher.finish()
        assert code == 0, err
    finally:
        proxy.close()
        shutil.rmtree(proxy.socket_path.parent, ignore_errors=True)
    replay = dep.ci("wait", job, "--all", server=server, api_key=user.api_key)
    for text in (out, replay.stdout):
        assert not RAW_FRAME.search(text), "a runner frame cut by the outage reached the output"
        assert numbered_lines_in(text) == list(range(1, BURST_LINES + 1))
        fillers = re.findall(r"^x+$", text, flags=re.MULTILINE)
        assert [len(f) for f in fillers] == [FILLER_CHARS] * BURST_LINES
    assert f"job {job}: adopted container" in controller.log()
    assert "Traceback" not in controller.log()
