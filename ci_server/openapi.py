"""The OpenAPI document the server publishes: FastAPI's, valid for its version, with our limits.

FastAPI describes an `EventSourceResponse` with `itemSchema`, a keyword OpenAPI 3.2 added, inside
a document that says `openapi: 3.1.0`; validators and schema-driven tools (schemathesis) refuse
it. Before 3.2, an event stream's `schema` is read as the schema of each event (3.2 gave that
job to `itemSchema` and `schema` the whole stream), so the item schema moves there.

POST /jobs reads its multipart body by hand (after authentication, counting bytes), so FastAPI
cannot describe it; the body's schema comes from `ci_server.upload`, with this server's
maximum timeout, so a schema-driven client or fuzzer knows what the server accepts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from ci_common.settings import Settings
from ci_server.upload import submission_openapi

ITEM_SCHEMA = "itemSchema"
SUBMIT_PATH, SUBMIT_METHOD = "/jobs", "post"


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
                        media["schema"] = media.pop(ITEM_SCHEMA)
    return fixed


def published_openapi(generated: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """FastAPI's document as this server publishes it."""
    spec = as_openapi_3_1(generated)
    spec["paths"][SUBMIT_PATH][SUBMIT_METHOD]["requestBody"] = submission_openapi(
        settings.max_job_timeout_s)
    return spec


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Make `app` publish (at /openapi.json and /docs) `published_openapi`, built once."""
    generate: Callable[[], dict[str, Any]] = app.openapi
    published: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not published:
            published.update(published_openapi(generate(), settings))
        return published

    app.openapi = openapi  # type: ignore[method-assign]
