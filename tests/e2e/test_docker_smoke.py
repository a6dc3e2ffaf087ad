"""The engine and runner image that scripts/ensure-docker provides really run jobs' commands."""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid

import docker
import pytest

from tests.e2e.harness import REPO_ROOT

pytestmark = pytest.mark.docker

CA_PATH_IN_CONTAINER = "/etc/ci/ca-bundle.crt"


def test_ensure_docker_is_idempotent_and_fast_when_warm(runner_image: str) -> None:
    started = time.monotonic()
    result = subprocess.run([str(REPO_ROOT / "scripts" / "ensure-docker")], capture_output=True,
                            text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == runner_image
    # The bound is 2 s warm; a loaded CI machine gets some slack, not an order of magnitude.
    assert elapsed < 4, f"warm ensure-docker took {elapsed:.2f} s"


def test_runner_image_installs_a_package_through_the_ca_bundle(
        runner_image: str, ca_bundle: str | None) -> None:
    """pip inside a job container reaches the index only when it trusts the host's CA bundle."""
    assert ca_bundle, "the host has no CA bundle to hand to containers"
    client = docker.from_env()
    name = f"ci_smoke_{uuid.uuid4().hex[:8]}"
    try:
        output = client.containers.run(
            runner_image,
            ["sh", "-c", "python -m pip install -q iniconfig && python -c "
             "'import iniconfig, sys; print(\"ok\", sys.version_info[:2])'"],
            name=name,
            labels={"ci.test": "smoke"},
            volumes={ca_bundle: {"bind": CA_PATH_IN_CONTAINER, "mode": "ro"}},
            environment={"PIP_CERT": CA_PATH_IN_CONTAINER, "SSL_CERT_FILE": CA_PATH_IN_CONTAINER,
                         "REQUESTS_CA_BUNDLE": CA_PATH_IN_CONTAINER,
                         "PIP_BREAK_SYSTEM_PACKAGES": "1"},
            cap_drop=["ALL"],
            cap_add=["CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID"],
            security_opt=["no-new-privileges"],
            pids_limit=256,
            mem_limit="1g",
            stdout=True, stderr=True,
        )
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            client.containers.get(name).remove(force=True)
        client.close()
    assert b"ok (" in output, output


def test_runner_image_has_python_and_pytest_prerequisites(runner_image: str) -> None:
    client = docker.from_env()
    try:
        output = client.containers.run(
            runner_image, ["sh", "-c", "python --version && python -m pip --version && "
                           "python -m venv --help >/dev/null && echo venv-ok"],
            remove=True, labels={"ci.test": "smoke"})
    finally:
        client.close()
    assert b"Python 3." in output and b"venv-ok" in output, output
