"""Request ids: one per request, sent back in `X-Request-ID` and written in every log line about
the request, so a user's "500 … (request id 3f2a…)" leads straight to its traceback.

A sane incoming `X-Request-ID` (set by a proxy, or a client that logs its own) is kept, so one id
follows the request through every hop. Anything else is replaced, never refused: the header is
for tracing, and a bad one is no reason to fail a request.
"""

from __future__ import annotations

import re
import uuid

from starlette.requests import HTTPConnection
from starlette.types import Scope

REQUEST_ID_HEADER = "X-Request-ID"
# Short, and nothing that could forge or break a log line (no spaces, quotes or controls).
_SANE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_STATE_KEY = "request_id"
UNKNOWN = "-"


def choose_request_id(incoming: str | None) -> str:
    """The incoming id when it is sane, else a new random one."""
    if incoming is not None and _SANE_ID.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


def incoming_request_id(scope: Scope) -> str | None:
    """The request's own `X-Request-ID`, if it sent one (the first, if several)."""
    wanted = REQUEST_ID_HEADER.lower().encode()
    for name, value in scope.get("headers", ()):
        if name.lower() == wanted:
            return bytes(value).decode("latin-1")
    return None


def assign_request_id(scope: Scope) -> str:
    """Choose the request's id and keep it in the scope's state for `request_id_of`."""
    request_id = choose_request_id(incoming_request_id(scope))
    scope.setdefault("state", {})[_STATE_KEY] = request_id
    return request_id


def request_id_of(connection: HTTPConnection) -> str:
    """The id `assign_request_id` gave this request ("-" outside the middleware)."""
    return str(getattr(connection.state, _STATE_KEY, UNKNOWN))
