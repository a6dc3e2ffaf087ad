"""The job container spec: hardening, limits, labels, and the CA bundle wiring."""

from __future__ import annotations

from ci_common.settings import Settings
from ci_controller.spec import (
    ARCHIVE_PATH,
    CA_BUNDLE_PATH,
    LABEL_CONTROLLER_ID,
    LABEL_INSTALLATION_ID,
    LABEL_JOB_ID,
    MIN_LOG_FILE_BYTES,
    RUNNER_PATH,
    job_container_spec,
)

JOB_ID = "0b7c2f0e-1111-4222-8333-444455556666"
INSTALLATION = "5f0e2a9c4b1d4e6f8a7b9c0d1e2f3a4b"


def settings(**overrides: object) -> Settings:
    return Settings.from_env({}, runner_image="runner:test", container_prefix="pfx_",
                             controller_id="ctl-a", **overrides)


def test_name_image_labels_and_command() -> None:
    spec = job_container_spec(settings(max_unpacked_bytes=1234, max_archive_entries=56,
                                       log_limit_bytes=789), JOB_ID, INSTALLATION)
    assert spec.image == "runner:test"
    assert spec.name == f"pfx_{JOB_ID}"
    assert spec.labels == {LABEL_JOB_ID: JOB_ID, LABEL_CONTROLLER_ID: "ctl-a",
                           LABEL_INSTALLATION_ID: INSTALLATION}
    assert spec.command[:2] == ("python3", RUNNER_PATH)
    args = dict(zip(spec.command[2::2], spec.command[3::2], strict=True))
    assert args == {"--archive": ARCHIVE_PATH, "--workdir": "/ci/work", "--max-bytes": "1234",
                    "--max-entries": "56", "--log-limit": "789"}


def test_hardening_options() -> None:
    spec = job_container_spec(settings(), JOB_ID, INSTALLATION)
    assert spec.privileged is False
    assert spec.cap_drop == ("ALL",)
    assert spec.cap_add == ()  # pip and pytest run as root with no capability (see e2e tier)
    assert spec.security_opt == ("no-new-privileges",)
    assert spec.init is True


def test_limits_come_from_settings_and_swap_is_off() -> None:
    spec = job_container_spec(settings(job_pids_limit=77, job_memory_bytes=300 * 1024**2,
                                       job_cpus=1.5), JOB_ID, INSTALLATION)
    assert spec.pids_limit == 77
    assert spec.mem_limit_bytes == 300 * 1024**2
    assert spec.memswap_limit_bytes == spec.mem_limit_bytes
    assert spec.nano_cpus == 1_500_000_000


def test_log_file_is_capped() -> None:
    small = job_container_spec(settings(log_limit_bytes=1024), JOB_ID, INSTALLATION)
    assert small.log_config["type"] == "json-file"
    config = small.log_config["config"]
    assert isinstance(config, dict)
    assert int(config["max-size"]) == MIN_LOG_FILE_BYTES
    big = job_container_spec(settings(log_limit_bytes=100 * 1024**2), JOB_ID,
                             INSTALLATION).log_config["config"]
    assert isinstance(big, dict)
    assert int(big["max-size"]) == 200 * 1024**2


def test_environment_without_ca_bundle_mounts_nothing() -> None:
    spec = job_container_spec(settings(), JOB_ID, INSTALLATION)
    assert spec.environment == {
        "PYTHONUNBUFFERED": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_BREAK_SYSTEM_PACKAGES": "1",
        "PIP_ROOT_USER_ACTION": "ignore",
    }
    assert spec.mounts == ()


def test_ca_bundle_is_mounted_read_only_and_named_in_the_environment() -> None:
    spec = job_container_spec(settings(ca_bundle="/etc/ssl/certs/ca-certificates.crt"), JOB_ID,
                              INSTALLATION)
    assert len(spec.mounts) == 1
    mount = spec.mounts[0]
    assert (mount.source, mount.target, mount.read_only) == (
        "/etc/ssl/certs/ca-certificates.crt", CA_BUNDLE_PATH, True)
    for name in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        assert spec.environment[name] == CA_BUNDLE_PATH
    assert spec.environment["PYTHONUNBUFFERED"] == "1"


def test_no_engine_socket_or_other_host_path() -> None:
    spec = job_container_spec(settings(ca_bundle="/etc/ssl/certs/ca-certificates.crt"), JOB_ID,
                              INSTALLATION)
    assert all("docker.sock" not in m.source for m in spec.mounts)
    assert [m.source for m in spec.mounts] == ["/etc/ssl/certs/ca-certificates.crt"]
