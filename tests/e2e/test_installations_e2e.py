"""Two installations on one Docker engine, with the same (default) controller id.

Each has its own database, so its own installation id, and its own container prefix. Before
installation labels, the second controller's reconcile removed the first one's running container
as "of a finished job" within one reconcile interval.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import (
    PASSING_TEST,
    Deployment,
    LineReader,
    numbered_lines_in,
    numbered_lines_test,
    write_project,
)

pytestmark = pytest.mark.docker

LINES = 24


@pytest.fixture
def pair(tmp_path: Path, runner_image: str, ca_bundle: str | None
         ) -> Iterator[tuple[Deployment, Deployment]]:
    # The controller id both would get by default: the host name.
    shared = {"CI_CONTROLLER_ID": socket.gethostname()}
    made = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            dep = Deployment(workdir=tmp_path / name, runner_image=runner_image,
                             ca_bundle=ca_bundle, extra_env=dict(shared))
            made.append(dep)
            dep.start_controller()
            dep.start_server()
        yield made[0], made[1]
    finally:
        for dep in made:
            dep.close()


def test_two_installations_share_an_engine_and_spare_each_others_jobs(
        pair: tuple[Deployment, Deployment], tmp_path: Path) -> None:
    first, second = pair
    assert first.controller_id == second.controller_id
    assert first.installation_id() != second.installation_id()
    user_a, user_b = first.create_user(), second.create_user()
    slow = write_project(tmp_path / "slow", {"test_lines.py": numbered_lines_test(LINES, 0.4)},
                         capture=False)
    quick = write_project(tmp_path / "quick", {"test_ok.py": PASSING_TEST})

    watch = LineReader(first.ci_popen("submit", "test", cwd=slow, server=first.processes[1],
                                      api_key=user_a.api_key))
    watch.wait_for("line 2")
    # The other installation runs a job of its own meanwhile, both controllers reconciling...
    result = second.ci("submit", "test", cwd=quick, server=second.processes[1],
                       api_key=user_b.api_key)
    assert result.returncode == 0, result.stderr
    # ...and its controller restarts (a full reconcile at start) while the first job runs.
    second.processes[0].terminate()
    second.start_controller()
    watch.wait_for("line 12")
    assert [c.state for c in first.containers()] == ["running"]

    out, err, code = watch.finish()
    assert code == 0, err
    assert numbered_lines_in(out) == list(range(1, LINES + 1))
