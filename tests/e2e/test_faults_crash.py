"""Crash safety for real: controller and server processes killed with SIGKILL mid-job.

Every test runs real processes (see harness.py) against the real Docker engine, kills one with
`kill -9` at a point where it holds state in flight, restarts it, and checks that each job ran
exactly once and that every output line reached the user exactly once, in order.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.crash_helpers import (
    GatedProxy,
    StartWatch,
    assert_no_traceback,
    container_states,
    get_job,
    read_line,
    wait_for_job,
    wait_until,
)
from tests.e2e.harness import (
    PASSING_TEST,
    Deployment,
    LineReader,
    Process,
    free_port,
    numbered_lines_in,
    numbered_lines_test,
    on_both_backends,
    submit_async,
    write_project,
    zip_project,
)

pytestmark = pytest.mark.docker

LINES = 400  # printed 10 ms apart: a kill lands among frames read but not yet stored
ADOPTED = re.compile(r"INFO .*job (\S+): adopted container \w+, resuming after output frame (\d+)")


@pytest.fixture
def watch(deployment: Deployment) -> Iterator[StartWatch]:
    """Container starts of this deployment, as the engine reports them."""
    starts = StartWatch(deployment)
    try:
        yield starts
    finally:
        starts.close()


def adoptions(controller: Process) -> dict[str, int]:
    """job id → the output frame its adoption resumed after, from the controller's log."""
    return {m.group(1): int(m.group(2)) for m in ADOPTED.finditer(controller.log())}


def test_controller_killed_twice_mid_output_resumes_exactly(
    deployment: Deployment, tmp_path: Path, watch: StartWatch
) -> None:
    """kill -9 at two different log cursors, then once more and let the job end while down."""
    dep = deployment
    server = dep.start_server()
    first = dep.start_controller()
    user = dep.create_user()
    project = write_project(tmp_path / "p", {"test_lines.py": numbered_lines_test(LINES, 0.01)},
                            capture=False)
    job_id = submit_async(dep, server, project, user.api_key)
    live = LineReader(dep.ci_popen("wait", job_id, "--all", server=server, api_key=user.api_key))

    live.wait_for("line 50")
    first.kill9()
    second = dep.start_controller()
    live.wait_for("line 150")  # only the second controller can have stored these
    second.kill9()
    third = dep.start_controller()
    live.wait_for("line 250")
    third.kill9()
    # The job ends while no controller runs: the last one adopts an exited container.
    wait_until(lambda: container_states(dep) == ["exited"], 30,
               "the job's container to exit")
    fourth = dep.start_controller()

    out, err, code = live.finish()
    assert code == 0, err
    assert numbered_lines_in(out) == list(range(1, LINES + 1))
    assert out.count("test session starts") == 1
    assert "Traceback" not in err
    job = wait_for_job(server, user.api_key, job_id)
    assert (job["status"], job["exit_code"], job["success"]) == ("completed", 0, True)

    replay = dep.ci("wait", job_id, "--all", server=server, api_key=user.api_key)
    assert replay.returncode == 0, replay.stderr
    assert numbered_lines_in(replay.stdout) == list(range(1, LINES + 1))
    assert replay.stdout.count("test session starts") == 1
    assert "1 passed" in replay.stdout

    # Each restart adopted the container and resumed after a later frame than the one before.
    cursors = [adoptions(c).get(job_id) for c in (second, third, fourth)]
    assert None not in cursors, [c.log() for c in (second, third, fourth)]
    assert 0 < cursors[0] < cursors[1] < cursors[2], cursors  # type: ignore[operator]
    for controller in (first, second, third, fourth):
        assert_no_traceback(controller)
    assert watch.starts(job_id) == 1
    wait_until(lambda: not container_states(dep), 30, "the finished job's container to be removed")


@on_both_backends
def test_queued_and_starting_jobs_run_exactly_once_after_a_controller_kill(
    deployment: Deployment, tmp_path: Path, watch: StartWatch
) -> None:
    """Jobs running, just claimed, and submitted while no controller runs: each runs once."""
    dep = deployment
    server = dep.start_server()
    first = dep.start_controller()
    user = dep.create_user()
    slow = write_project(tmp_path / "slow", {"test_lines.py": numbered_lines_test(20, 0.1)},
                         capture=False)
    quick = write_project(tmp_path / "quick", {"test_ok.py": PASSING_TEST})
    running = submit_async(dep, server, slow, user.api_key)
    wait_for_job(server, user.api_key, running, status="running", timeout=60)
    # Straight over HTTP, and killed as soon as it is claimed: the kill lands within the
    # claim → create → start window (~0.3 s).
    response = httpx.post(f"{server.url}/jobs", files={"archive": ("p.zip", zip_project(quick))},
                          headers={"Authorization": f"Bearer {user.api_key}"}, timeout=30)
    assert response.status_code == 201, response.text
    starting = response.json()["id"]
    wait_until(lambda: f"job {starting}: claimed" in first.log(), 30, "the claim", 0.005)
    first.kill9()
    queued = [submit_async(dep, server, quick, user.api_key) for _ in range(2)]
    assert get_job(server, user.api_key, queued[0])["status"] == "queued"
    second = dep.start_controller()

    job_ids = [running, starting, *queued]
    for job_id in job_ids:
        job = wait_for_job(server, user.api_key, job_id, timeout=120)
        assert (job["status"], job["exit_code"]) == ("completed", 0), job
        replay = dep.ci("wait", job_id, "--all", server=server, api_key=user.api_key)
        assert replay.returncode == 0, replay.stderr
        assert replay.stdout.count("test session starts") == 1, replay.stdout
    assert numbered_lines_in(
        dep.ci("wait", running, "--all", server=server, api_key=user.api_key).stdout
    ) == list(range(1, 21))
    starts = {job_id: watch.starts(job_id, settle_s=0) for job_id in job_ids}
    assert starts == {job_id: 1 for job_id in job_ids}

    assert running in adoptions(second)
    log = assert_no_traceback(second)
    assert_no_traceback(first)
    # The job caught mid-start was recovered one way or another, and said so.
    assert re.search(rf"INFO .*job {starting}: (adopted container|claimed but never started)",
                     log), log
    wait_until(lambda: not container_states(dep), 30, "finished jobs' containers to be removed")


@pytest.mark.parametrize(
    ("pattern", "case", "recovered"),
    [
        (b"/start", "start lands after the restart", "claimed but never started; starting it now"),
        (b"/start", "start lands before the restart", "adopted container"),
        (b"/containers/create", "create lands after the job",
         "removing container \\w+ of finished job"),
        (b"/containers/create", "create lands mid-start",
         "removing container \\w+, created by an earlier attempt and never started"),
    ],
    ids=["start-lands-after-restart", "start-lands-before-restart", "create-lands-after-job",
         "create-lands-mid-start"],
)
def test_controller_killed_while_its_container_starts(
    deployment: Deployment, tmp_path: Path, watch: StartWatch, pattern: bytes, case: str,
    recovered: str,
) -> None:
    """kill -9 while the engine has not yet received the create/start request; the request
    arrives later, at a moment the test picks: the job runs once and nothing is left behind.

    "create lands mid-start": the dead controller's create reaches the engine after the new
    controller looked for leftovers and before its own create, whose name is then taken.
    """
    dep = deployment
    proxy = GatedProxy()
    proxy.start()
    try:
        controller_tmp = tmp_path / "controller-tmp"
        controller_tmp.mkdir()
        env = {"DOCKER_HOST": proxy.url, "TMPDIR": str(controller_tmp)}
        server = dep.start_server()
        first = dep.start_controller(**env)
        user = dep.create_user()
        project = write_project(tmp_path / "p", {"test_lines.py": numbered_lines_test(5, 0.05)},
                                capture=False)
        proxy.hold(pattern)
        job_id = submit_async(dep, server, project, user.api_key)
        proxy.wait_held(1)
        first.kill9()
        if case != "create lands mid-start":
            proxy.stop_holding()
        if case == "start lands before the restart":
            proxy.release_next()
            wait_until(lambda: container_states(dep) in (["running"], ["exited"]),
                       30, "the late start to run the container with no controller")
        second = dep.start_controller(**env)
        if case == "create lands mid-start":
            proxy.wait_held(2)  # the new controller's create, after its leftover check
            proxy.stop_holding()
            proxy.release_next()
            wait_until(lambda: len(container_states(dep)) == 1, 30, "the late create to land")
            proxy.release_next()

        job = wait_for_job(server, user.api_key, job_id)
        assert (job["status"], job["exit_code"], job["success"]) == ("completed", 0, True), job
        if case in ("start lands after the restart", "create lands after the job"):
            wait_until(lambda: not container_states(dep), 30, "the job's container to be removed")
            proxy.release_next()  # the dead controller's request reaches the engine only now
            if pattern == b"/containers/create":  # a container for a finished job: swept
                wait_until(lambda: re.search(recovered, second.log()), 30,
                           "the late-created container to be swept")
            time.sleep(0.5)
        wait_until(lambda: not container_states(dep), 30, "no container of ours left")
        assert watch.starts(job_id) == 1
        replay = dep.ci("wait", job_id, "--all", server=server, api_key=user.api_key)
        assert replay.returncode == 0, replay.stderr
        assert numbered_lines_in(replay.stdout) == [1, 2, 3, 4, 5]
        assert replay.stdout.count("test session starts") == 1
        assert sorted(p.name for p in controller_tmp.iterdir()) == []
        log = assert_no_traceback(second)
        assert_no_traceback(first)
        assert re.search(rf"INFO .*(job {job_id}: )?{recovered}", log), log
    finally:
        proxy.close()


def test_server_killed_mid_stream_client_resumes_on_the_restarted_replica(
    deployment: Deployment, tmp_path: Path
) -> None:
    """kill -9 the only replica twice while `ci wait` streams; it comes back on its port."""
    dep = deployment
    dep.start_controller()
    server = dep.start_server()
    port = int(str(server.url).rsplit(":", 1)[1])
    user = dep.create_user()
    project = write_project(tmp_path / "p", {"test_lines.py": numbered_lines_test(60, 0.05)},
                            capture=False)
    job_id = submit_async(dep, server, project, user.api_key)
    live = LineReader(dep.ci_popen("wait", job_id, "--all", server=server, api_key=user.api_key))
    for needle in ("line 5", "line 30"):
        live.wait_for(needle)
        dep.processes[-1].kill9()
        time.sleep(1.0)  # down long enough for the client to fail a reconnect or two
        dep.start_server(port=port)
    out, err, code = live.finish()
    assert code == 0, err
    assert numbered_lines_in(out) == list(range(1, 61))
    assert out.count("test session starts") == 1
    assert "Traceback" not in err and "Error" not in err


def test_server_killed_mid_stream_client_fails_over_to_another_replica(
    deployment: Deployment, tmp_path: Path
) -> None:
    """`--server a,b`: a is killed with -9 and stays dead; the stream resumes on b."""
    dep = deployment
    dep.start_controller()
    first = dep.start_server()
    other_port = free_port()
    user = dep.create_user()
    project = write_project(tmp_path / "p", {"test_lines.py": numbered_lines_test(60, 0.05)},
                            capture=False)
    job_id = submit_async(dep, first, project, user.api_key)
    # b is not up yet, so the client's stream is surely on a.
    urls = f"{first.url},http://127.0.0.1:{other_port}"
    live = LineReader(dep.ci_popen("wait", job_id, "--all", server=urls, api_key=user.api_key))
    live.wait_for("line 5")
    dep.start_server(port=other_port)
    first.kill9()
    live.wait_for("line 10")
    assert first.popen.poll() is not None  # still dead: these lines came through b
    out, err, code = live.finish()
    assert code == 0, err
    assert numbered_lines_in(out) == list(range(1, 61))
    assert out.count("test session starts") == 1
    assert "Traceback" not in err and "Error" not in err


QUIET_THEN_LINES = (
    "import time\n"
    "def test_quiet_then_lines():\n"
    "    print()\n"
    "    print('line 1', flush=True)\n"
    "    time.sleep(10)  # quiet: `ci wait` attaches, then its replica dies\n"
    "    for i in range(2, 21):\n"
    "        print(f'line {i}', flush=True)\n"
    "        time.sleep(0.05)\n"
)


def test_wait_from_now_loses_nothing_when_its_replica_dies_before_the_first_event(
    deployment: Deployment, tmp_path: Path
) -> None:
    """`ci wait <id>` (from now) attached to a quiet job; its replica is killed before any event
    and stays down while the job prints: after the reconnect every line printed since the
    client attached is shown, exactly once."""
    dep = deployment
    dep.start_controller()
    victim_server = dep.start_server()
    port = int(str(victim_server.url).rsplit(":", 1)[1])
    observer_server = dep.start_server()
    user = dep.create_user()
    project = write_project(tmp_path / "p", {"test_quiet.py": QUIET_THEN_LINES}, capture=False)
    job_id = submit_async(dep, observer_server, project, user.api_key)
    observer = LineReader(dep.ci_popen("wait", job_id, "--all", server=observer_server,
                                       api_key=user.api_key))
    observer.wait_for("line 1")
    line_1_seen = time.monotonic()
    victim = dep.ci_popen("wait", job_id, server=victim_server, api_key=user.api_key)
    assert victim.stderr is not None
    assert read_line(victim.stderr).startswith("Status: running")
    time.sleep(1.5)  # the client has opened its stream by now
    victim_server.kill9()
    # Killed well before line 2 (printed 10 s after line 1): the client has seen no event yet.
    assert time.monotonic() - line_1_seen < 8, "too slow to test the quiet window"
    observer.wait_for("line 5")  # printed while the victim's replica is down
    dep.start_server(port=port)
    out, err = victim.communicate(timeout=120)
    assert victim.returncode == 0, err
    assert numbered_lines_in(out) == list(range(2, 21)), out
    observer.finish()
