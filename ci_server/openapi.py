"""The OpenAPI document the server publishes: FastAPI's, made valid for the version it declares.

FastAPI describes an `EventSourceResponse` with `itemSchema`, a keyword OpenAPI 3.2 added, inside
a document that says `openapi: 3.1.0`; validators and schema-driven tools (schemathesis) refuse
it. In 3.1 a media type has only `schema`, so the stream is described as what it is on the wire,
a string of text, and the schema of one event moves to the `x-itemSchema` extension, where a
reader that knows 3.2 still finds it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

ITEM_SCHEMA = "itemSchema"
ITEM_SCHEMA_EXTENSION = "x-itemSchema"
EVENT_STREAM = "text/event-stream"
STREAM_SCHEMA: dict[str, Any] = {
    "type": "string",
    "description": "Server-Sent Events; the `x-itemSchema` extension describes one event",
}


def as_openapi_3_1(spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of `spec` with every 3.2-only `itemSchema` turned into its 3.1 equivalent."""
    fixed = copy.deepcopy(spec)
    for path_item in fixed.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            for response in operation.get("responses", {}).values():
                for media in response.get("content", {}).values():
                    if ITEM_SCHEMA in media:
                        media[ITEM_SCHEMA_EXTENSION] = media.pop(ITEM_SCHEMA)
                        media.setdefault("schema", dict(STREAM_SCHEMA))
    return fixed


def install_openapi(app: FastAPI) -> None:
    """Make `app` publish (at /openapi.json and /docs) the fixed document, built once."""
    generate: Callable[[], dict[str, Any]] = app.openapi
    published: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not published:
            published.update(as_openapi_3_1(generate()))
        return published

    app.openapi = openapi  # type: ignore[method-assign]
