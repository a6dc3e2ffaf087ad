"""Database URLs: which backend a URL names, and how to show one without its password."""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from ci_common.errors import InvalidInput

POSTGRES_SCHEMES = ("postgresql", "postgres")
_HIDDEN = "***"


def check_postgres_url(url: str) -> str:
    """The URL if it names PostgreSQL (`postgresql://user@host:port/db`); else InvalidInput."""
    scheme = url.split(":", 1)[0].lower() if "://" in url else ""
    if scheme not in POSTGRES_SCHEMES:
        raise InvalidInput(f"CI_DATABASE_URL must be a postgresql:// URL, not {redact_url(url)!r}")
    return url


def redact_url(url: str) -> str:
    """The URL for messages and logs: no password, whether in the user part or the query."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hosts = netloc.rpartition("@")
            netloc = f"{userinfo.split(':', 1)[0]}@{hosts}"
        query = urlencode([(key, value) for key, value in parse_qsl(parts.query)
                           if "password" not in key.lower()], safe="/:,")
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:  # not even a URL: say nothing of what it holds
        return "<unparsable database URL>"


def scrub(text: str, url: str) -> str:
    """text with any password from url masked (driver messages may quote connection details)."""
    for secret in _secrets(url):
        text = text.replace(secret, _HIDDEN)
    return text


def _secrets(url: str) -> list[str]:
    try:
        parts = urlsplit(url)
        found = [parts.password] if parts.password else []
        found += [value for key, value in parse_qsl(parts.query) if "password" in key.lower()]
    except ValueError:
        return []
    # Longest first, raw and decoded: masking a short one must not leave part of a longer one.
    return sorted({form for secret in found for form in (secret, unquote(secret)) if form},
                  key=len, reverse=True)
