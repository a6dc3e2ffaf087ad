"""One live controller per controller id, with real processes on one database."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.e2e.harness import Deployment

pytestmark = pytest.mark.docker


def controllers(dep: Deployment) -> dict[str, dict[str, object]]:
    rows = json.loads(dep.admin("controller", "list", "--json").stdout)
    return {str(row["id"]): row for row in rows}


def test_a_second_controller_with_a_live_id_is_refused(deployment: Deployment) -> None:
    first = deployment.start_controller()
    second = subprocess.run([sys.executable, "-m", "ci_controller"], env=deployment.env(),
                            cwd=deployment.workdir, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), second.stderr
    assert repr(deployment.controller_id) in lines[0] and "CI_CONTROLLER_ID" in lines[0]
    row = controllers(deployment)[deployment.controller_id]
    assert (row["pid"], row["alive"], row["stopped"]) == (first.popen.pid, True, False)

    # A crashed holder is known dead on its own host: the restart takes the id at once.
    first.kill9()
    restarted = deployment.start_controller()
    assert controllers(deployment)[deployment.controller_id]["pid"] == restarted.popen.pid

    # A graceful stop releases the lease.
    restarted.terminate()
    row = controllers(deployment)[deployment.controller_id]
    assert (row["alive"], row["stopped"]) == (False, True)
