"""What each `ci-admin` command does to the repository, apart from how it is shown.

Repository errors are re-raised with messages that name what the operator typed (the email or
the id), so every implementation of the Repository reads the same on the terminal.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from ci_common.errors import AlreadyExists, InvalidInput, NotFound
from ci_common.keys import NewKey, generate_key
from ci_common.models import ApiKey, User
from ci_common.repository import Repository

# Deliberately loose: one @ with something on each side and no whitespace. Whether the mailbox
# exists is not ci-admin's business; the email is only an operator-facing handle.
_EMAIL_SHAPE = re.compile(r"[^@\s]+@[^@\s]+")


def check_email(email: str) -> str:
    """The email unchanged, or InvalidInput when it is not roughly `local@domain`."""
    if _EMAIL_SHAPE.fullmatch(email) is None:
        raise InvalidInput(f"not an email address: {email!r}")
    return email


def check_name(name: str) -> str:
    """The name without surrounding whitespace; InvalidInput when blank or holding control chars."""
    stripped = name.strip()
    if not stripped:
        raise InvalidInput("the name must not be blank")
    # A newline or escape sequence in a name would forge rows in `user list` / `key list`.
    if any(unicodedata.category(ch) == "Cc" for ch in stripped):
        raise InvalidInput(f"the name must not contain control characters: {stripped!r}")
    return stripped


def create_user(repository: Repository, name: str, email: str) -> User:
    """Create an active user; AlreadyExists when the email is taken (in any letter case)."""
    try:
        return repository.create_user(check_name(name), check_email(email))
    except AlreadyExists:
        raise AlreadyExists(f"a user with email {email} already exists") from None


def find_user(repository: Repository, *, user_id: str | None = None,
              email: str | None = None) -> User:
    """The user with this id or this email (exactly one is given); NotFound otherwise."""
    if (user_id is None) == (email is None):
        raise InvalidInput("give exactly one of a user id or an email")
    try:
        if email is not None:
            return repository.get_user_by_email(email)
        assert user_id is not None
        return repository.get_user(user_id)
    except NotFound:
        raise NotFound(f"user not found: {email if email is not None else user_id}") from None


@dataclass(frozen=True, slots=True)
class ActiveChange:
    """The user after activate/deactivate, and whether the call changed anything."""

    user: User
    changed: bool


def set_user_active(repository: Repository, user_id: str, active: bool) -> ActiveChange:
    """Activate or deactivate a user (idempotent); NotFound for an unknown id."""
    before = find_user(repository, user_id=user_id)
    if before.is_active == active:
        return ActiveChange(user=before, changed=False)
    return ActiveChange(user=repository.set_user_active(before.id, active), changed=True)


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A key just stored: `plaintext` exists only here, to be shown once and forgotten."""

    key: ApiKey
    plaintext: str
    user: User


def create_key(repository: Repository, user: User, name: str,
               generate: Callable[[], NewKey] = generate_key) -> CreatedKey:
    """Generate a key for the user and store only its hash and display prefix.

    A deactivated user may get a key (the caller warns): operators often prepare keys before
    reactivating an account, and authentication refuses the key until then anyway.
    """
    new = generate()
    try:
        stored = repository.create_api_key(user.id, check_name(name), new.key_hash, new.prefix)
    except NotFound:
        # The user was deleted between the lookup and the insert (another process).
        raise NotFound(f"user not found: {user.id}") from None
    return CreatedKey(key=stored, plaintext=new.plaintext, user=user)


def list_keys(repository: Repository, email: str | None = None,
              user_id: str | None = None) -> list[ApiKey]:
    """Every key with its owner, or one user's keys (by email or id; oldest first)."""
    if email is None and user_id is None:
        return repository.list_api_keys()
    return repository.list_api_keys(find_user(repository, user_id=user_id, email=email).id)


@dataclass(frozen=True, slots=True)
class Revocation:
    """The key after revocation, and whether it was still active before."""

    key: ApiKey
    changed: bool


def revoke_key(repository: Repository, key_id: str) -> Revocation:
    """Revoke a key (idempotent); NotFound for an unknown id."""
    # The Protocol has no get-key-by-id; the key count is small, and this tells the operator
    # whether the key was still live, which revoke_api_key alone cannot.
    before = next((k for k in repository.list_api_keys() if k.id == key_id), None)
    if before is None:
        raise NotFound(f"API key not found: {key_id}")
    try:
        after = repository.revoke_api_key(key_id)
    except NotFound:
        raise NotFound(f"API key not found: {key_id}") from None
    return Revocation(key=after, changed=before.is_active)
