"""API keys: generation, hashing, and the decision whether a presented key is good.

A key is `ci_` + 43 URL-safe characters (32 random bytes). Only its SHA-256 and a short display
prefix are stored; the key is shown once by `ci-admin key create` and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from ci_common.errors import AuthenticationError
from ci_common.models import StoredKey, User

KEY_PREFIX = "ci_"
KEY_RANDOM_BYTES = 32
DISPLAY_PREFIX_CHARS = 11  # "ci_" + 8 random characters: enough to tell keys apart
_KEY_SHAPE = re.compile(r"ci_[A-Za-z0-9_-]{32,128}")
# Recording last_used_at on every request would make every request a write; once a minute is
# what an operator needs to tell a live key from a stale one.
LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class NewKey:
    """A freshly generated key: `plaintext` is shown once, the rest is stored."""

    plaintext: str
    key_hash: str
    prefix: str


def generate_key() -> NewKey:
    """A new random key with its hash and display prefix."""
    plaintext = KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)
    return NewKey(plaintext=plaintext, key_hash=hash_key(plaintext),
                  prefix=display_prefix(plaintext))


def hash_key(plaintext: str) -> str:
    """Hex SHA-256 of the key. Keys are 256-bit random, so a plain hash is enough (no KDF)."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def display_prefix(plaintext: str) -> str:
    return plaintext[:DISPLAY_PREFIX_CHARS]


def looks_like_key(text: str) -> bool:
    """Whether text has the shape of a key at all (cheap check before any database work)."""
    return _KEY_SHAPE.fullmatch(text) is not None


def choose_key(presented: str, candidates: list[StoredKey]) -> StoredKey:
    """Pick the stored key matching `presented`, or raise AuthenticationError with a reason.

    Hashes are compared with hmac.compare_digest, in constant time. The reason says what an
    honest user needs to fix (revoked, deactivated) without telling an attacker anything about
    keys they do not hold.
    """
    if not looks_like_key(presented):
        raise AuthenticationError("malformed API key (expected ci_…)")
    presented_hash = hash_key(presented)
    match = None
    for candidate in candidates:
        if hmac.compare_digest(candidate.key_hash, presented_hash):
            match = candidate
    if match is None:
        raise AuthenticationError("invalid API key")
    if not match.key.is_active:
        raise AuthenticationError("API key has been revoked")
    if not match.user.is_active:
        raise AuthenticationError("user account is deactivated")
    return match


def should_touch(last_used_at: datetime | None, now: datetime) -> bool:
    """Whether a successful use is worth recording (see LAST_USED_RESOLUTION)."""
    return last_used_at is None or now - last_used_at >= LAST_USED_RESOLUTION


def authenticated_user(stored: StoredKey) -> User:
    return stored.user
