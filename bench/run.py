"""Speed of the main path against a fresh local deployment; prints numbers, asserts nothing.

    .venv/bin/python bench/run.py [--runs 5] [--client-start [--history N]] [--only SECTION ...]

1. submit → first test-output line at the client, and submit → exit, for examples/calculator;
   the same `pip install -r requirements.txt && python -m pytest -v` with a plain `docker run`,
   measured in the same run, and the ratio between the two (target ≤ 1.10).
2. Line latency from the container's print to the client (p50, p95, max; targets ≤ 10 ms and
   ≤ 100 ms) for a test that prints a timestamp every 100 ms.
3. How soon `ci` gets going: `ci --help`, `ci list` against the bench server, and `ci submit
   test` to its first request, beside `python -c pass` (targets ≤ 0.15 s; see
   bench/client_start.py). `--client-start` measures only these (a server, no controller, no
   Docker); `--history N` first gives the bench user N finished jobs.
4. `idle`: CPU of an idle replica and an idle controller on SQLite and PostgreSQL, empty and
   with 10,000 finished jobs, and `ci list` time (targets < 0.5 % of a core; bench/idle.py).
5. `watchers`: 1,000 SSE watchers of one job on one replica, on SQLite and on PostgreSQL:
   every line once and in order, replica CPU (target ≤ 25 %) and line latency under that load
   (bench/watchers.py).
6. `several-hosts` (also `--several-hosts [--jobs 120]`): only the load on several Docker
   hosts, on PostgreSQL and SQLite (3 engines with a controller each, 3 replicas, 4 users;
   bench/several_hosts.py).
7. `env-cache` (also `--env-cache`): only the installed-environment cache's figures
   (bench/env_cache.py): a hit, a miss and 4 hits at once against plain `docker run`s. (In 1.,
   the repeated submits of one project start from the cached environment, as users' repeated
   runs do.)

`--only main|client-start|latency|idle|watchers|several-hosts|env-cache|all`
(repeatable; `all` is main, env-cache, idle and watchers: every figure of issue #10) runs just those
sections; sections 1–3 are `main` (`latency`: section 2 alone, on both backends), and
sections 4–7 run only when named (they take minutes). Every run ends with one table of the
headline figures it measured, each beside its issue #10 target and marked ✓ or ✗
(bench/summary.py).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench import client_start, env_cache, idle, several_hosts, watchers  # noqa: E402
from bench.backends import database  # noqa: E402
from bench.summary import Figure, print_table  # noqa: E402
from tests.e2e.harness import Deployment, write_project  # noqa: E402

EXAMPLE = REPO_ROOT / "examples" / "calculator"
CA_IN_CONTAINER = "/etc/ci/ca-bundle.crt"
TIMESTAMP_TEST = (
    "import time\n"
    "def test_ticks():\n"
    "    for _ in range({count}):\n"
    "        print(f'tick {{time.time():.6f}}', flush=True)\n"
    "        time.sleep(0.1)\n"
)


def timed_submit(dep: Deployment, project: Path, key: str) -> tuple[float, float]:
    """(seconds to the first pytest line on stdout, seconds to exit) of `ci submit test`."""
    started = time.perf_counter()
    proc = dep.ci_popen("submit", "test", cwd=project, server=dep.processes[-1], api_key=key)
    assert proc.stdout is not None
    first_line = None
    for _line in proc.stdout:
        if first_line is None:
            first_line = time.perf_counter() - started
    proc.wait()
    total = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"bench job failed: {proc.stderr.read() if proc.stderr else ''}")
    return first_line or total, total


def timed_docker_run(image: str, project: Path, ca_bundle: str | None) -> float:
    """The same work with a bare `docker run`: what a user would do by hand."""
    argv = ["docker", "run", "--rm", "-v", f"{project}:/src:ro", "-e", "PYTHONUNBUFFERED=1",
            "-e", "PIP_BREAK_SYSTEM_PACKAGES=1", "-e", "PIP_ROOT_USER_ACTION=ignore",
            "-e", "PIP_DISABLE_PIP_VERSION_CHECK=1"]
    if ca_bundle:
        argv += ["-v", f"{ca_bundle}:{CA_IN_CONTAINER}:ro", "-e", f"PIP_CERT={CA_IN_CONTAINER}"]
    argv += [image, "sh", "-c",
             "cp -r /src /work && cd /work && pip install -q -r requirements.txt && "
             "python -m pytest -v -p no:cacheprovider"]
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - started


def line_latencies(dep: Deployment, project: Path, key: str) -> list[float]:
    """Milliseconds from each `tick <time>` print in the container to its arrival here."""
    proc = dep.ci_popen("submit", "test", cwd=project, server=dep.processes[-1], api_key=key)
    assert proc.stdout is not None
    latencies = []
    for line in proc.stdout:
        arrived = time.time()
        if line.startswith("tick "):
            latencies.append((arrived - float(line.split()[1])) * 1000)
    proc.wait()
    return latencies


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ticks", type=int, default=100)
    parser.add_argument("--client-start", action="store_true",
                        help="only measure how soon `ci` gets going (no Docker needed)")
    parser.add_argument("--history", type=int, default=0,
                        help="with --client-start: finished jobs the bench user has first")
    parser.add_argument("--several-hosts", action="store_true",
                        help="only the load on several Docker hosts (bench/several_hosts.py)")
    parser.add_argument("--jobs", type=int, default=120, help="jobs for --several-hosts")
    parser.add_argument("--env-cache", action="store_true",
                        help="only measure the installed-environment cache (hit, miss, 4 at once)")
    parser.add_argument("--only", action="append", choices=[*SECTIONS, "all"],
                        help="run only this section (repeatable); default: main; all: "
                             "main, env-cache, idle and watchers")
    args = parser.parse_args()
    only = args.only or (["client-start"] if args.client_start else
                         ["several-hosts"] if args.several_hosts else
                         ["env-cache"] if args.env_cache else ["main"])
    if "all" in only:  # every figure of issue #10, one after the other
        only = ["main", "env-cache", "idle", "watchers"]
    figures: list[Figure] = []
    for name in only:
        figures += SECTIONS[name](args)
    print_table(figures)


def main_section(args: argparse.Namespace) -> list[Figure]:
    """Sections 1-3 against one deployment."""
    image = subprocess.run([str(REPO_ROOT / "scripts" / "ensure-docker")], check=True,
                           capture_output=True, text=True).stdout.strip().splitlines()[-1]
    ca_bundle = subprocess.run([str(REPO_ROOT / "scripts" / "host-ca-bundle")], check=True,
                               capture_output=True, text=True).stdout.strip()
    workdir = Path(tempfile.mkdtemp(prefix="ci-bench-"))
    dep = Deployment(workdir=workdir, runner_image=image, ca_bundle=ca_bundle)
    if args.env_cache:
        return env_cache_only(dep, workdir, image, ca_bundle, args.runs)
    try:
        dep.start_controller()
        dep.start_server()
        key = dep.create_user("bench@example.com").api_key
        project = workdir / "calculator"
        shutil.copytree(EXAMPLE, project)
        ticks = write_project(workdir / "ticks",
                              {"test_ticks.py": TIMESTAMP_TEST.format(count=args.ticks)},
                              capture=False)

        timed_submit(dep, project, key)  # warm-up: page cache, pip's index metadata
        timed_docker_run(image, project, ca_bundle)
        first_lines, totals, baselines = [], [], []
        for _ in range(args.runs):  # interleaved, so drift hits both sides alike
            first, total = timed_submit(dep, project, key)
            first_lines.append(first)
            totals.append(total)
            baselines.append(timed_docker_run(image, project, ca_bundle))

        latencies = line_latencies(dep, ticks, key)
        starts = measure_client_start(dep, project, key, args.runs)
    finally:
        dep.close()
        shutil.rmtree(workdir, ignore_errors=True)

    ours, theirs = statistics.median(totals), statistics.median(baselines)
    print(f"runs: {args.runs} (medians); image: {image}")
    print(f"submit → first test-output line:   {statistics.median(first_lines):6.2f} s")
    print(f"submit → exit (ci submit test):     {ours:6.2f} s")
    print(f"docker run baseline (same work):    {theirs:6.2f} s")
    print(f"ratio ci / docker run:              {ours / theirs:6.3f}   (target ≤ 1.10)")
    print(f"line latency over {len(latencies)} lines: p50 {percentile(latencies, 0.5):.1f} ms, "
          f"p95 {percentile(latencies, 0.95):.1f} ms, max {max(latencies):.1f} ms   "
          f"(targets p50 ≤ 10 ms, max ≤ 100 ms)")
    client_start.report(starts, args.runs, history=0)
    return [Figure("calculator, submit → exit vs docker run", f"{ours:.2f} s "
                   f"({ours / theirs:.2f} × {theirs:.2f} s)", "≤ 1.10 ×", ours / theirs <= 1.10),
            *latency_figures("sqlite", latencies), *client_start.figures(starts)]


def latency_figures(backend: str, latencies: list[float]) -> list[Figure]:
    p50, worst = percentile(latencies, 0.5), max(latencies)
    return [Figure(f"line latency p50, {backend}", f"{p50:.1f} ms", "≤ 10 ms", p50 <= 10),
            Figure(f"line latency max, {backend}", f"{worst:.1f} ms", "≤ 100 ms", worst <= 100)]


def measure_client_start(dep: Deployment, project: Path, key: str,
                         runs: int) -> dict[str, client_start.Timing]:
    """The baseline, `ci --help`, `ci list` and `ci submit test` → first request (medians)."""
    server_url = str(dep.processes[-1].url)
    client_start.compile_sources()
    return {
        "python -c pass (baseline)": client_start.time_baseline(runs),
        "ci --help": client_start.time_help(runs),
        "ci list (live server)": client_start.time_list(server_url, key, runs),
        "ci submit test → upload's 1st byte": client_start.time_to_first_request(project, key,
                                                                                runs),
    }


def env_cache_only(dep: Deployment, workdir: Path, image: str, ca_bundle: str | None,
                   runs: int) -> list[Figure]:
    try:
        dep.start_controller()
        dep.start_server()
        key = dep.create_user("bench@example.com").api_key
        figures = env_cache.measure(dep, key, workdir, runs,
                                    lambda project: timed_docker_run(image, project, ca_bundle))
    finally:
        dep.close()
        shutil.rmtree(workdir, ignore_errors=True)
    env_cache.report(figures, runs)
    return env_cache.targets(figures)


def client_start_only(runs: int, history: int) -> list[Figure]:
    workdir = Path(tempfile.mkdtemp(prefix="ci-bench-"))
    dep = Deployment(workdir=workdir, runner_image="unused", ca_bundle=None)
    try:
        dep.start_server()
        key = dep.create_user("bench@example.com").api_key
        if history:
            repository = dep.open_repository()
            try:
                user = repository.get_user_by_email("bench@example.com")
                client_start.add_history(repository, user.id, history)
            finally:
                repository.close()
        project = workdir / "calculator"
        shutil.copytree(EXAMPLE, project)
        starts = measure_client_start(dep, project, key, runs)
    finally:
        dep.close()
        shutil.rmtree(workdir, ignore_errors=True)
    client_start.report(starts, runs, history)
    return client_start.figures(starts)


def latency_section(args: argparse.Namespace) -> list[Figure]:
    """Section 2 alone: line latency of one watcher (`ci submit test`), on each backend."""
    image = subprocess.run([str(REPO_ROOT / "scripts" / "ensure-docker")], check=True,
                           capture_output=True, text=True).stdout.strip().splitlines()[-1]
    ca_bundle = subprocess.run([str(REPO_ROOT / "scripts" / "host-ca-bundle")], check=True,
                               capture_output=True, text=True).stdout.strip()
    figures = []
    for backend in ("sqlite", "postgres"):
        workdir = Path(tempfile.mkdtemp(prefix="ci-bench-"))
        try:
            with database(backend) as url:
                dep = Deployment(workdir=workdir, runner_image=image, ca_bundle=ca_bundle,
                                 database_url=url)
                try:
                    dep.start_controller()
                    dep.start_server()
                    key = dep.create_user("bench@example.com").api_key
                    ticks = write_project(workdir / "ticks", {
                        "test_ticks.py": TIMESTAMP_TEST.format(count=args.ticks)},
                        capture=False)
                    latencies = line_latencies(dep, ticks, key)
                finally:
                    dep.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        print(f"{backend}: line latency over {len(latencies)} lines: p50 "
              f"{percentile(latencies, 0.5):.1f} ms, p95 {percentile(latencies, 0.95):.1f} ms, "
              f"max {max(latencies):.1f} ms   (targets p50 ≤ 10 ms, max ≤ 100 ms)")
        figures += latency_figures(backend, latencies)
    return figures


def idle_section(args: argparse.Namespace) -> list[Figure]:
    rows = idle.run(20.0, 10_000, ["sqlite", "postgres"])
    idle.report(rows, 20.0)
    return idle.figures(rows)


def watchers_section(args: argparse.Namespace) -> list[Figure]:
    found = []
    for backend in ("sqlite", "postgres"):
        result = watchers.run(1000, 1000, backend)
        for row in result.rows:
            print(row)
        found += watchers.figures(result)
    return found


SECTIONS: dict[str, Callable[[argparse.Namespace], list[Figure]]] = {
    "main": main_section,
    "client-start": lambda args: client_start_only(args.runs, args.history),
    "latency": latency_section,
    "idle": idle_section,
    "watchers": watchers_section,
    "several-hosts": lambda args: [] if several_hosts.run(args.jobs) else sys.exit(1),
    "env-cache": lambda args: main_section(argparse.Namespace(**{**vars(args),
                                                                 "env_cache": True})),
}


if __name__ == "__main__":
    main()
