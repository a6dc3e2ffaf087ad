"""`ci-admin` as operators run it: real subprocesses on a temporary SQLite database.

Each test owns its database (tests run in parallel under pytest -n auto). Checks are grouped
per scenario because every subprocess costs a few hundred milliseconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ci_common.errors import AuthenticationError
from ci_common.keys import choose_key, display_prefix, hash_key
from ci_common.models import StoredKey
from ci_persistence import SqliteRepository

MODULE = [sys.executable, "-m", "ci_admin"]
KEY_IN_OUTPUT = re.compile(r"API Key: (ci_[A-Za-z0-9_-]+)")
USER_ID_IN_OUTPUT = re.compile(r"ID:\s+(\S+)")
TIMEOUT_S = 60


def _env(**extra: str) -> dict[str, str]:
    """The caller's environment without CI_* settings, so only what a test passes counts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CI_")}
    env.update(extra)
    return env


def admin_argv(db: Path, *args: str) -> list[str]:
    return [*MODULE, "--db-path", str(db), *args]


def admin(db: Path, *args: str, env: dict[str, str] | None = None,
          argv: Sequence[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv) if argv is not None else admin_argv(db, *args),
                          env=env or _env(), capture_output=True, text=True, encoding="utf-8",
                          timeout=TIMEOUT_S)


def ok(db: Path, *args: str) -> str:
    result = admin(db, *args)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


def fails(db: Path, exit_code: int, *args: str) -> str:
    """Run a command that must fail with one clean error line; return that line."""
    result = admin(db, *args)
    assert result.returncode == exit_code, (args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    last = result.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("Error: "), result.stderr
    return last


def create_user(db: Path, email: str, name: str = "Someone") -> str:
    out = ok(db, "user", "create", "--name", name, "--email", email)
    assert out.startswith("✓ User created successfully\n"), out
    match = USER_ID_IN_OUTPUT.search(out)
    assert match, out
    return str(uuid.UUID(match.group(1)))


def create_key(db: Path, *owner: str, name: str = "key") -> str:
    out = ok(db, "key", "create", *owner, "--name", name)
    assert "⚠️  IMPORTANT: This is the only time you'll see this key!" in out
    match = KEY_IN_OUTPUT.search(out)
    assert match, out
    return match.group(1)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ci_jobs.db"


@pytest.fixture
def reader(db: Path) -> Iterator[SqliteRepository]:
    """This test process's own connection to the database the subprocesses write."""
    repo = SqliteRepository(str(db))
    try:
        yield repo
    finally:
        repo.close()


def authenticate(repo: SqliteRepository, plaintext: str) -> StoredKey:
    return choose_key(plaintext, repo.find_keys_by_prefix(display_prefix(plaintext)))


def test_user_commands(db: Path) -> None:
    ann_id = create_user(db, "ann@example.com", "Ann Lee")
    bob_id = create_user(db, "bob@example.com", "Bob")

    assert "already exists" in fails(db, 1, "user", "create", "--name", "X",
                                     "--email", "ANN@example.com")
    assert "not an email address" in fails(db, 2, "user", "create", "--name", "X",
                                           "--email", "not-an-email")

    table = ok(db, "user", "list").splitlines()
    assert table[0].split() == ["ID", "NAME", "EMAIL", "ACTIVE", "CREATED"]
    assert [row.split()[0] for row in table[2:]] == [ann_id, bob_id]
    assert "Ann Lee" in table[2]

    ann = json.loads(ok(db, "user", "get", "--email", "ann@example.com", "--json"))
    assert len(ann) == 1
    assert ann[0]["id"] == ann_id
    assert set(ann[0]) == {"id", "name", "email", "is_active", "created_at"}
    assert "Email:    bob@example.com" in ok(db, "user", "get", bob_id)

    missing = str(uuid.uuid4())
    assert fails(db, 1, "user", "get", missing) == f"Error: user not found: {missing}"
    assert fails(db, 1, "user", "get", "--email", "x@y.z") == "Error: user not found: x@y.z"
    assert fails(db, 1, "user", "deactivate", missing) == f"Error: user not found: {missing}"
    assert fails(db, 1, "user", "activate", missing) == f"Error: user not found: {missing}"

    assert ok(db, "user", "deactivate", bob_id).startswith("✓ User deactivated: bob@example.com")
    users = json.loads(ok(db, "user", "list", "--json"))
    assert [(u["email"], u["is_active"]) for u in users] == [
        ("ann@example.com", True), ("bob@example.com", False)]
    assert ok(db, "user", "activate", bob_id).startswith("✓ User activated: bob@example.com")
    assert json.loads(ok(db, "user", "get", bob_id, "--json"))[0]["is_active"] is True


def test_key_commands(db: Path, reader: SqliteRepository) -> None:
    ann_id = create_user(db, "ann@example.com")
    bob_id = create_user(db, "bob@example.com")
    ann_key = create_key(db, "--email", "ann@example.com", name="laptop")
    bob_key = create_key(db, "--user-id", bob_id, name="ci")

    stored = authenticate(reader, ann_key)
    assert (stored.user.id, stored.key.name) == (ann_id, "laptop")
    assert authenticate(reader, bob_key).user.id == bob_id

    table = ok(db, "key", "list")
    keys = json.loads(ok(db, "key", "list", "--json"))
    only_bob = json.loads(ok(db, "key", "list", "--email", "bob@example.com", "--json"))
    assert table.splitlines()[0].split() == ["KEY", "ID", "NAME", "PREFIX", "USER", "ACTIVE",
                                             "CREATED", "LAST", "USED"]
    assert [(k["user_email"], k["name"], k["prefix"]) for k in keys] == [
        ("ann@example.com", "laptop", display_prefix(ann_key)),
        ("bob@example.com", "ci", display_prefix(bob_key))]
    assert [k["user_id"] for k in only_bob] == [bob_id]
    for secret in (ann_key, bob_key, hash_key(ann_key), hash_key(bob_key)):
        assert secret not in table + json.dumps(keys)

    revoked = ok(db, "key", "revoke", stored.key.id)
    assert revoked.startswith(f"✓ API key revoked: {stored.key.id}")
    with pytest.raises(AuthenticationError, match="revoked"):
        authenticate(reader, ann_key)
    assert json.loads(ok(db, "key", "list", "--email", "ann@example.com", "--json"))[0][
        "is_active"] is False

    missing = str(uuid.uuid4())
    assert fails(db, 1, "key", "revoke", missing) == f"Error: API key not found: {missing}"
    assert fails(db, 1, "key", "create", "--email", "x@y.z", "--name", "k") == (
        "Error: user not found: x@y.z")
    assert fails(db, 1, "key", "create", "--user-id", missing, "--name", "k") == (
        f"Error: user not found: {missing}")
    assert fails(db, 1, "key", "list", "--email", "x@y.z") == "Error: user not found: x@y.z"
    assert "not both" in fails(db, 2, "key", "create", "--email", "ann@example.com",
                               "--user-id", ann_id, "--name", "k")
    assert "give --email or --user-id" in fails(db, 2, "key", "create", "--name", "k")


def test_key_for_a_deactivated_user(db: Path, reader: SqliteRepository) -> None:
    user_id = create_user(db, "gone@example.com")
    ok(db, "user", "deactivate", user_id)
    result = admin(db, "key", "create", "--email", "gone@example.com", "--name", "later")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("Warning: user gone@example.com is deactivated")
    match = KEY_IN_OUTPUT.search(result.stdout)
    assert match
    with pytest.raises(AuthenticationError, match="deactivated"):
        authenticate(reader, match.group(1))


def test_processes_sharing_the_database_see_each_others_writes(
        db: Path, reader: SqliteRepository) -> None:
    create_user(db, "first@example.com")  # also creates the schema before the race below
    argvs = [admin_argv(db, "user", "create", "--name", "N", "--email", email)
             for email in ("a@example.com", "b@example.com", "same@example.com",
                           "SAME@example.com")]
    procs = [subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, encoding="utf-8") for argv in argvs]
    outputs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    results = [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]
    assert all("Traceback" not in err for _, _, err in results)
    assert [code for code, _, _ in results[:2]] == [0, 0]
    assert sorted(code for code, _, _ in results[2:]) == [0, 1]
    assert any("already exists" in err for _, _, err in results[2:])

    emails = sorted(u["email"].lower() for u in json.loads(ok(db, "user", "list", "--json")))
    assert emails == ["a@example.com", "b@example.com", "first@example.com", "same@example.com"]

    # A key made by one process authenticates through another connection, and a revoke by a
    # third process is seen there too.
    key = create_key(db, "--email", "a@example.com")
    key_id = authenticate(reader, key).key.id
    ok(db, "key", "revoke", key_id)
    with pytest.raises(AuthenticationError, match="revoked"):
        authenticate(reader, key)


def test_console_script_on_path_and_ci_db_path(db: Path) -> None:
    bin_dir = str(Path(sys.executable).parent)
    env = _env(CI_DB_PATH=str(db), PATH=os.pathsep.join([bin_dir, os.environ.get("PATH", "")]))
    created = admin(db, env=env, argv=["ci-admin", "user", "create", "--name", "Script",
                                       "--email", "script@example.com"])
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("✓ User created successfully")
    assert db.exists()
    users = json.loads(ok(db, "user", "list", "--json"))
    assert [u["email"] for u in users] == ["script@example.com"]


def test_unusable_database_path_is_one_error_line(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "plain-file"
    not_a_dir.write_text("")
    bad_db = not_a_dir / "ci_jobs.db"
    result = admin(bad_db, "user", "list")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: "), result.stderr

    debug = admin(bad_db, argv=admin_argv(bad_db, "--debug", "user", "list"))
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip("\n").splitlines()[-1] == result.stderr.rstrip("\n")

    directory = admin(tmp_path, "user", "list")
    assert directory.returncode == 2
    assert "is a directory" in directory.stderr
