"""The `ci-admin` command: users and API keys, straight against the service's database.

    ci-admin [--db-path P | --database-url U] [--debug] user create --name N --email E
                                     user list [--json]
                                     user get (--email E | ID) [--json]
                                     user activate ID | user deactivate ID
                                     key create (--email E | --user-id ID) --name N
                                     key list [--email E | --user-id ID] [--json]
                                     key revoke KEY_ID
                                     controller list [--json]
                                     jobs prune [--older-than AGE] [--dry-run]
                                     cache list [--json]
                                     cache prune [--user EMAIL|ID]

The entry point builds `Settings` from `--db-path` / `CI_DB_PATH` (SQLite) or `--database-url` /
`CI_DATABASE_URL` (PostgreSQL, which wins when both are given) and opens the repository on
first use (so `--help` never touches the database). Tests inject a repository instead:
`CliRunner().invoke(cli, args, obj=repository)`; an injected repository is not closed.

Every failure passes through `_AdminGroup.invoke`: one `Error: <message>` line on stderr and
the error's exit code (1; 2 for invalid input, like click's usage errors). `--debug` adds the
traceback above that line.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import click

from ci_admin import actions, render
from ci_common import retention
from ci_common.models import utcnow
from ci_common.repository import Repository
from ci_common.settings import Settings
from ci_persistence import open_repository


class AdminState:
    """What the commands share through `ctx.obj`: the repository, opened on first use."""

    def __init__(self, opener: Callable[[], Repository], database: str | None,
                 *, owned: bool = True, settings: Settings | None = None) -> None:
        self._opener = opener
        self.settings = settings or Settings.from_env({})
        self._repository: Repository | None = None
        self._owned = owned
        self.database = database  # for messages: the file, or the URL without its password

    @classmethod
    def injected(cls, repository: Repository) -> AdminState:
        """Wrap a repository the caller owns (tests): used as is, never closed here."""
        state = cls(lambda: repository, None, owned=False)
        state._repository = repository
        return state

    @property
    def repository(self) -> Repository:
        if self._repository is None:
            self._repository = self._opener()
        return self._repository

    def close(self) -> None:
        """Close the repository if this state opened it."""
        if self._owned and self._repository is not None:
            self._repository.close()
            self._repository = None


class _Failure(click.ClickException):
    """A failure already described for the operator, with its own exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# Click's own control flow: usage errors, --help, Ctrl-C. Everything else is a failure to report.
_CLICK_FLOW = (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, EOFError)


class _AdminGroup(click.Group):
    """The top-level group; the one place where errors become `Error: <message>` lines."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _CLICK_FLOW:
            raise
        except Exception as exc:
            state = ctx.obj if isinstance(ctx.obj, AdminState) else None
            message, exit_code = render.describe_error(exc, state.database if state else None)
            if ctx.params.get("debug"):
                traceback.print_exc()
            raise _Failure(message, exit_code) from exc


@click.group("ci-admin", cls=_AdminGroup,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db-path", type=click.Path(dir_okay=False), envvar="CI_DB_PATH",
              show_envvar=True, help="SQLite database file.  [default: ci_jobs.db]")
@click.option("--database-url", envvar="CI_DATABASE_URL", show_envvar=True,
              help="PostgreSQL instead of SQLite: postgresql://user@host:port/db "
                   "(wins over --db-path).")
@click.option("--debug", is_flag=True, help="Print a traceback with any error.")
@click.pass_context
def cli(ctx: click.Context, db_path: str | None, database_url: str | None,
        debug: bool) -> None:
    """Manage the CI service's users and API keys (run on the database host)."""
    if isinstance(ctx.obj, AdminState):
        return
    if ctx.obj is not None:
        ctx.obj = AdminState.injected(ctx.obj)
        return
    settings = Settings.from_env(db_path=db_path, database_url=database_url)
    state = AdminState(lambda: open_repository(settings), settings.database_shown(),
                       settings=settings)
    ctx.obj = state
    ctx.call_on_close(state.close)


def _echo_warning(message: str) -> None:
    click.echo(message, err=True)


# ---------------------------------------------------------------------------- users


@cli.group()
def user() -> None:
    """Create, inspect, activate and deactivate users."""


@user.command("create")
@click.option("--name", required=True, help="The user's display name.")
@click.option("--email", required=True, help="The user's email (unique, any letter case).")
@click.pass_obj
def user_create(state: AdminState, name: str, email: str) -> None:
    """Create an active user and print their ID."""
    click.echo(render.user_created(actions.create_user(state.repository, name, email)))


@user.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.pass_obj
def user_list(state: AdminState, as_json: bool) -> None:
    """List all users, oldest first."""
    users = state.repository.list_users()
    if as_json:
        click.echo(render.json_list([render.user_json(u) for u in users]))
    else:
        click.echo(render.users_table(users))


@user.command("get")
@click.argument("user_id", required=False)
@click.option("--email", help="Find the user by email instead of ID.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list of one object (the shape of `user list --json`).")
@click.pass_obj
def user_get(state: AdminState, user_id: str | None, email: str | None, as_json: bool) -> None:
    """Show one user, by ID or by --email."""
    if user_id is not None and email is not None:
        raise click.UsageError("give a user ID or --email, not both")
    if user_id is None and email is None:
        raise click.UsageError("give a user ID or --email")
    found = actions.find_user(state.repository, user_id=user_id, email=email)
    if as_json:
        click.echo(render.json_list([render.user_json(found)]))
    else:
        keys = state.repository.list_api_keys(found.id)
        click.echo(render.user_detail(found, keys))


@user.command("deactivate")
@click.argument("user_id")
@click.pass_obj
def user_deactivate(state: AdminState, user_id: str) -> None:
    """Deactivate a user: their keys are refused from the next request on."""
    click.echo(render.active_changed(actions.set_user_active(state.repository, user_id, False)))


@user.command("activate")
@click.argument("user_id")
@click.pass_obj
def user_activate(state: AdminState, user_id: str) -> None:
    """Activate a user again."""
    click.echo(render.active_changed(actions.set_user_active(state.repository, user_id, True)))


# ---------------------------------------------------------------------------- keys


@cli.group()
def key() -> None:
    """Create, list and revoke API keys."""


@key.command("create")
@click.option("--email", help="The owner's email.")
@click.option("--user-id", help="The owner's user ID.")
@click.option("--name", required=True, help="A label for the key, e.g. the machine it is for.")
@click.pass_obj
def key_create(state: AdminState, email: str | None, user_id: str | None, name: str) -> None:
    """Create an API key and print it, once.

    A deactivated user may get a key (a warning goes to stderr); it is refused until the
    user is activated.
    """
    if email is not None and user_id is not None:
        raise click.UsageError("give --email or --user-id, not both")
    if email is None and user_id is None:
        raise click.UsageError("give --email or --user-id")
    name = actions.check_name(name)  # before any lookup: a bad name is a usage problem (exit 2)
    owner = actions.find_user(state.repository, user_id=user_id, email=email)
    created = actions.create_key(state.repository, owner, name)
    click.echo(render.key_created(created))
    if not owner.is_active:
        _echo_warning(render.inactive_owner_warning(owner))


@key.command("list")
@click.option("--email", help="Only this user's keys.")
@click.option("--user-id", help="Only the keys of the user with this ID.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.pass_obj
def key_list(state: AdminState, email: str | None, user_id: str | None, as_json: bool) -> None:
    """List API keys (never the keys themselves) with their owners."""
    if email is not None and user_id is not None:
        raise click.UsageError("give --email or --user-id, not both")
    keys = actions.list_keys(state.repository, email, user_id)
    if as_json:
        click.echo(render.json_list([render.key_json(k) for k in keys]))
    else:
        click.echo(render.keys_table(keys))


@key.command("revoke")
@click.argument("key_id")
@click.pass_obj
def key_revoke(state: AdminState, key_id: str) -> None:
    """Revoke an API key: it is refused from the next request on."""
    click.echo(render.key_revoked(actions.revoke_key(state.repository, key_id)))


# ---------------------------------------------------------------------------- controllers


@cli.group()
def controller() -> None:
    """Inspect the controllers registered in this database."""


@controller.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.pass_obj
def controller_list(state: AdminState, as_json: bool) -> None:
    """List controllers: holder, heartbeat age, running jobs, and whether each is alive.

    A controller is alive while its heartbeat is younger than CI_CONTROLLER_LEASE seconds.
    """
    leases = state.repository.list_leases()
    now = utcnow()
    if as_json:
        click.echo(render.json_list([render.controller_json(c, now) for c in leases]))
    else:
        click.echo(render.controllers_table(leases, now))


@cli.group()
def jobs() -> None:
    """Maintain jobs: retention."""


@jobs.command("prune")
@click.option("--older-than", "older_than", metavar="AGE",
              help="Finished longer ago than this: 30d, 12h, 90m, 2w (default: "
                   "CI_RETENTION_DAYS days).")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@click.pass_obj
def jobs_prune(state: AdminState, older_than: str | None, dry_run: bool) -> None:
    """Remove the output and archives of jobs that finished long ago (the jobs stay listed)."""
    if older_than is not None:
        age = retention.parse_age(older_than)
    elif state.settings.retention_days > 0:
        age = timedelta(days=state.settings.retention_days)
    else:
        raise click.UsageError("retention is off (CI_RETENTION_DAYS=0): give --older-than")
    cutoff = utcnow() - age
    if dry_run:
        result = state.repository.prune_jobs(cutoff, dry_run=True)
    else:
        result = retention.prune(state.repository, cutoff, max_passes=10**9)
    click.echo(render.prune_result(result, cutoff, dry_run))


# ---------------------------------------------------------------------------- environment cache
@cli.group()
def cache() -> None:
    """The installed-environment cache: list entries, prune them."""


@cache.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.pass_obj
def cache_list(state: AdminState, as_json: bool) -> None:
    """List cached environments, least recently used first: owner, state, size, key, age."""
    entries = state.repository.list_envs()
    emails = {user.id: user.email for user in state.repository.list_users()}
    now = utcnow()
    if as_json:
        click.echo(render.json_list([render.env_json(e, emails) for e in entries]))
    else:
        click.echo(render.envs_table(entries, emails, now))


@cache.command("prune")
@click.option("--user", "user", metavar="EMAIL|ID", help="Only this user's environments.")
@click.pass_obj
def cache_prune(state: AdminState, user: str | None) -> None:
    """Mark cached environments for removal; each controller removes its volumes next pass.

    A job already running from one keeps it until it ends; the next job of its key rebuilds.
    """
    user_id = None
    if user is not None:
        found = (actions.find_user(state.repository, email=user) if "@" in user
                 else actions.find_user(state.repository, user_id=user))
        user_id = found.id
    click.echo(render.envs_pruned(state.repository.prune_envs(user_id)))


def main() -> None:
    """Console-script entry point (`ci-admin`, `python -m ci_admin`)."""
    cli.main(prog_name="ci-admin")
