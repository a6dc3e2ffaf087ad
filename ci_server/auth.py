"""Bearer-key authentication: the `current_user` dependency every protected route uses.

401 answers carry `WWW-Authenticate: Bearer` and one line saying which of "missing",
"malformed", "invalid", "revoked" or "deactivated" applies. An address that presented too many
bad keys in the last minute gets 429 with Retry-After before any database work. Keys and their
hashes are never logged.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ci_common.errors import AuthenticationError
from ci_common.keys import choose_key, display_prefix, should_touch
from ci_common.models import User, utcnow
from ci_common.repository import Repository
from ci_server.errors import AddressRateLimited
from ci_server.state import get_repository, get_state

# auto_error=False: a missing header must get our one-line detail, not FastAPI's.
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",  # a component name: letters, digits, ".", "_", "-" only
    description="An API key from `ci-admin key create`, sent as `Authorization: Bearer ci_…`.",
)

MISSING_KEY = "missing API key (send 'Authorization: Bearer ci_…')"
NOT_BEARER = "malformed API key (expected 'Authorization: Bearer ci_…')"
UNKNOWN_ADDRESS = "unknown"


def presented_key(authorization: str | None,
                  credentials: HTTPAuthorizationCredentials | None) -> str:
    """The key in the request, or AuthenticationError saying why there is none."""
    if credentials is not None:
        return credentials.credentials
    if authorization is None or not authorization.strip():
        raise AuthenticationError(MISSING_KEY)
    raise AuthenticationError(NOT_BEARER)


def authenticate(repository: Repository, key: str, now: datetime) -> User:
    """The active owner of an active key, or AuthenticationError; records the use when due."""
    stored = choose_key(key, repository.find_keys_by_prefix(display_prefix(key)))
    if should_touch(stored.key.last_used_at, now):
        repository.touch_api_key(stored.key.id, now)
    return stored.user


def client_address(request: Request) -> str:
    return request.client.host if request.client else UNKNOWN_ADDRESS


def current_user(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> User:
    """The authenticated caller (sync: FastAPI runs it in the threadpool, off the event loop)."""
    state = get_state(request)
    address = client_address(request)
    authorization = request.headers.get("authorization")
    if authorization is not None:
        wait_s = state.limiter.retry_after(address)
        if wait_s is not None:
            raise AddressRateLimited(wait_s)
    try:
        key = presented_key(authorization, credentials)
        return authenticate(get_repository(request), key, utcnow())
    except AuthenticationError:
        state.metrics.auth_failures.inc()
        # A request without any key is not a guess; only presented keys count as failures.
        if authorization is not None:
            state.limiter.record_failure(address)
        raise


CurrentUser = Annotated[User, Depends(current_user)]
