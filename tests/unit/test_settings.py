"""Settings come from CI_* variables once, with sizes in friendly units."""

from __future__ import annotations

import pytest

from ci_common.dburl import check_postgres_url, redact_url, scrub
from ci_common.errors import InvalidInput
from ci_common.settings import Settings, format_size, parse_size


def test_defaults_match_the_documented_ones() -> None:
    settings = Settings.from_env({})
    assert settings.db_path == "ci_jobs.db"
    assert settings.runner_image == "python:3.12-slim"
    assert settings.reconcile_interval_s == 2.0
    assert settings.max_upload_bytes == 50 * 1024 * 1024
    assert settings.max_job_timeout_s == 86400.0
    assert Settings.from_env({"CI_MAX_JOB_TIMEOUT": "600"}).max_job_timeout_s == 600.0


def test_environment_and_overrides() -> None:
    settings = Settings.from_env(
        {"CI_DB_PATH": "/tmp/a.db", "CI_MAX_UPLOAD": "10MB", "CI_JOB_CPUS": "0.5",
         "CI_MAX_CONCURRENT_JOBS": "3", "CI_CA_BUNDLE": "/etc/ca.pem"},
        db_path="/tmp/b.db", reconcile_interval_s=None)
    assert settings.db_path == "/tmp/b.db"  # an explicit option beats the variable
    assert settings.max_upload_bytes == 10 * 1024 * 1024
    assert settings.job_cpus == 0.5 and settings.max_concurrent_jobs == 3
    assert settings.ca_bundle == "/etc/ca.pem"
    assert settings.reconcile_interval_s == 2.0  # None overrides are ignored


def test_bad_values_name_the_variable() -> None:
    with pytest.raises(InvalidInput, match="CI_MAX_CONCURRENT_JOBS"):
        Settings.from_env({"CI_MAX_CONCURRENT_JOBS": "many"})
    with pytest.raises(InvalidInput, match="CI_LOG_LIMIT"):
        Settings.from_env({"CI_LOG_LIMIT": "lots"})


def test_every_setting_has_a_ci_variable() -> None:
    names = Settings.env_names()
    assert all(env.startswith("CI_") for env in names.values())
    assert len(set(names.values())) == len(names)


@pytest.mark.parametrize(("text", "value"), [("512", 512), ("1k", 1024), ("50MB", 50 * 1024**2),
                                             ("1.5g", int(1.5 * 1024**3))])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_format_size() -> None:
    assert format_size(812) == "812 B"
    assert format_size(50 * 1024**2) == "50.0 MB"


def test_database_url_is_read_and_never_shown_with_its_password() -> None:
    url = "postgresql://ci:s3cret-pw@db.example:5432/ci"
    settings = Settings.from_env({"CI_DATABASE_URL": url, "CI_DB_PATH": "/tmp/a.db"})
    assert settings.database_url == url
    assert settings.database_shown() == "postgresql://ci@db.example:5432/ci"
    assert "s3cret-pw" not in repr(settings)
    assert Settings.from_env({"CI_DB_PATH": "/tmp/a.db"}).database_shown() == "/tmp/a.db"


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://ci:pw@h:5432/db", "postgresql://ci@h:5432/db"),
    ("postgresql://ci:p%40ss@h/db?sslmode=require&password=pw2",
     "postgresql://ci@h/db?sslmode=require"),
    ("postgres://h/db", "postgres://h/db"),
    ("postgresql://u:pw@[::1]:5432/d", "postgresql://u@[::1]:5432/d"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_scrub_masks_every_form_of_the_password() -> None:
    url = "postgresql://ci:p%40ss-word@h/db?password=other-secret"
    text = scrub("failed for p%40ss-word / p@ss-word / other-secret", url)
    assert "ss-word" not in text and "other-secret" not in text


def test_only_postgresql_urls_are_accepted() -> None:
    assert check_postgres_url("postgresql://h/db") == "postgresql://h/db"
    with pytest.raises(InvalidInput, match="postgresql://") as refused:
        check_postgres_url("mysql://root:hunter2@h/db")
    assert "hunter2" not in refused.value.message
