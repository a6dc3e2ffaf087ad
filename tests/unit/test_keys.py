"""API key generation, hashing and the accept/refuse decision."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ci_common.errors import AuthenticationError
from ci_common.keys import (
    choose_key,
    display_prefix,
    generate_key,
    hash_key,
    looks_like_key,
    should_touch,
)
from ci_common.models import ApiKey, StoredKey, User

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def stored(plaintext: str, *, key_active: bool = True, user_active: bool = True) -> StoredKey:
    user = User(id="u1", name="A", email="a@example.com", is_active=user_active, created_at=NOW)
    key = ApiKey(id="k1", user_id="u1", user_email=user.email, name="dev",
                 prefix=display_prefix(plaintext), is_active=key_active, created_at=NOW,
                 last_used_at=None)
    return StoredKey(key=key, key_hash=hash_key(plaintext), user=user)


def test_generated_keys_are_long_random_and_url_safe() -> None:
    keys = {generate_key().plaintext for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert key.startswith("ci_") and len(key) >= 3 + 43
        assert looks_like_key(key)


def test_only_hash_and_prefix_are_kept() -> None:
    new = generate_key()
    assert new.key_hash == hash_key(new.plaintext) and len(new.key_hash) == 64
    assert new.plaintext not in new.key_hash
    assert new.plaintext.startswith(new.prefix) and len(new.prefix) < len(new.plaintext) // 3


def test_choose_key_accepts_the_matching_key() -> None:
    new = generate_key()
    other = generate_key()
    assert choose_key(new.plaintext, [stored(other.plaintext), stored(new.plaintext)]).key_hash \
        == new.key_hash


@pytest.mark.parametrize(
    ("presented", "candidate", "reason"),
    [
        ("not-a-key", None, "malformed"),
        ("ci_short", None, "malformed"),
        (None, "other", "invalid API key"),
    ],
)
def test_choose_key_refuses_bad_keys(presented: str | None, candidate: str | None,
                                     reason: str) -> None:
    real = generate_key().plaintext
    presented = presented or real
    candidates = [stored(generate_key().plaintext)] if candidate else []
    with pytest.raises(AuthenticationError, match=reason):
        choose_key(presented, candidates)


def test_choose_key_refuses_revoked_keys_and_deactivated_users() -> None:
    key = generate_key().plaintext
    with pytest.raises(AuthenticationError, match="revoked"):
        choose_key(key, [stored(key, key_active=False)])
    with pytest.raises(AuthenticationError, match="deactivated"):
        choose_key(key, [stored(key, user_active=False)])


def test_last_used_is_recorded_at_most_once_a_minute() -> None:
    assert should_touch(None, NOW)
    assert not should_touch(NOW - timedelta(seconds=30), NOW)
    assert should_touch(NOW - timedelta(seconds=61), NOW)
