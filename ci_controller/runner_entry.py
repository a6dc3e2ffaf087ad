"""Run one job inside its container: unpack the project, install its requirements, run pytest.

Standalone and stdlib-only (Python 3.8+): the controller copies this file into the container
next to the job's `source.zip` and runs it as the container's command. Everything it reports
goes to its stdout as FRAMES, one JSON array per line:

    [frame_no, "stdout" | "stderr" | "phase", text]

`frame_no` counts from 1, so a controller that re-reads the output after a crash skips exactly
the frames it already stored. stdout/stderr frames carry the children's output, decoded with an
incremental UTF-8 decoder per stream (invalid bytes become U+FFFD), at most READ_CHUNK bytes of
input each, newlines included and never waited for.

With `--log-limit N` (the controller's log cap), output is written by a thread at most
EMIT_RATE bytes a second, and the children are read as fast as they write. Output waiting to be
written that is more than N bytes older than the newest is dropped: the controller would drop it
anyway, since it keeps only the last N bytes. A `skipped` frame (text: the byte count) stands
where it was. So a test printing a gigabyte costs seconds, not minutes, and never gets far
ahead of the controller, whose engine log file rotates away what it has not read.

Before its verdict, a run that wrote a JUnit XML report of at most MAX_JUNIT_KEPT bytes sends
it in `junit <piece>` phase frames (JUNIT_PIECE characters each, in order), then the `report`
summary frame. Phase frames are never dropped by the log limit.

Phase frames say how the run went; the last one is one of:

    invalid archive: <reason>        exit 101
    install failed (exit <N>)        exit 100
    tests exited <N>                 exit N (pytest's exit code)
    terminated                       exit 143 (SIGTERM: the job was cancelled)
    runner error: <message>          exit 102

With `--env-mode build|use` (the installed-environment cache, see ci_controller/envcache.py)
the requirements go into a virtualenv at `--env-dir` instead of the system's site-packages,
and phase frames before `tests started` say what became of it:

    env built {"id": …, "python": "3.11.2", "size": <bytes>}   the build succeeded: cache it
    env used <id>                     the cached environment was sound and is used as it is
    env broken <id>: <reason>         it was not (missing, half-written, other requirements…):
                                      the job installs afresh elsewhere, uncached
"""

from __future__ import annotations

import argparse
import codecs
import collections
import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import selectors
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
import zipfile
import zlib
from typing import Any
from xml.etree import ElementTree

STDOUT = "stdout"
STDERR = "stderr"
PHASE = "phase"
SKIPPED = "skipped"

READ_CHUNK = 64 * 1024  # bytes read from a child pipe at a time: the most one frame carries
COPY_BLOCK = 64 * 1024
LINGER_S = 1.0  # after a child exits, how long its leftover processes may keep writing
EMIT_RATE = 4 * 1024 * 1024  # bytes/s written under --log-limit: well within what the
# controller stores, so the engine's log file (2 x 16 MB or more) never rotates unread output
EMIT_BURST = 1024 * 1024  # bytes written at once before the rate applies
MAX_HELD = 64 * 1024 * 1024  # bytes of output held back at most (it lives in the job's memory)

EXIT_INSTALL_FAILED = 100
EXIT_INVALID_ARCHIVE = 101
EXIT_RUNNER_ERROR = 102
EXIT_TERMINATED = 143

PIP_FLAGS = ["--no-input", "--progress-bar", "off"]
PYTEST_ARGS = ["-v", "-p", "no:cacheprovider"]
JUNIT_NAME = "junit.xml"  # pytest's report, written beside the work dir (not in the project)
REPORT_PREFIX = "report "  # a phase frame: REPORT_PREFIX + the JSON of summarize_junit
ENV_BUILT_PREFIX = "env built "  # + JSON {"id", "python", "size"}
ENV_USED_PREFIX = "env used "  # + the entry id
ENV_BROKEN_PREFIX = "env broken "  # + the entry id + ": " + reason
TESTS_STARTED = "tests started"
ENV_MARKER = ".ci-env.json"  # written into the environment last: its presence means complete
LOCAL_ENV_DIR = "/ci/local-env"  # where a job whose cached environment is broken installs
JUNIT_PREFIX = "junit "  # a phase frame: JUNIT_PREFIX + the next piece of the XML report
JUNIT_PIECE = 32 * 1024  # characters of XML per frame: a frame line stays well under 1 MB
MAX_JUNIT_KEPT = 4 * 1024 * 1024  # bytes of XML sent to be stored; a larger report is not
MAX_JUNIT_BYTES = 64 * 1024 * 1024  # a larger report is not read (the counts are then absent)
MAX_FAILING = 50  # failing test ids reported
SLOWEST = 5  # slowest tests reported
MAX_TEST_ID = 1000  # characters of a test id kept


class InvalidArchive(Exception):
    """The archive is not a safe zip of a project; the message is the reason."""


class Terminated(Exception):
    """SIGTERM arrived: stop the children and exit."""


class Outbox:
    """Frames waiting to be written; beyond `limit` bytes of output, the oldest is dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: collections.deque[tuple[str, str, int]] = collections.deque()
        self.front: list[str] = []  # phases that output was dropped around: written first
        self.held = 0  # bytes of output in items
        self.skipped = 0  # bytes dropped since the last `skipped` frame
        self.closed = False
        self.cond = threading.Condition()

    def put(self, kind: str, text: str) -> None:
        size = len(text.encode("utf-8", "replace")) if kind != PHASE else 0
        with self.cond:
            self.items.append((kind, text, size))
            self.held += size
            # Keep at least `limit` bytes: the controller's cap keeps the last `limit` bytes,
            # so what goes here is older than anything it would keep.
            while self.held > self.limit:
                kind, text, size = self.items[0]
                if kind == PHASE:
                    self.front.append(text)
                elif self.held - size < self.limit:
                    break
                else:
                    self.held -= size
                    self.skipped += size
                self.items.popleft()
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()

    def take(self, max_bytes: int) -> list[tuple[str, str]] | None:
        """Frames to write, up to max_bytes of output (one piece at least); None when done."""
        with self.cond:
            while not (self.front or self.skipped or self.items or self.closed):
                self.cond.wait()
            frames = [(PHASE, text) for text in self.front]
            self.front.clear()
            if self.skipped:
                frames.append((SKIPPED, str(self.skipped)))
                self.skipped = 0
            taken = 0
            while self.items and (taken == 0 or taken + self.items[0][2] <= max_bytes):
                kind, text, size = self.items.popleft()
                self.held -= size
                taken += size
                frames.append((kind, text))
            return frames or None


class Emitter:
    """Writes numbered frames to a file descriptor, one line each.

    With a log limit, a thread writes them (see the module docstring); without, emit() does.
    """

    def __init__(self, fd: int = 1, log_limit: int = 0) -> None:
        self.fd = fd
        self.number = 0
        self.outbox: Outbox | None = None
        self.writer: threading.Thread | None = None
        if log_limit > 0:
            self.outbox = Outbox(min(log_limit, MAX_HELD))
            self.writer = threading.Thread(target=self._write_loop, daemon=True)
            self.writer.start()

    def emit(self, kind: str, text: str) -> None:
        if self.outbox is not None:
            self.outbox.put(kind, text)
        else:
            self._write(kind, text)

    def close(self) -> None:
        """Write everything still held (at full speed: at most the limit), then return."""
        if self.outbox is not None and self.writer is not None:
            self.outbox.close()
            self.writer.join()

    def _write_loop(self) -> None:
        allowance = float(EMIT_BURST)
        last = time.monotonic()
        while True:
            # Wait for allowance BEFORE taking: what waits in the outbox can still be dropped.
            assert self.outbox is not None
            while allowance <= 0 and not self.outbox.closed:
                time.sleep(min(-allowance / EMIT_RATE, 0.1) + 0.001)
                now = time.monotonic()
                allowance = min(allowance + (now - last) * EMIT_RATE, EMIT_BURST)
                last = now
            # Whole bursts, not single pieces: a flood shows one `skipped` line per burst.
            frames = self.outbox.take(EMIT_BURST)
            if frames is None:
                return
            for kind, text in frames:
                self._write(kind, text)
                if kind != PHASE:
                    allowance -= len(text)
            now = time.monotonic()
            allowance = min(allowance + (now - last) * EMIT_RATE, EMIT_BURST)
            last = now

    def _write(self, kind: str, text: str) -> None:
        self.number += 1
        line = json.dumps([self.number, kind, text], ensure_ascii=False) + "\n"
        data = line.encode("utf-8", "replace")
        while data:
            written = os.write(self.fd, data)
            data = data[written:]

    def phase(self, text: str) -> None:
        self.emit(PHASE, text)


# ----------------------------------------------------------------------------- unpacking
def safe_relative_parts(name: str) -> list[str]:
    """The path parts of a zip entry name, refusing absolute paths and `..`."""
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or (len(normalized) > 1 and normalized[1] == ":"):
        raise InvalidArchive("absolute path in archive: " + name)
    parts = [part for part in normalized.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise InvalidArchive("path escapes the project: " + name)
    return parts


def unpack(archive: str, dest: str, max_bytes: int, max_entries: int) -> int:
    """Extract the zip into dest safely; returns the bytes written. Raises InvalidArchive."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InvalidArchive("not a zip file (" + str(exc) + ")") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > max_entries:
            raise InvalidArchive(f"more than {max_entries} entries")
        written = 0
        os.makedirs(dest, exist_ok=True)
        for info in infos:
            parts = safe_relative_parts(info.filename)
            if not parts:
                continue
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise InvalidArchive("symbolic link in archive: " + info.filename)
            target = os.path.join(dest, *parts)
            try:
                if info.is_dir():
                    os.makedirs(target, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                written = _copy_entry(zf, info, target, written, max_bytes)
            except InvalidArchive:
                raise
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError,
                    zlib.error, OSError, ValueError) as exc:
                raise InvalidArchive("cannot extract " + info.filename + ": " + str(exc)) from None
        return written


def _copy_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: str, written: int,
                max_bytes: int) -> int:
    # Header sizes can lie (zip bombs): count what the decompressor really produces.
    with zf.open(info) as source, open(target, "wb") as sink:
        while True:
            block = source.read(COPY_BLOCK)
            if not block:
                return written
            written += len(block)
            if written > max_bytes:
                raise InvalidArchive(f"unpacks to more than {max_bytes} bytes")
            sink.write(block)


# ----------------------------------------------------------------------------- children
class Runner:
    """Runs child processes one at a time, streaming their output as frames."""

    def __init__(self, emitter: Emitter) -> None:
        self.emitter = emitter
        self.child: subprocess.Popen[bytes] | None = None
        self.terminated = False

    def on_sigterm(self, signum: int, frame: Any) -> None:
        self.terminated = True
        self._signal_children(signal.SIGTERM)

    def _signal_children(self, signum: int) -> None:
        child = self.child
        if child is not None:
            with contextlib.suppress(OSError):
                os.killpg(child.pid, signum)

    def run(self, command: list[str], cwd: str, env: dict[str, str] | None = None) -> int:
        """Run command with its output framed; returns its exit code (negative: signal)."""
        if self.terminated:
            raise Terminated()
        # Like a CI log: the command first, so the user sees which step an error belongs to.
        shown = ["python" if word == sys.executable else word for word in command]
        if command[0].endswith("/bin/python"):  # an environment's interpreter
            shown[0] = "python"
        self.emitter.emit(STDOUT, "$ " + shlex.join(shown) + "\n")
        # Its own session: SIGTERM and the final cleanup reach every process it started.
        child = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 start_new_session=True)
        self.child = child
        if self.terminated:  # SIGTERM landed between the check above and this line
            self._signal_children(signal.SIGTERM)
        try:
            self._pump(child)
            return child.wait()
        finally:
            self._signal_children(signal.SIGKILL)  # leftovers of a finished child
            self.child = None
            if self.terminated:
                raise Terminated()

    def _pump(self, child: subprocess.Popen[bytes]) -> None:
        selector = selectors.DefaultSelector()
        decoders: dict[str, codecs.IncrementalDecoder] = {}
        assert child.stdout is not None and child.stderr is not None
        for name, pipe in ((STDOUT, child.stdout), (STDERR, child.stderr)):
            selector.register(pipe.fileno(), selectors.EVENT_READ, name)
            decoders[name] = codecs.getincrementaldecoder("utf-8")("replace")
        exited_at: float | None = None
        try:
            while selector.get_map():
                # A grandchild may hold the pipes open after the child exited: give it a moment.
                if exited_at is None and child.poll() is not None:
                    exited_at = time.monotonic()
                if exited_at is not None and time.monotonic() - exited_at > LINGER_S:
                    break
                for key, _ in selector.select(timeout=0.1):
                    data = os.read(key.fd, READ_CHUNK)
                    if not data:
                        selector.unregister(key.fd)
                        text = decoders[key.data].decode(b"", final=True)
                    else:
                        text = decoders[key.data].decode(data)
                    if text:
                        self.emitter.emit(key.data, text)
        finally:
            selector.close()
            child.stdout.close()
            child.stderr.close()


def has_requirements(path: str) -> bool:
    """Whether requirements.txt names anything to install (not only blanks and comments)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        return any(line.strip() and not line.strip().startswith("#") for line in handle)


def pytest_missing(cwd: str, python: str = sys.executable) -> bool:
    """Whether pytest cannot be imported (the project did not ask for it)."""
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('pytest') is None)"
    return subprocess.call([python, "-c", probe], cwd=cwd,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) != 0


def test_environment(workdir: str) -> dict[str, str]:
    """The environment for pytest: src/ importable as in a src-layout project."""
    env = dict(os.environ)
    src = os.path.join(workdir, "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def node_id(classname: str, name: str, workdir: str) -> str:
    """pytest's node id of a JUnit testcase: `tests.test_calc.TestX` and `test_a` become
    `tests/test_calc.py::TestX::test_a` when that file exists, else `classname::name`."""
    parts = classname.split(".") if classname else []
    for cut in range(len(parts), 0, -1):
        path = "/".join(parts[:cut]) + ".py"
        if os.path.isfile(os.path.join(workdir, path)):
            return "::".join([path, *parts[cut:], name])
    return "::".join([classname, name]) if classname else name


def summarize_junit(path: str, workdir: str) -> dict[str, Any] | None:
    """Counts, failing and slowest tests from pytest's JUnit XML; None when there is none."""
    try:
        if os.path.getsize(path) > MAX_JUNIT_BYTES:
            return None
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failing: list[str] = []
    timed: list[tuple[float, str]] = []
    for case in root.iter("testcase"):
        test = node_id(case.get("classname", ""), case.get("name", ""), workdir)[:MAX_TEST_ID]
        failed, errored = case.find("failure") is not None, case.find("error") is not None
        if failed or errored:
            counts["failed"] += failed
            counts["errors"] += errored
            if len(failing) < MAX_FAILING:
                failing.append(test)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
        timed.append((_seconds(case.get("time")), test))
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    timed.sort(key=lambda item: -item[0])
    return {**counts, "duration_s": round(sum(_seconds(s.get("time")) for s in suites), 3),
            "failing": failing,
            "slowest": [[test, round(seconds, 3)] for seconds, test in timed[:SLOWEST]]}


def _seconds(text: str | None) -> float:
    try:
        value = float(text or 0)
    except ValueError:
        return 0.0
    return value if value >= 0 and value != float("inf") else 0.0


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes (requirements.txt: the cache key's part)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(COPY_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_size(path: str) -> int:
    """Bytes of the regular files under path (what `du -sb` calls the apparent size)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                info = os.lstat(os.path.join(root, name))
                if stat.S_ISREG(info.st_mode):
                    total += info.st_size
    return total


def env_problem(env_dir: str, requirements_sha256: str) -> str | None:
    """Why a cached environment cannot be used as it is; None when it is sound."""
    try:
        with open(os.path.join(env_dir, ENV_MARKER), encoding="utf-8") as handle:
            marker = json.load(handle)
    except (OSError, ValueError):
        return "it is missing or was never completed"
    if not isinstance(marker, dict) or marker.get("requirements_sha256") != requirements_sha256:
        return "it was built from another requirements.txt"
    if marker.get("python") != platform.python_version():
        return f"it was built with Python {marker.get('python')}"
    if not os.access(os.path.join(env_dir, "bin", "python"), os.X_OK):
        return "its interpreter is missing"
    # Without a subprocess (this runs on every hit): in the venv's own site-packages, or in
    # the system's, which this interpreter sees as the venv does.
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    site = os.path.join(env_dir, "lib", version, "site-packages")
    if not (os.path.isfile(os.path.join(site, "pytest", "__init__.py"))
            or importlib.util.find_spec("pytest") is not None):
        return "pytest is missing from it"
    return None


def make_venv(env_dir: str, workdir: str) -> bool:
    """An empty virtualenv at env_dir (quietly: a failure has a fallback, not an error)."""
    return subprocess.call([sys.executable, "-m", "venv", "--without-pip",
                            "--system-site-packages", env_dir], cwd=workdir,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0


def install_system(args: argparse.Namespace, emitter: Emitter, runner: Runner,
                   requirements: str) -> bool:
    """The requirements (and pytest) into the image's own Python; False if pip failed."""
    pip = [sys.executable, "-m", "pip", "install"] + PIP_FLAGS
    if has_requirements(requirements):
        code = runner.run(pip + ["-r", "requirements.txt"], cwd=args.workdir)
        if code != 0:
            emitter.phase(f"install failed (exit {code})")
            return False
    if pytest_missing(args.workdir):
        code = runner.run(pip + ["pytest"], cwd=args.workdir)
        if code != 0:
            emitter.phase(f"install failed (exit {code})")
            return False
    return True


def build_env(env_dir: str, workdir: str, runner: Runner, has_reqs: bool) -> int:
    """The requirements (and pytest) into the virtualenv at env_dir; pip's exit code.

    It was made with `--system-site-packages`, which keeps what the image provides visible,
    as without the cache, and `--without-pip`, which takes milliseconds: the image's pip
    installs into it.
    """
    pip = [os.path.join(env_dir, "bin", "python"), "-m", "pip", "install"] + PIP_FLAGS
    if has_reqs:
        code = runner.run(pip + ["-r", "requirements.txt"], cwd=workdir)
        if code != 0:
            return code
    if pytest_missing(workdir, os.path.join(env_dir, "bin", "python")):
        return runner.run(pip + ["pytest"], cwd=workdir)
    return 0


def prepare_env(args: argparse.Namespace, emitter: Emitter, runner: Runner,
                requirements: str) -> str | None:
    """Install into (or reuse) the job's environment; its interpreter, None if pip failed."""
    sha = file_sha256(requirements)
    # The controller keyed the entry on the requirements.txt it read from the archive; should
    # the unpacked one differ (a zip with two such entries), nothing is used or cached.
    same = sha == args.env_sha256
    env_dir = args.env_dir
    cacheable = args.env_mode == "build" and same
    if args.env_mode == "use":
        problem = env_problem(env_dir, sha) if same else "requirements.txt is not the one keyed"
        if problem is None:
            emitter.emit(STDOUT, f"[ci] {args.env_note}\n")
            emitter.phase(ENV_USED_PREFIX + args.env_id)
            return os.path.join(env_dir, "bin", "python")
        emitter.phase(f"{ENV_BROKEN_PREFIX}{args.env_id}: {problem}")
        emitter.emit(STDOUT, f"[ci] cached environment unusable ({problem}); installing "
                             "dependencies\n")
        env_dir = LOCAL_ENV_DIR
    else:
        emitter.emit(STDOUT, f"[ci] {args.env_note}\n")
        if not same:
            env_dir = LOCAL_ENV_DIR
    if not make_venv(env_dir, args.workdir):
        # An image without the venv module: install as without the cache, and cache nothing.
        emitter.emit(STDOUT, "[ci] cannot make a virtualenv in this image; installing into "
                             "its Python, uncached\n")
        return sys.executable if install_system(args, emitter, runner, requirements) else None
    code = build_env(env_dir, args.workdir, runner, has_requirements(requirements))
    if code != 0:
        emitter.phase(f"install failed (exit {code})")
        return None
    if cacheable:
        python = platform.python_version()
        with open(os.path.join(env_dir, ENV_MARKER), "w", encoding="utf-8") as handle:
            json.dump({"requirements_sha256": sha, "python": python}, handle)
        emitter.phase(ENV_BUILT_PREFIX + json.dumps(
            {"id": args.env_id, "python": python, "size": tree_size(env_dir)}))
    return os.path.join(env_dir, "bin", "python")

def send_junit(path: str, emitter: Emitter) -> None:
    """The XML report as `junit` phase frames, when there is one within MAX_JUNIT_KEPT."""
    try:
        if os.path.getsize(path) > MAX_JUNIT_KEPT:
            return
        with open(path, encoding="utf-8", errors="replace") as handle:
            xml = handle.read()
    except OSError:
        return
    for start in range(0, len(xml), JUNIT_PIECE):
        emitter.phase(JUNIT_PREFIX + xml[start:start + JUNIT_PIECE])


def run_job(args: argparse.Namespace, emitter: Emitter, runner: Runner) -> int:
    """Unpack, install, test; returns the exit code of the container."""
    try:
        unpack(args.archive, args.workdir, args.max_bytes, args.max_entries)
        requirements = os.path.join(args.workdir, "requirements.txt")
        if not os.path.isfile(requirements):
            raise InvalidArchive("requirements.txt is missing")
    except InvalidArchive as exc:
        emitter.phase("invalid archive: " + str(exc))
        return EXIT_INVALID_ARCHIVE
    emitter.phase("install started")
    if args.env_mode != "none":
        python = prepare_env(args, emitter, runner, requirements)
        if python is None:
            return EXIT_INSTALL_FAILED
        return run_tests(args, emitter, runner, python)
    if not install_system(args, emitter, runner, requirements):
        return EXIT_INSTALL_FAILED
    return run_tests(args, emitter, runner, sys.executable)


def run_tests(args: argparse.Namespace, emitter: Emitter, runner: Runner, python: str) -> int:
    """Run pytest with `python`, report, and return the container's exit code."""
    emitter.phase(TESTS_STARTED)
    junit = os.path.join(os.path.dirname(args.workdir), JUNIT_NAME)
    env = test_environment(args.workdir)
    # Through the environment, not the command line: the command shown to the user stays the
    # one they would type, and it wins over a --junitxml in the project's own addopts.
    env["PYTEST_ADDOPTS"] = f"--junitxml={junit}"
    if python != sys.executable:  # the environment's scripts (console entry points) first
        env["PATH"] = os.path.dirname(python) + os.pathsep + env.get("PATH", "")
        env["VIRTUAL_ENV"] = os.path.dirname(os.path.dirname(python))
    # The user's arguments last, as separate argv entries (the server refused those that
    # would defeat the report); PYTEST_ARGS come first so the user's may refine them.
    code = runner.run([python, "-m", "pytest", *PYTEST_ARGS, *args.pytest_args],
                      cwd=args.workdir, env=env)
    send_junit(junit, emitter)
    summary = summarize_junit(junit, args.workdir)
    if summary is not None:
        emitter.phase(REPORT_PREFIX + json.dumps(summary, ensure_ascii=False))
    emitter.phase(f"tests exited {code}")
    return code if 0 <= code <= 255 else 128 + (-code % 128)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run a CI job inside its container.")
    parser.add_argument("--archive", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--max-bytes", type=int, required=True)
    parser.add_argument("--max-entries", type=int, required=True)
    parser.add_argument("--log-limit", type=int, default=0,
                        help="bytes of output the controller keeps (0: no limit, no dropping)")
    parser.add_argument("--pytest-args", default="[]",
                        help="JSON list of extra arguments for pytest (one argv entry: no "
                             "shell, no splitting)")
    parser.add_argument("--env-mode", choices=("none", "build", "use"), default="none",
                        help="none: install into the system; build: into a new environment "
                             "at --env-dir; use: run with the one there if it is sound")
    parser.add_argument("--env-dir", default="/ci/env")
    parser.add_argument("--env-id", default="", help="the cache entry (echoed in env phases)")
    parser.add_argument("--env-sha256", default="", help="requirements.txt's hash it is keyed on")
    parser.add_argument("--env-note", default="", help="the line shown before installing/using")
    args = parser.parse_args(argv)
    args.workdir = os.path.abspath(args.workdir)
    try:
        extra = json.loads(args.pytest_args)
    except ValueError:
        extra = None
    if not isinstance(extra, list) or not all(isinstance(arg, str) for arg in extra):
        parser.error("--pytest-args must be a JSON list of strings")
    args.pytest_args = extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Anything the runner itself prints (a traceback) lands on stdout, between frames, where
    # the controller passes it through as unframed text.
    os.dup2(1, 2)
    emitter = Emitter(1, args.log_limit)
    runner = Runner(emitter)
    signal.signal(signal.SIGTERM, runner.on_sigterm)
    try:
        return run_job(args, emitter, runner)
    except Terminated:
        emitter.phase("terminated")
        return EXIT_TERMINATED
    except Exception as exc:  # the job must end with a phase frame, whatever went wrong
        emitter.emit(STDERR, traceback.format_exc())
        emitter.phase(f"runner error: {exc}")
        return EXIT_RUNNER_ERROR
    finally:
        emitter.close()


if __name__ == "__main__":
    sys.exit(main())
