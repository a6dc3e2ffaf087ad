"""Hostile jobs: each one is contained, ends with a clear reason, and leaves its neighbour alone.

Every test runs a hostile job next to a well-behaved one (a "neighbour", submitted at the same
time on the same deployment), with small limits so the tier stays fast. The neighbour must pass
with its whole output, its lines reaching the client promptly while the hostile job runs.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from ci_common.settings import parse_size
from tests.e2e.harness import Deployment, Process, User, job_id_from, write_project

pytestmark = pytest.mark.docker

JobInfo = dict[str, Any]  # a job as GET /jobs/{id} returns it

VENDORED = ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "py")
NEIGHBOUR_LINES = 50
NEIGHBOUR_TEST = (
    "import time\n"
    "def test_neighbour():\n"
    "    print()\n"
    f"    for i in range(1, {NEIGHBOUR_LINES} + 1):\n"
    "        print(f'neighbour {i} at {time.time():.3f}', flush=True)\n"
    "        time.sleep(0.1)\n"
)
NEIGHBOUR_LINE = re.compile(r"^neighbour (\d+) at ([\d.]+)$", re.MULTILINE)
# A line printed in the container reaches the client this fast, even on a busy test machine.
MAX_LINE_LATENCY_S = 3.0


# -------------------------------------------------------------------------- helpers
@dataclass
class Site:
    """A running deployment with one user."""

    dep: Deployment
    server: Process
    user: User
    root: Path

    def ci(self, *args: str, cwd: Path | None = None,
           timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return self.dep.ci(*args, cwd=cwd, server=self.server, api_key=self.user.api_key,
                           timeout=timeout)

    def ci_bytes(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[bytes]:
        """`ci` with its output as raw bytes (no newline translation, no decoding)."""
        argv = self.dep.ci_argv(*args, server=self.server, api_key=self.user.api_key)
        return subprocess.run(argv, cwd=self.dep.workdir, env=self.dep.env(),
                              capture_output=True, timeout=timeout)

    def submit_async(self, project: Path, *args: str) -> str:
        result = self.ci("submit", "test", "--async", *args, cwd=project)
        assert result.returncode == 0, result.stderr
        return job_id_from(result.stdout)

    def job(self, job_id: str) -> JobInfo:
        response = httpx.get(f"{self.server.url}/jobs/{job_id}", timeout=10,
                             headers={"Authorization": f"Bearer {self.user.api_key}"})
        response.raise_for_status()
        return dict(response.json())

    def wait_terminal(self, job_id: str, timeout: float) -> JobInfo:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] in ("completed", "failed", "cancelled"):
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not end within {timeout} s: {self.job(job_id)}")

    def output_events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's OUTPUT event bodies from the event stream, replayed from the start."""
        events: list[dict[str, Any]] = []
        kind = ""
        with httpx.stream("GET", f"{self.server.url}/jobs/{job_id}/events?since=start",
                          headers={"Authorization": f"Bearer {self.user.api_key}"},
                          timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("event: "):
                    kind = line[len("event: "):]
                elif line.startswith("data: "):
                    if kind == "output":
                        events.append(json.loads(line[len("data: "):]))
                    if kind == "end":
                        break
        return events

    def container_gone(self, job_id: str, timeout: float = 15) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not [c for c in self.dep.containers() if c.labels.get("ci.job_id") == job_id]:
                return True
            time.sleep(0.2)
        return False


@dataclass
class Neighbour:
    """A well-behaved job streamed live by `ci submit test`; records when each line arrived."""

    proc: subprocess.Popen[str]
    arrivals: list[tuple[float, str]] = field(default_factory=list)
    stderr: str = ""
    _readers: list[threading.Thread] = field(default_factory=list)

    @property
    def job_id(self) -> str:
        return job_id_from(self.stderr)

    @classmethod
    def start(cls, site: Site) -> Neighbour:
        project = vendored_project(site.root / "neighbour",
                                  {"test_neighbour.py": NEIGHBOUR_TEST}, capture=False)
        # Its own time limit: some tests set a small CI_JOB_TIMEOUT for the hostile job.
        proc = site.dep.ci_popen("submit", "test", "--timeout", "300", cwd=project,
                                 server=site.server, api_key=site.user.api_key)
        neighbour = cls(proc)
        neighbour._readers = [threading.Thread(target=neighbour._read_stdout, daemon=True),
                              threading.Thread(target=neighbour._read_stderr, daemon=True)]
        for reader in neighbour._readers:
            reader.start()
        return neighbour

    def wait_until_running(self, timeout: float = 120) -> None:
        """Until its first line arrived: a short hostile job submitted now runs beside it."""
        deadline = time.monotonic() + timeout
        while not any(line.startswith("neighbour 1 ") for _, line in self.arrivals):
            assert self.proc.poll() is None or self.arrivals, "the neighbour ended early"
            assert time.monotonic() < deadline, "the neighbour never started printing"
            time.sleep(0.05)

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.arrivals.append((time.time(), line))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def check(self, timeout: float = 120) -> None:
        """It passed, with every line once and in order, each delivered promptly."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        for reader in self._readers:
            reader.join(10)
        stdout = "".join(line for _, line in self.arrivals)
        assert self.proc.returncode == 0, f"{stdout[-2000:]}\n{self.stderr}"
        assert "1 passed" in stdout
        lines = [(arrived, m) for arrived, line in self.arrivals
                 if (m := NEIGHBOUR_LINE.match(line.rstrip("\n")))]
        assert [int(m.group(1)) for _, m in lines] == list(range(1, NEIGHBOUR_LINES + 1))
        latencies = [arrived - float(m.group(2)) for arrived, m in lines]
        assert max(latencies) < MAX_LINE_LATENCY_S, latencies


def vendored_project(root: Path, tests: dict[str, str], capture: bool = True) -> Path:
    """A project that brings its own pytest (copied from this interpreter), so no pip runs.

    The runner finds pytest in the project directory and installs nothing: jobs start running
    their tests within seconds, and time limits measure the hostile part, not pip on a busy host.
    """
    write_project(root, tests, requirements="# pytest is vendored\n")
    for name in VENDORED:
        source = Path(importlib.import_module(name).__file__ or "")
        if source.name == "__init__.py":
            shutil.copytree(source.parent, root / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(source, root / source.name)
    # pytest asks importlib.metadata for its plugins' versions: bring their dist-info along.
    for dist_name in ("pytest", "pluggy", "iniconfig", "packaging", "pygments"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info = Path(getattr(importlib.metadata.distribution(dist_name), "_path", ""))
            if info.name.endswith(".dist-info"):
                shutil.copytree(info, root / info.name, dirs_exist_ok=True)
    # Of pygments (10 MB), only the modules pytest imports: this process runs pytest too.
    for module in list(sys.modules.values()):
        source = Path(getattr(module, "__file__", None) or "")
        if module.__name__.split(".")[0] == "pygments" and source.suffix == ".py":
            parts = module.__name__.split(".")
            target = (root / Path(*parts) / source.name if source.name == "__init__.py"
                      else root / Path(*parts).with_suffix(".py"))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    addopts = "" if capture else "addopts = -s\n"
    (root / "pytest.ini").write_text(f"[pytest]\ntestpaths = tests\n{addopts}")
    return root


def start_site(deployment: Deployment, tmp_path: Path, **controller_env: str) -> Site:
    env = {"CI_JOB_MEMORY": "256m", "CI_JOB_PIDS": "128", "CI_LOG_LIMIT": "1MB"}
    env.update(controller_env)
    deployment.start_controller(**env)
    server = deployment.start_server()
    return Site(deployment, server, deployment.create_user(), tmp_path)


def overlapped(first: JobInfo, second: JobInfo) -> bool:
    """Whether two finished jobs ran at the same time for a while."""
    start_1, end_1, start_2, end_2 = (datetime.fromisoformat(job[key])
                                      for job in (first, second)
                                      for key in ("start_time", "end_time"))
    return start_1 < end_2 and start_2 < end_1


# -------------------------------------------------------------------------- 1: fork bomb
FORK_BOMB_TEST = (
    "import os, time\n"
    "def test_fork_bomb():\n"
    "    print('forking', flush=True)\n"
    "    while True:\n"
    "        try:\n"
    "            os.fork()\n"
    "        except OSError:\n"
    "            try:  # the first process refused a fork says so, once\n"
    "                os.close(os.open('/tmp/refused', os.O_CREAT | os.O_EXCL))\n"
    "                print('fork refused: pids limit reached', flush=True)\n"
    "            except OSError:\n"
    "                pass\n"
    "            time.sleep(0.05)\n"
)


def test_fork_bomb_is_contained_and_ends_at_the_time_limit(
    deployment: Deployment, tmp_path: Path
) -> None:
    site = start_site(deployment, tmp_path)
    project = vendored_project(tmp_path / "bomb", {"test_bomb.py": FORK_BOMB_TEST}, capture=False)
    bomb_id = site.submit_async(project, "--timeout", "20")
    neighbour = Neighbour.start(site)
    neighbour.check()
    bomb = site.wait_terminal(bomb_id, timeout=60)
    assert overlapped(bomb, site.job(neighbour.job_id))
    assert (bomb["status"], bomb["reason"]) == ("failed", "timed out"), bomb
    assert seconds_between(bomb["start_time"], bomb["end_time"]) < 20 + 4
    waited = site.ci("wait", bomb_id, "--all")
    assert "fork refused: pids limit reached" in waited.stdout, waited.stdout[-2000:]
    assert "Job failed: timed out" in waited.stderr
    assert site.container_gone(bomb_id)


# -------------------------------------------------------------------------- 2: memory hog
MEMORY_HOG_TEST = (
    "def test_memory_hog():\n"
    "    print('allocating', flush=True)\n"
    "    hoard = []\n"
    "    while True:\n"
    "        hoard.append(bytearray(16 * 1024 * 1024))\n"
)


def test_memory_hog_fails_with_out_of_memory(deployment: Deployment, tmp_path: Path) -> None:
    site = start_site(deployment, tmp_path)
    project = vendored_project(tmp_path / "hog", {"test_hog.py": MEMORY_HOG_TEST}, capture=False)
    hog_id = site.submit_async(project)
    neighbour = Neighbour.start(site)
    hog = site.wait_terminal(hog_id, timeout=120)
    neighbour.check()
    assert overlapped(hog, site.job(neighbour.job_id))
    assert (hog["status"], hog["reason"], hog["success"]) == ("failed", "out of memory", False)
    waited = site.ci("wait", hog_id, "--all")
    assert "allocating" in waited.stdout
    assert "Job failed: out of memory" in waited.stderr
    assert site.container_gone(hog_id)


# -------------------------------------------------------------------------- 3: time limits
SLEEPER_TEST = (
    "import time\n"
    "def test_sleeps_forever():\n"
    "    print('sleeping', flush=True)\n"
    "    time.sleep(10**6)\n"
)


def test_sleeping_jobs_end_at_their_time_limit(deployment: Deployment, tmp_path: Path) -> None:
    """`--timeout 6` for one job; the other has none and gets CI_JOB_TIMEOUT (10 s here)."""
    site = start_site(deployment, tmp_path, CI_JOB_TIMEOUT="10")
    project = vendored_project(tmp_path / "sleeper", {"test_sleep.py": SLEEPER_TEST}, capture=False)
    short_id = site.submit_async(project, "--timeout", "6")
    default_id = site.submit_async(project)
    neighbour = Neighbour.start(site)
    short = site.wait_terminal(short_id, timeout=60)
    neighbour.check()
    default = site.wait_terminal(default_id, timeout=60)
    assert overlapped(short, site.job(neighbour.job_id))
    for job, limit in ((short, 6.0), (default, 10.0)):
        assert (job["status"], job["reason"], job["success"]) == ("failed", "timed out", False)
        ran = seconds_between(job["start_time"], job["end_time"])
        assert limit <= ran < limit + 4, (limit, ran)
        assert site.container_gone(job["id"])
    waited = site.ci("wait", short_id, "--all")
    assert "Job failed: timed out" in waited.stderr


def seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


# -------------------------------------------------------------------------- 4: output flood
GIGABYTE_TEST = (
    "import os\n"
    "def test_flood():\n"
    "    line = b'x' * 1023 + b'\\n'\n"
    "    block = line * 1024\n"
    "    for _ in range(1024):\n"
    "        os.write(1, block)\n"
    "    os.write(1, b'FLOOD DONE\\n')\n"
)


def test_a_gigabyte_of_output_keeps_the_tail_with_a_marker(
    deployment: Deployment, tmp_path: Path
) -> None:
    site = start_site(deployment, tmp_path)  # CI_LOG_LIMIT=1MB
    project = vendored_project(tmp_path / "flood", {"test_flood.py": GIGABYTE_TEST}, capture=False)
    started = time.monotonic()
    flood_id = site.submit_async(project)
    neighbour = Neighbour.start(site)
    flood = site.wait_terminal(flood_id, timeout=240)
    print(f"1 GB job: {time.monotonic() - started:.1f} s from submission to its end")
    neighbour.check()
    assert flood["status"] == "completed" and flood["success"] is True, flood
    assert overlapped(flood, site.job(neighbour.job_id))

    waited = site.ci("wait", flood_id, "--all")
    assert waited.returncode == 0, waited.stderr[-2000:]
    out = waited.stdout
    assert out.startswith("[ci] … "), out[:300]  # the marker stands where the head was
    marker = re.match(r"\[ci\] … (.+?) of earlier output dropped \(log limit 1.0 MB\)", out)
    assert marker and parse_size(marker.group(1)) > 1023 * 1024**2, out[:300]
    assert "skipped here" not in out  # the runner's own gaps are older than the kept tail
    assert out.count("[ci] …") == 1
    assert "x" * 1023 + "\nFLOOD DONE\nPASSED\n" in out
    summary = re.search(r"=+ 1 passed in ([\d.]+)s.* =+\n$", out)
    assert summary, out[-2000:]
    # The test itself was not held back by the log pipeline (before: ~100 s at ~10 MB/s).
    assert float(summary.group(1)) < 30
    assert 0.9 * 1024**2 < len(out.encode()) < 1.1 * 1024**2
    assert site.container_gone(flood_id)
    # The database holds the kept tail, not the gigabyte: its file stays within a few times the
    # limit next to the uploaded archives; SQLite's WAL is reused after each checkpoint.
    with sqlite3.connect(deployment.db_path) as db:
        archives = db.execute("SELECT sum(length(data)) FROM job_archives").fetchone()[0]
        stored = db.execute("SELECT output_bytes, dropped_bytes FROM jobs WHERE id = ?",
                            (flood_id,)).fetchone()
    assert stored[0] <= 1024**2 and stored[0] + stored[1] > 1024**3, stored
    database = deployment.db_path.stat().st_size - archives
    assert database < 3 * 1024**2, database
    wal = deployment.db_path.with_name("ci_jobs.db-wal")
    assert not wal.exists() or wal.stat().st_size < 8 * 1024**2


# -------------------------------------------------------------------------- 5: odd output
ODD_OUTPUT_TEST = (
    "import sys\n"
    "def test_odd_output():\n"
    "    out = sys.stdout.buffer\n"
    "    out.write(b'\\nBIG:' + b'a' * (1024 * 1024) + b':END\\n')\n"
    "    out.write(b'BAD:\\xff\\xfe\\xc3(\\xed\\xa0\\x80\\xf0\\x9f\\x98:END\\n')\n"
    "    out.write(b'BIN:' + bytes(range(256)) + b':END\\n')\n"
    "    out.write(b'ANSI:\\x1b[31mred\\x1b[0m \\x1b[1;32mbold green\\x1b[0m:END\\n')\n"
    "    out.flush()\n"
)
# After pytest's own summary: the very last output of the job, without a newline.
ODD_CONFTEST = (
    "import sys\n"
    "def pytest_unconfigure(config):\n"
    "    sys.stdout.write('LAST LINE WITHOUT NEWLINE')\n"
    "    sys.stdout.flush()\n"
)
ODD_LINES = [
    b"BIG:" + b"a" * (1024 * 1024) + b":END\n",
    b"BAD:\xff\xfe\xc3(\xed\xa0\x80\xf0\x9f\x98:END\n",
    b"BIN:" + bytes(range(256)) + b":END\n",
    b"ANSI:\x1b[31mred\x1b[0m \x1b[1;32mbold green\x1b[0m:END\n",
]


def test_odd_output_is_stored_and_printed_faithfully(
    deployment: Deployment, tmp_path: Path
) -> None:
    site = start_site(deployment, tmp_path, CI_LOG_LIMIT="10MB")
    project = vendored_project(tmp_path / "odd", {"test_odd.py": ODD_OUTPUT_TEST,
                                                 "conftest.py": ODD_CONFTEST}, capture=False)
    # This job is over in about a second: the neighbour is already printing when it starts,
    # so the two surely run at the same time.
    neighbour = Neighbour.start(site)
    neighbour.wait_until_running()
    odd_id = site.submit_async(project)
    odd = site.wait_terminal(odd_id, timeout=120)
    neighbour.check()
    assert overlapped(odd, site.job(neighbour.job_id))
    assert (odd["status"], odd["success"]) == ("completed", True), odd
    expected = [line.decode("utf-8", "replace") for line in ODD_LINES]
    assert "\ufffd" in expected[1] and "\x1b[31m" in expected[3]

    events = site.output_events(odd_id)
    assert max(len(event["text"]) for event in events) < 1024 * 1024  # the big line was split
    streamed = "".join(event["text"] for event in events)
    for line in expected:
        assert line in streamed
    assert streamed.endswith("LAST LINE WITHOUT NEWLINE")

    printed = site.ci_bytes("wait", odd_id, "--all")
    assert printed.returncode == 0, printed.stderr[-2000:]
    text = printed.stdout.decode("utf-8")  # the client printed valid UTF-8
    for line in expected:
        assert line in text
    assert text.endswith("LAST LINE WITHOUT NEWLINE")
    assert b"Traceback" not in printed.stderr
    # the result line starts on a line of its own, after the unfinished last line
    # The result line, then the test report's summary (its duration varies).
    assert re.search(rb"running\n\n\xe2\x9c\x93 Tests passed \(exit code 0\)\n"
                     rb"\xe2\x9c\x93 1 passed in [\d.]+ s\n$", printed.stderr), printed.stderr


# -------------------------------------------------------------------------- 6: privileges
ESCAPE_TEST = r'''
import ctypes, errno, os, subprocess

libc = ctypes.CDLL(None, use_errno=True)


def status(text: str) -> dict:
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def test_no_engine_socket_and_no_engine_settings():
    for path in ("/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock"):
        assert not os.path.exists(path), path
    for top in ("/run", "/var/run", "/tmp", "/ci", "/root", "/etc"):
        for folder, _, files in os.walk(top):
            assert not [name for name in files if name.endswith(".sock")], folder
    assert not [name for name in os.environ if name.startswith("DOCKER")]


def test_no_capabilities_here_or_after_exec():
    mine = status(open("/proc/self/status").read())
    after_exec = status(subprocess.check_output(["cat", "/proc/self/status"], text=True))
    for fields in (mine, after_exec):
        for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(fields[name], 16) == 0, (name, fields[name])
        assert fields["NoNewPrivs"].strip() == "1"


def test_setuid_binaries_gain_nothing():
    out = subprocess.run(["su", "-s", "/bin/cat", "nobody", "-c", "/proc/self/status"],
                         capture_output=True, text=True)
    assert out.returncode != 0 or int(status(out.stdout)["CapEff"], 16) == 0
    mounted = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/mnt"], capture_output=True)
    assert mounted.returncode != 0


def test_cannot_change_uid_or_ownership():
    try:
        os.setuid(65534)
    except PermissionError:
        pass
    else:
        raise AssertionError("setuid(65534) worked without CAP_SETUID")
    assert os.getuid() == 0 and os.geteuid() == 0
    path = "/tmp/owned"
    open(path, "w").close()
    try:
        os.chown(path, 65534, 65534)
    except PermissionError:
        pass
    else:
        raise AssertionError("chown worked without CAP_CHOWN")


def test_mount_and_namespaces_are_refused():
    assert libc.mount(b"tmpfs", b"/mnt", b"tmpfs", 0, None) == -1
    assert ctypes.get_errno() == errno.EPERM
    for flag in (0x00020000, 0x10000000, 0x20000000):  # CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID
        assert libc.unshare(flag) == -1, hex(flag)
        assert ctypes.get_errno() == errno.EPERM
    assert subprocess.run(["unshare", "--user", "--map-root-user", "true"]).returncode != 0
'''


def test_escape_attempts_find_a_locked_down_container(
    deployment: Deployment, tmp_path: Path
) -> None:
    site = start_site(deployment, tmp_path)
    project = vendored_project(tmp_path / "escape", {"test_escape.py": ESCAPE_TEST})
    # This job is over in a second or two: the neighbour is already printing when it starts,
    # so the two surely run at the same time.
    neighbour = Neighbour.start(site)
    neighbour.wait_until_running()
    escape_id = site.submit_async(project)
    escape = site.wait_terminal(escape_id, timeout=120)
    neighbour.check()
    assert overlapped(escape, site.job(neighbour.job_id))
    waited = site.ci("wait", escape_id, "--all")
    assert (escape["status"], escape["success"]) == ("completed", True), waited.stdout[-3000:]
    assert "5 passed" in waited.stdout
