"""How soon `ci` gets going (issue #10, target ≤ 0.15 s each); prints numbers, asserts nothing.

    .venv/bin/python bench/run.py --client-start [--runs 20] [--history 10000]

Each command is the console script users run (`.venv/bin/ci`), timed from just before its
process is spawned; the figures are medians of `runs`, wall time and the CPU time (user + sys)
the process used, which a busy machine inflates less than wall time:

1. baseline: `python -c pass` with the same interpreter, in the same run (what no Python
   program can beat on this machine);
2. `ci --help`, start to exit;
3. `ci list` against a live server replica (SQLite), start to exit; with `--history N` the
   bench user first gets N finished jobs, so a growing history would show here;
4. `ci submit test` for examples/calculator, start until the first byte of its upload arrives
   at a listening socket (which then hangs up: the client's start is measured, packing
   included, not the server's work). This is "the start of submit".
"""

from __future__ import annotations

import compileall
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.summary import Figure

if TYPE_CHECKING:
    from ci_common.repository import Repository

CI = Path(sys.executable).with_name("ci")
TARGET_S = 0.15


@dataclass(frozen=True)
class Timing:
    """Median wall and CPU seconds of one command."""

    wall_s: float
    cpu_s: float


def compile_sources() -> None:
    """Byte-compile the client's packages first, as pip does at install: in a checkout edited
    under PYTHONDONTWRITEBYTECODE=1, stale caches would make every start compile source."""
    root = Path(__file__).resolve().parents[1]
    for package in ("ci_client", "ci_common"):
        compileall.compile_dir(root / package, quiet=1)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _median(samples: list[tuple[float, float]]) -> Timing:
    return Timing(statistics.median(wall for wall, _ in samples),
                  statistics.median(cpu for _, cpu in samples))


def _run_timed(argv: list[str], cwd: Path | None = None) -> tuple[float, float]:
    cpu_before = _children_cpu_s()
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # wait() without a timeout blocks in waitpid and returns the moment the process ends.
    # With a timeout (as subprocess.run(timeout=…) does) it polls, every 50 ms once past the
    # first 64 ms, which rounded every figure up to 0.064, 0.114, 0.164 s… So a watchdog
    # thread kills a hung command instead.
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        proc.wait()
    finally:
        watchdog.cancel()
    return time.perf_counter() - started, _children_cpu_s() - cpu_before


def time_baseline(runs: int) -> Timing:
    """`python -c pass` with the interpreter `ci` runs on."""
    return _median([_run_timed([sys.executable, "-c", "pass"]) for _ in range(runs)])


def time_help(runs: int) -> Timing:
    """`ci --help`."""
    return _median([_run_timed([str(CI), "--help"]) for _ in range(runs)])


def time_list(server_url: str, api_key: str, runs: int) -> Timing:
    """`ci list` against a live server."""
    argv = [str(CI), "list", "--server", server_url, "--api-key", api_key]
    if subprocess.run(argv, capture_output=True, check=False, timeout=60).returncode != 0:
        raise SystemExit("bench: `ci list` failed against the bench server")
    return _median([_run_timed(argv) for _ in range(runs)])


def time_to_first_request(project: Path, api_key: str, runs: int) -> Timing:
    """From starting `ci submit test` to the first byte of its upload."""
    return _median([_first_request_once(project, api_key) for _ in range(runs)])


def _first_request_once(project: Path, api_key: str) -> tuple[float, float]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    arrived: list[float] = []

    def accept() -> None:
        conn, _ = listener.accept()
        with conn:
            if conn.recv(1):
                arrived.append(time.perf_counter())

    reader = threading.Thread(target=accept, daemon=True)
    reader.start()
    cpu_before = _children_cpu_s()
    started = time.perf_counter()
    proc = subprocess.Popen([str(CI), "submit", "test", "--server", f"http://127.0.0.1:{port}",
                             "--api-key", api_key], cwd=project, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    reader.join(30)
    listener.close()
    proc.kill()  # its CPU up to here is (a little more than) what it used to get there
    proc.wait(10)
    if not arrived:
        raise SystemExit("bench: `ci submit test` sent no request")
    return arrived[0] - started, _children_cpu_s() - cpu_before


def add_history(repository: Repository, user_id: str, count: int) -> None:
    """Give the user `count` finished (cancelled) jobs, as a long-time user has."""
    for _ in range(count):
        job = repository.create_job(user_id, b"PK\x05\x06" + bytes(18), None)  # an empty zip
        repository.request_cancel(job.id, user_id)  # queued and unclaimed: cancelled at once


def report(timings: dict[str, Timing], runs: int, history: int) -> None:
    """One line per command: wall and CPU medians, and the wall time over the baseline."""
    base = timings["python -c pass (baseline)"]
    print(f"client start (medians of {runs}; target ≤ {TARGET_S} s wall each; "
          f"the bench user has {history} finished jobs):")
    for name, timing in timings.items():
        over = "" if timing is base else f"  {timing.wall_s - base.wall_s:+6.3f} s vs baseline"
        mark = "" if timing is base else ("  ✓" if timing.wall_s <= TARGET_S else "  ✗")
        print(f"  {name:34s} {timing.wall_s:6.3f} s wall  {timing.cpu_s:6.3f} s CPU{over}{mark}")


def figures(timings: dict[str, Timing]) -> list[Figure]:
    """Each command's wall time against the target (the baseline is context, not a figure)."""
    base = timings["python -c pass (baseline)"]
    return [Figure(f"client start: {name}", f"{timing.wall_s:.3f} s (python -c pass "
                   f"{base.wall_s:.3f} s)", f"≤ {TARGET_S} s", timing.wall_s <= TARGET_S)
            for name, timing in timings.items() if timing is not base]
