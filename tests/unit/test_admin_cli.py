"""`ci-admin` in-process: every command through click's CliRunner against an InMemoryRepository."""

from __future__ import annotations

import json
import re
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from ci_admin import actions, render
from ci_admin.cli import cli
from ci_common.errors import AuthenticationError, InvalidInput, NotFound
from ci_common.keys import choose_key, display_prefix, hash_key
from ci_common.models import (
    EnvEntry,
    EnvKey,
    EnvState,
    JobOutcome,
    JobStatus,
    StoredKey,
    User,
    utcnow,
)
from ci_common.retention import parse_age
from ci_persistence.memory import InMemoryRepository
from tests.leases import hold_lease
from tests.postgres import free_port

USER_FIELDS = {"id", "name", "email", "is_active", "created_at"}
KEY_FIELDS = {"id", "name", "prefix", "user_id", "user_email", "is_active", "created_at",
              "last_used_at"}
KEY_IN_OUTPUT = re.compile(r"API Key: (ci_\S+)")
KEY_ID_IN_OUTPUT = re.compile(r"Key ID:  (\S+)")


@pytest.fixture
def repo() -> InMemoryRepository:
    return InMemoryRepository()


def invoke(repo: InMemoryRepository, *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), obj=repo)


def ok(repo: InMemoryRepository, *args: str) -> Result:
    result = invoke(repo, *args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def fails(repo: InMemoryRepository, exit_code: int, *args: str) -> str:
    """Run a command that must fail cleanly; return its stderr."""
    result = invoke(repo, *args)
    assert result.exit_code == exit_code, (result.stdout, result.stderr, result.exception)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert isinstance(result.exception, SystemExit)  # click's exit, not a crash
    assert result.stderr.rstrip().splitlines()[-1].startswith("Error: ")
    return result.stderr


def add_user(repo: InMemoryRepository, email: str = "ann@example.com", name: str = "Ann") -> User:
    return repo.create_user(name, email)


def add_key(repo: InMemoryRepository, email: str, name: str = "laptop") -> tuple[str, str]:
    """Create a key through the CLI; return (plaintext, key id) as printed."""
    out = ok(repo, "key", "create", "--email", email, "--name", name).stdout
    key_match, id_match = KEY_IN_OUTPUT.search(out), KEY_ID_IN_OUTPUT.search(out)
    assert key_match and id_match, out
    return key_match.group(1), id_match.group(1)


def authenticate(repo: InMemoryRepository, plaintext: str) -> StoredKey:
    return choose_key(plaintext, repo.find_keys_by_prefix(display_prefix(plaintext)))


# ---------------------------------------------------------------------------- user create


def test_user_create_prints_the_seed_shape_and_stores_the_user(repo: InMemoryRepository) -> None:
    out = ok(repo, "user", "create", "--name", "Your Name", "--email", "you@example.com").stdout
    lines = out.splitlines()
    assert lines[0] == "✓ User created successfully"
    match = re.fullmatch(r"  ID:    (\S+)", lines[1])
    assert match
    assert lines[2:] == ["  Name:  Your Name", "  Email: you@example.com"]
    user_id = str(uuid.UUID(match.group(1)))
    stored = repo.get_user(user_id)
    assert (stored.name, stored.email, stored.is_active) == ("Your Name", "you@example.com", True)


def test_duplicate_email_in_any_case_exits_1(repo: InMemoryRepository) -> None:
    add_user(repo, "ann@example.com")
    err = fails(repo, 1, "user", "create", "--name", "B", "--email", "ANN@example.com")
    assert err == "Error: a user with email ANN@example.com already exists\n"
    assert len(repo.list_users()) == 1


@pytest.mark.parametrize("email", ["nope", "a b@example.com", "@example.com", "ann@", "a@b@c", ""])
def test_bad_email_is_a_usage_error(repo: InMemoryRepository, email: str) -> None:
    err = fails(repo, 2, "user", "create", "--name", "Ann", "--email", email)
    assert "not an email address" in err
    assert repo.list_users() == []


@pytest.mark.parametrize("name", ["", "   ", "evil\nrow"])
def test_bad_name_is_a_usage_error(repo: InMemoryRepository, name: str) -> None:
    err = fails(repo, 2, "user", "create", "--name", name, "--email", "a@example.com")
    assert "name must not" in err
    assert repo.list_users() == []


def test_user_create_needs_both_options(repo: InMemoryRepository) -> None:
    assert "--email" in fails(repo, 2, "user", "create", "--name", "Ann")
    assert "--name" in fails(repo, 2, "user", "create", "--email", "a@example.com")


# ---------------------------------------------------------------------------- user list / get


def test_user_list_table_and_json(repo: InMemoryRepository) -> None:
    assert ok(repo, "user", "list").stdout == "No users.\n"
    assert json.loads(ok(repo, "user", "list", "--json").stdout) == []
    ann, bob = add_user(repo, "ann@example.com", "Ann"), add_user(repo, "bob@example.com", "Bob")
    repo.set_user_active(bob.id, False)

    lines = ok(repo, "user", "list").stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "EMAIL", "ACTIVE", "CREATED"]
    assert set(lines[1]) == {"-"}
    assert lines[2].split() == [ann.id, "Ann", "ann@example.com", "yes",
                                *render.format_time(ann.created_at).split()]
    assert lines[3].split()[:4] == [bob.id, "Bob", "bob@example.com", "no"]

    rows = json.loads(ok(repo, "user", "list", "--json").stdout)
    assert [set(row) for row in rows] == [USER_FIELDS, USER_FIELDS]
    assert [(r["id"], r["name"], r["email"], r["is_active"]) for r in rows] == [
        (ann.id, "Ann", "ann@example.com", True), (bob.id, "Bob", "bob@example.com", False)]
    assert datetime.fromisoformat(rows[0]["created_at"]) == ann.created_at


def test_user_get_by_id_and_by_email(repo: InMemoryRepository) -> None:
    ann = add_user(repo)
    repo.create_api_key(ann.id, "k1", hash_key("ci_" + "a" * 43), "ci_aaaaaaaa")
    by_email = ok(repo, "user", "get", "--email", "ANN@example.com").stdout
    assert f"ID:       {ann.id}" in by_email
    assert "Email:    ann@example.com" in by_email
    assert "Active:   yes" in by_email
    assert "API keys: 1 (1 active)" in by_email
    assert ok(repo, "user", "get", ann.id).stdout == by_email

    as_json = json.loads(ok(repo, "user", "get", ann.id, "--json").stdout)
    assert as_json == [render.user_json(ann)]
    assert json.loads(ok(repo, "user", "get", "--email", ann.email, "--json").stdout) == as_json


def test_user_get_errors(repo: InMemoryRepository) -> None:
    ann = add_user(repo)
    missing = str(uuid.uuid4())
    assert fails(repo, 1, "user", "get", missing) == f"Error: user not found: {missing}\n"
    assert fails(repo, 1, "user", "get", "--email", "x@y.z") == "Error: user not found: x@y.z\n"
    assert "not both" in fails(repo, 2, "user", "get", ann.id, "--email", ann.email)
    assert "give a user ID or --email" in fails(repo, 2, "user", "get")


# ---------------------------------------------------------------------------- activate


def test_deactivate_and_activate(repo: InMemoryRepository) -> None:
    ann = add_user(repo)
    out = ok(repo, "user", "deactivate", ann.id).stdout
    assert out.startswith(f"✓ User deactivated: ann@example.com ({ann.id})")
    assert repo.get_user(ann.id).is_active is False
    again = ok(repo, "user", "deactivate", ann.id).stdout
    assert again == f"✓ User ann@example.com ({ann.id}) was already deactivated\n"

    assert ok(repo, "user", "activate", ann.id).stdout == (
        f"✓ User activated: ann@example.com ({ann.id})\n")
    assert repo.get_user(ann.id).is_active is True
    assert "already activated" in ok(repo, "user", "activate", ann.id).stdout


@pytest.mark.parametrize("command", ["activate", "deactivate"])
def test_activate_unknown_user(repo: InMemoryRepository, command: str) -> None:
    assert fails(repo, 1, "user", command, "nobody") == "Error: user not found: nobody\n"
    assert "USER_ID" in fails(repo, 2, "user", command)


# ---------------------------------------------------------------------------- key create


def test_key_create_shows_the_key_once_and_it_authenticates(repo: InMemoryRepository) -> None:
    ann = add_user(repo)
    result = ok(repo, "key", "create", "--email", "ann@example.com", "--name", "My Dev Key")
    lines = result.stdout.splitlines()
    plaintext = lines[2].removeprefix("  API Key: ")
    assert lines[0] == "✓ API key created successfully"
    assert lines[1] == ""
    assert lines[4:] == ["  Name:    My Dev Key", "  User:    ann@example.com", "",
                         "⚠️  IMPORTANT: This is the only time you'll see this key!",
                         "   Save it securely now."]
    assert result.stderr == ""

    stored = authenticate(repo, plaintext)
    assert lines[3] == f"  Key ID:  {stored.key.id}"
    assert (stored.user.id, stored.key.name) == (ann.id, "My Dev Key")
    assert stored.key_hash == hash_key(plaintext)
    assert stored.key_hash not in result.stdout + result.stderr
    assert stored.key.prefix == display_prefix(plaintext)


def test_key_create_by_user_id(repo: InMemoryRepository) -> None:
    ann = add_user(repo)
    out = ok(repo, "key", "create", "--user-id", ann.id, "--name", "ci").stdout
    match = KEY_IN_OUTPUT.search(out)
    assert match
    assert authenticate(repo, match.group(1)).user.id == ann.id
    assert "  User:    ann@example.com" in out.splitlines()


def test_each_key_is_new(repo: InMemoryRepository) -> None:
    add_user(repo)
    first, second = add_key(repo, "ann@example.com"), add_key(repo, "ann@example.com")
    assert first[0] != second[0] and first[1] != second[1]
    assert authenticate(repo, first[0]).key.id == first[1]
    assert authenticate(repo, second[0]).key.id == second[1]


def test_key_for_a_deactivated_user_is_made_with_a_warning(repo: InMemoryRepository) -> None:
    ann = add_user(repo)
    repo.set_user_active(ann.id, False)
    result = ok(repo, "key", "create", "--email", ann.email, "--name", "later")
    assert result.stderr.startswith("Warning: user ann@example.com is deactivated")
    assert f"ci-admin user activate {ann.id}" in result.stderr
    match = KEY_IN_OUTPUT.search(result.stdout)
    assert match
    with pytest.raises(AuthenticationError, match="deactivated"):
        authenticate(repo, match.group(1))
    repo.set_user_active(ann.id, True)
    assert authenticate(repo, match.group(1)).user.id == ann.id


def test_key_create_errors(repo: InMemoryRepository) -> None:
    ann = add_user(repo)
    assert fails(repo, 1, "key", "create", "--email", "x@y.z", "--name", "k") == (
        "Error: user not found: x@y.z\n")
    assert fails(repo, 1, "key", "create", "--user-id", "nope", "--name", "k") == (
        "Error: user not found: nope\n")
    both = fails(repo, 2, "key", "create", "--email", ann.email, "--user-id", ann.id, "--name", "k")
    assert "not both" in both
    assert "give --email or --user-id" in fails(repo, 2, "key", "create", "--name", "k")
    assert "--name" in fails(repo, 2, "key", "create", "--email", ann.email)
    assert "name must not be blank" in fails(repo, 2, "key", "create", "--email", ann.email,
                                             "--name", " ")
    assert repo.list_api_keys() == []


# ---------------------------------------------------------------------------- key list / revoke


def test_key_list_all_and_per_user_never_shows_secrets(repo: InMemoryRepository) -> None:
    assert ok(repo, "key", "list").stdout == "No API keys.\n"
    add_user(repo, "ann@example.com")
    bob = add_user(repo, "bob@example.com", "Bob")
    ann_key, ann_key_id = add_key(repo, "ann@example.com", "ann-laptop")
    bob_key, bob_key_id = add_key(repo, "bob@example.com", "bob-ci")
    used_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    repo.touch_api_key(bob_key_id, used_at)

    table = ok(repo, "key", "list").stdout
    lines = table.splitlines()
    assert lines[0].split() == ["KEY", "ID", "NAME", "PREFIX", "USER", "ACTIVE", "CREATED",
                                "LAST", "USED"]
    assert lines[2].split()[:5] == [ann_key_id, "ann-laptop", display_prefix(ann_key),
                                    "ann@example.com", "yes"]
    assert lines[2].split()[-1] == "never"
    assert lines[3].split()[:5] == [bob_key_id, "bob-ci", display_prefix(bob_key),
                                    "bob@example.com", "yes"]
    assert lines[3].endswith("2026-01-02 03:04:05")

    rows = json.loads(ok(repo, "key", "list", "--json").stdout)
    assert [set(row) for row in rows] == [KEY_FIELDS, KEY_FIELDS]
    assert rows[1] == {"id": bob_key_id, "name": "bob-ci", "prefix": display_prefix(bob_key),
                       "user_id": bob.id, "user_email": "bob@example.com", "is_active": True,
                       "created_at": rows[1]["created_at"],
                       "last_used_at": "2026-01-02T03:04:05+00:00"}
    assert datetime.fromisoformat(rows[0]["created_at"]).tzinfo is not None
    assert rows[0]["last_used_at"] is None

    only_bob = json.loads(ok(repo, "key", "list", "--email", "BOB@example.com", "--json").stdout)
    assert [row["id"] for row in only_bob] == [bob_key_id]
    assert ann_key_id not in ok(repo, "key", "list", "--email", "bob@example.com").stdout

    everything = table + json.dumps(rows)
    for plaintext in (ann_key, bob_key):
        assert plaintext not in everything
        assert hash_key(plaintext) not in everything


def test_key_list_by_user_id(repo: InMemoryRepository) -> None:
    add_user(repo, "ann@example.com")
    bob = add_user(repo, "bob@example.com", "Bob")
    add_key(repo, "ann@example.com", "ann-laptop")
    _, bob_key_id = add_key(repo, "bob@example.com", "bob-ci")
    rows = json.loads(ok(repo, "key", "list", "--user-id", bob.id, "--json").stdout)
    assert [row["id"] for row in rows] == [bob_key_id]
    assert "ann-laptop" not in ok(repo, "key", "list", "--user-id", bob.id).stdout
    assert fails(repo, 1, "key", "list", "--user-id", "nobody").startswith("Error: ")
    both = fails(repo, 2, "key", "list", "--user-id", bob.id, "--email", "bob@example.com")
    assert "not both" in both


def test_key_list_for_unknown_email(repo: InMemoryRepository) -> None:
    assert fails(repo, 1, "key", "list", "--email", "x@y.z") == "Error: user not found: x@y.z\n"


def test_key_revoke(repo: InMemoryRepository) -> None:
    add_user(repo)
    plaintext, key_id = add_key(repo, "ann@example.com", "laptop")
    out = ok(repo, "key", "revoke", key_id).stdout
    assert out == (f"✓ API key revoked: {key_id} ({'laptop'}, {display_prefix(plaintext)}…, "
                   "user ann@example.com)\n")
    with pytest.raises(AuthenticationError, match="revoked"):
        authenticate(repo, plaintext)
    assert "was already revoked" in ok(repo, "key", "revoke", key_id).stdout
    rows = json.loads(ok(repo, "key", "list", "--json").stdout)
    assert [(r["id"], r["is_active"]) for r in rows] == [(key_id, False)]


def test_key_revoke_unknown(repo: InMemoryRepository) -> None:
    missing = str(uuid.uuid4())
    assert fails(repo, 1, "key", "revoke", missing) == f"Error: API key not found: {missing}\n"
    assert "KEY_ID" in fails(repo, 2, "key", "revoke")


# ---------------------------------------------------------------------------- error boundary


class _BrokenRepository(InMemoryRepository):
    """A repository whose reads fail the way a real database can."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self._error = error

    def list_users(self) -> list[User]:
        raise self._error


@pytest.mark.parametrize(("error", "expected"), [
    (sqlite3.OperationalError("unable to open\ndatabase file"),
     "Error: database error: unable to open database file\n"),
    (PermissionError(13, "Permission denied", "/srv/ci.db"),
     "Error: Permission denied: /srv/ci.db\n"),
    (RuntimeError("boom"),
     "Error: unexpected RuntimeError: boom (rerun with --debug for details)\n"),
])
def test_any_failure_is_one_line_and_a_traceback_only_with_debug(
        error: Exception, expected: str) -> None:
    broken = _BrokenRepository(error)
    assert fails(broken, 1, "user", "list") == expected

    debug = invoke(broken, "--debug", "user", "list")
    assert debug.exit_code == 1
    assert debug.stderr.startswith("Traceback (most recent call last):")
    assert debug.stderr.endswith(expected)


def test_debug_keeps_the_exit_code_of_invalid_input(repo: InMemoryRepository) -> None:
    result = invoke(repo, "--debug", "user", "create", "--name", "A", "--email", "bad")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr
    assert result.stderr.endswith("Error: not an email address: 'bad'\n")


def test_help_does_not_open_the_database(tmp_path: Path) -> None:
    db = tmp_path / "never-created.db"
    result = CliRunner().invoke(cli, ["--db-path", str(db), "user", "create", "--help"])
    assert result.exit_code == 0
    assert "--email" in result.stdout
    assert not db.exists()


def test_database_url_selects_postgresql_and_wins_over_the_db_path(postgres_url: str,
                                                                  tmp_path: Path) -> None:
    db = tmp_path / "never-created.db"
    env = {"CI_DATABASE_URL": postgres_url, "CI_DB_PATH": str(db)}
    created = CliRunner().invoke(cli, ["user", "create", "--name", "Ann", "--email",
                                       "ann@example.com"], env=env)
    assert created.exit_code == 0, created.output
    listed = CliRunner().invoke(cli, ["--database-url", postgres_url, "user", "list", "--json"])
    assert [u["email"] for u in json.loads(listed.stdout)] == ["ann@example.com"]
    assert not db.exists()


def test_unreachable_postgresql_is_one_line_without_the_password() -> None:
    port = free_port()
    result = CliRunner().invoke(cli, ["--database-url",
                                      f"postgresql://ci:hunter2-pw@127.0.0.1:{port}/ci",
                                      "user", "list"])
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"Error: cannot reach PostgreSQL at postgresql://ci@127.0.0.1:{port}/ci")
    assert "hunter2" not in result.output


def test_unknown_command_is_a_usage_error(repo: InMemoryRepository) -> None:
    assert "No such command" in fails(repo, 2, "user", "delete")


# ---------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("email", ["a@b", "first.last+tag@example.co.uk", "ÄNN@exämple.de"])
def test_check_email_accepts(email: str) -> None:
    assert actions.check_email(email) == email


@pytest.mark.parametrize("email", ["a", "a@", "@b", "a b@c", "a@b\n", "a@@b", "a\t@b"])
def test_check_email_refuses(email: str) -> None:
    with pytest.raises(InvalidInput):
        actions.check_email(email)


def test_check_name_strips_and_refuses_control_characters() -> None:
    assert actions.check_name("  Ann Lee ") == "Ann Lee"
    for bad in ("", "\t", "a\x1b[2Jb", "a\rb"):
        with pytest.raises(InvalidInput):
            actions.check_name(bad)


def test_table_pads_columns_to_the_widest_cell() -> None:
    assert render.table(["A", "BB"], [["xxx", "y"], ["z", "wwww"]]).splitlines() == [
        "A     BB", "----------", "xxx   y", "z     wwww"]


def test_describe_error_names_the_database_file() -> None:
    message, code = render.describe_error(sqlite3.OperationalError("disk I/O error"), "/srv/x.db")
    assert (message, code) == ("database error (/srv/x.db): disk I/O error", 1)
    assert render.describe_error(InvalidInput("bad"), None) == ("bad", 2)


# ---------------------------------------------------------------------------- controllers


def test_controller_list_shows_heartbeat_age_jobs_and_liveness(repo: InMemoryRepository) -> None:
    assert ok(repo, "controller", "list").stdout == "No controllers.\n"
    now = datetime.now(UTC)
    live = repo.acquire_lease("ctl-live", "host-a", 11, "0.1.0", now, 60)
    repo.acquire_lease("ctl-gone", "host-b", 22, "0.1.0", now - timedelta(seconds=300), 60)
    stopped = repo.acquire_lease("ctl-stopped", "host-c", 33, "0.1.0", now, 60)
    repo.release_lease("ctl-stopped", stopped.token, now)
    table = ok(repo, "controller", "list").stdout.splitlines()
    assert table[0].split() == ["CONTROLLER", "HOST", "PID", "VERSION", "STARTED", "HEARTBEAT",
                                "JOBS", "ALIVE"]
    by_id = {line.split()[0]: line for line in table[2:]}
    assert by_id["ctl-live"].endswith("yes") and "300 s ago" in by_id["ctl-gone"]
    assert by_id["ctl-gone"].endswith("no") and by_id["ctl-stopped"].endswith("no (stopped)")
    rows = json.loads(ok(repo, "controller", "list", "--json").stdout)
    assert [(r["id"], r["alive"], r["running_jobs"]) for r in rows] == [
        ("ctl-gone", False, 0), ("ctl-live", True, 0), ("ctl-stopped", False, 0)]
    assert live.token not in json.dumps(rows)


# ----------------------------------------------------------------------------- retention
def test_jobs_prune_dry_run_then_prune_then_nothing_left(repo: InMemoryRepository) -> None:
    user = repo.create_user("Ada", "ada@example.com")
    old, recent = (repo.create_job(user.id, b"z" * 1000, None) for _ in range(2))
    fence = hold_lease(repo, "ctl")
    for job, age in ((old, timedelta(days=40)), (recent, timedelta(days=1))):
        assert repo.claim_next_job(fence) is not None
        repo.finish_job(job.id, JobOutcome(JobStatus.CANCELLED, None, False, "cancelled by user"),
                        utcnow() - age, fence=fence)
    dry = ok(repo, "jobs", "prune", "--dry-run").stdout
    assert dry.startswith("Would remove the output and archives of 1 job finished before ")
    assert dry.rstrip().endswith("1000 B would be freed.")
    assert repo.get_job(old.id).pruned_at is None
    done = ok(repo, "jobs", "prune").stdout  # CI_RETENTION_DAYS: 30 by default
    assert done.startswith("Removed the output and archives of 1 job") and "1000 B freed" in done
    assert repo.get_job(old.id).pruned_at is not None and repo.get_job(recent.id).pruned_at is None
    assert ok(repo, "jobs", "prune", "--older-than", "12h").stdout.startswith("Removed")
    assert ok(repo, "jobs", "prune", "--older-than", "1h").stdout.startswith("No job finished")


def test_jobs_prune_refuses_a_bad_age_in_one_line(repo: InMemoryRepository) -> None:
    result = invoke(repo, "jobs", "prune", "--older-than", "soon")
    assert result.exit_code == 2
    assert result.stderr == "Error: not an age: 'soon' (use e.g. 30d, 12h, 90m)\n"


def test_ages_read_like_people_write_them() -> None:
    assert parse_age("30d") == parse_age("30") == timedelta(days=30)
    assert parse_age("12h") == timedelta(hours=12)
    assert parse_age(" 90m ") == timedelta(minutes=90)
    assert parse_age("2w") == timedelta(weeks=2)
    assert parse_age("1.5h") == timedelta(minutes=90)
    for bad in ("", "d", "-1d", "3y", "1e9999d"):
        with pytest.raises(InvalidInput):
            parse_age(bad)


# --------------------------------------------------------------------------- environment cache
def _cached(repo: InMemoryRepository, email: str, requirements: str, size: int) -> EnvEntry:
    try:
        user = repo.get_user_by_email(email)
    except NotFound:
        user = repo.create_user(email.split("@")[0], email)
    key = EnvKey(user_id=user.id, engine_id="engine-abcdef123456", image_id="sha256:" + "c" * 64,
                 requirements_sha256=requirements * 64)
    entry = repo.begin_env(key, f"vol-{email}-{requirements}", "job-1", utcnow())
    built = repo.env_built(entry.id, "3.11.2", size, utcnow())
    assert built is not None
    return built


def test_cache_list_shows_entries_with_owner_size_and_key(repo: InMemoryRepository) -> None:
    assert invoke(repo, "cache", "list").output == "No cached environments.\n"
    first = _cached(repo, "ann@example.com", "a", 48 * 1024 * 1024)
    _cached(repo, "bob@example.com", "b", 1024 * 1024)
    result = invoke(repo, "cache", "list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["ENTRY", "USER", "STATE", "SIZE", "PYTHON", "REQUIREMENTS",
                                "IMAGE", "ENGINE", "BUILT", "LAST", "USED"]
    assert lines[2].split()[:7] == [first.id[:8], "ann@example.com", "ready", "48.0", "MB",
                                    "3.11.2", "a" * 12]
    assert lines[-1].startswith("2 ready, 49.0 MB")
    listed = json.loads(invoke(repo, "cache", "list", "--json").output)
    assert [(e["user_email"], e["state"], e["size_bytes"]) for e in listed] == [
        ("ann@example.com", "ready", 48 * 1024 * 1024), ("bob@example.com", "ready", 1024 * 1024)]
    assert listed[0]["volume"] == first.volume and listed[0]["built_at"]


def test_cache_prune_marks_entries_of_one_user_or_all(repo: InMemoryRepository) -> None:
    _cached(repo, "ann@example.com", "a", 1024 * 1024)
    _cached(repo, "ann@example.com", "b", 1024 * 1024)
    bob = _cached(repo, "bob@example.com", "a", 1024 * 1024)
    result = invoke(repo, "cache", "prune", "--user", "ann@example.com")
    assert result.exit_code == 0
    assert result.output.startswith("Marked 2 cached environments for removal (2.0 MB)")
    assert {e.key.user_id: e.state for e in repo.list_envs() if e.state is EnvState.READY} == {
        bob.key.user_id: EnvState.READY}
    assert invoke(repo, "cache", "prune", "--user", bob.key.user_id).output.startswith(
        "Marked 1 cached environment for removal")
    assert invoke(repo, "cache", "prune").output == "No cached environments to prune.\n"
    missing = invoke(repo, "cache", "prune", "--user", "nobody@example.com")
    assert missing.exit_code == 1
    assert missing.output.strip() == "Error: user not found: nobody@example.com"
