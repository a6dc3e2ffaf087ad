"""How soon `ci` gets going (issue #10, target ≤ 0.15 s each); prints numbers, asserts nothing.

1. `ci --help`, start to exit;
2. `ci list` against a live server replica, start to exit;
3. `ci submit test`, start to the first byte of its upload arriving at a listening socket (the
   socket then hangs up: only the client's start is measured, not the server's work).

Each is the console script users run (`.venv/bin/ci`), timed from just before the process is
spawned, the median of `runs`.
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

CI = Path(sys.executable).with_name("ci")


def _run_timed(argv: list[str], cwd: Path | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=False, timeout=60)
    return time.perf_counter() - started


def time_help(runs: int) -> float:
    """Median seconds of `ci --help`."""
    return statistics.median(_run_timed([str(CI), "--help"]) for _ in range(runs))


def time_list(server_url: str, api_key: str, runs: int) -> float:
    """Median seconds of `ci list` against a live server."""
    argv = [str(CI), "list", "--server", server_url, "--api-key", api_key]
    if subprocess.run(argv, capture_output=True, check=False, timeout=60).returncode != 0:
        raise SystemExit("bench: `ci list` failed against the bench server")
    return statistics.median(_run_timed(argv) for _ in range(runs))


def time_to_first_request(project: Path, api_key: str, runs: int) -> float:
    """Median seconds from starting `ci submit test` to the first byte of its request."""
    return statistics.median(_first_request_once(project, api_key) for _ in range(runs))


def _first_request_once(project: Path, api_key: str) -> float:
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
    started = time.perf_counter()
    proc = subprocess.Popen([str(CI), "submit", "test", "--server", f"http://127.0.0.1:{port}",
                             "--api-key", api_key], cwd=project, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    reader.join(30)
    listener.close()
    proc.kill()
    proc.wait(10)
    if not arrived:
        raise SystemExit("bench: `ci submit test` sent no request")
    return arrived[0] - started


def report(help_s: float, list_s: float, first_request_s: float, runs: int) -> None:
    print(f"client start (medians of {runs}; target ≤ 0.15 s each):")
    print(f"  ci --help:                          {help_s:6.3f} s")
    print(f"  ci list (live server):              {list_s:6.3f} s")
    print(f"  ci submit test → first request:     {first_request_s:6.3f} s")
