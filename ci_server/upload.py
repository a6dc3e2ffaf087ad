"""Reading a job submission within the size limit (multipart: `archive` file, optional
`timeout`, `pytest_args` (a JSON list of strings) and `python` fields).

The limit is enforced twice: a declared Content-Length over it is refused before any byte is
read, and the body is counted while it streams in, because the header may be absent or lie.
Routes call this after authentication, so an anonymous client cannot make the server buffer
a large body.
"""

from __future__ import annotations

import math
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import Message, Receive

from ci_common.errors import InvalidInput, TooLarge
from ci_common.pytest_args import MAX_ARGS, check_pytest_args, pytest_args_from_json
from ci_common.settings import Settings, format_size

ARCHIVE_FIELD = "archive"
TIMEOUT_FIELD = "timeout"
NO_CACHE_FIELD = "no_cache"  # "true": install afresh, ignoring a cached environment
PYTEST_ARGS_FIELD = "pytest_args"
PYTHON_FIELD = "python"
# Room for the multipart boundaries, part headers and the small fields around the archive.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
MAX_FORM_FIELDS = 8
# The pytest arguments' JSON is the largest field: 4,096 characters, escaped up to 6 bytes each.
MAX_FIELD_BYTES = 32 * 1024
MAX_TIMEOUT_VARIABLE = Settings.env_names()["max_job_timeout_s"]


def submission_openapi(max_timeout_s: float) -> dict[str, Any]:
    """What the spec says of POST /jobs's body (parsed by hand, after authentication)."""
    return {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": [ARCHIVE_FIELD],
            "properties": {
                ARCHIVE_FIELD: {"type": "string", "format": "binary",
                                "description": "zip of the project root: src/, tests/, "
                                               "requirements.txt"},
                TIMEOUT_FIELD: {"type": "number", "exclusiveMinimum": 0,
                                "maximum": max_timeout_s,
                                "description": "seconds the job may run (default: the "
                                               "server's CI_JOB_TIMEOUT; at most its "
                                               f"{MAX_TIMEOUT_VARIABLE})"},
                PYTEST_ARGS_FIELD: {"type": "string",
                                    "description": "JSON list of strings given to pytest as "
                                                   f"arguments (at most {MAX_ARGS}; options "
                                                   "that defeat the report are refused)"},
                PYTHON_FIELD: {"type": "string",
                               "description": "Python version to run on (GET /info lists "
                                              "them; default: the server's first)"},
                NO_CACHE_FIELD: {"type": "boolean", "default": False,
                                 "description": "install the requirements afresh instead of "
                                                "starting from a cached environment"},
            },
        }}},
    }


@dataclass(frozen=True, slots=True)
class Submission:
    """A parsed upload: the archive's bytes and the requested timeout, if any."""

    archive: bytes
    timeout_seconds: float | None
    pytest_args: tuple[str, ...] = ()
    python_version: str | None = None  # resolved: the requested one or the default
    no_cache: bool = False


def too_large_message(size: int, limit: int) -> str:
    shown, limit_shown = format_size(size), format_size(limit)
    if shown == limit_shown:
        # "archive is 1.0 MB, over the 1.0 MB limit" would read as a contradiction.
        shown, limit_shown = f"{size} bytes", f"{limit}-byte"
    return f"archive is {shown}, over the {limit_shown} limit"


def check_declared_length(content_length: str | None, limit: int) -> None:
    """Refuse up front when Content-Length already says the body is over the limit."""
    if content_length is None:
        return
    try:
        declared = int(content_length)
    except ValueError:
        raise InvalidInput("Content-Length is not a number") from None
    if declared > limit + MULTIPART_OVERHEAD_BYTES:
        raise TooLarge(too_large_message(declared, limit))


class CountingReceive:
    """Wraps an ASGI receive and raises TooLarge once the body grows past the budget."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self.received = 0

    async def __call__(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self._limit + MULTIPART_OVERHEAD_BYTES:
                raise TooLarge(f"archive is over the {format_size(self._limit)} limit")
        return message


def parse_timeout(raw: str | None, max_timeout_s: float) -> float | None:
    """The optional `timeout` form field: a positive number of seconds, at most the maximum."""
    if raw is None or not raw.strip():
        return None
    shown = raw.strip()[:40]
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise InvalidInput(f"timeout must be a positive number of seconds, not {shown!r}")
    if value > max_timeout_s:
        raise InvalidInput(f"timeout must be at most {max_timeout_s:g} seconds (the server's "
                           f"{MAX_TIMEOUT_VARIABLE}), not {shown!r}")
    return value


async def parse_form(request: Request, max_body_bytes: int) -> FormData:
    """The submitted form, its file part held in memory: an upload never touches the disk.

    Starlette spools a file part over 1 MB to a temporary file (unnamed, so invisible in
    TMPDIR); the body is bounded by CountingReceive anyway and read into memory right after.
    """
    content_type, _ = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        # Other encodings carry no file part, so Starlette's own parsing spools nothing.
        return await request.form(max_files=1, max_fields=MAX_FORM_FIELDS,
                                  max_part_size=MAX_FIELD_BYTES)
    async with aclosing(request.stream()) as stream:
        parser = MultiPartParser(request.headers, stream, max_files=1,
                                 max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES)
        parser.spool_max_size = max_body_bytes
        try:
            return await parser.parse()
        except MultiPartException as exc:
            raise InvalidInput(exc.message) from None


def parse_flag(name: str, raw: object) -> bool:
    """An optional boolean form field: `true`/`false` (also 1/0, yes/no); absent is false."""
    if raw is None:
        return False
    if not isinstance(raw, str):
        raise InvalidInput(f"'{name}' must be a form field, not a file")
    value = raw.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", ""):
        return False
    raise InvalidInput(f"'{name}' must be true or false, not {raw.strip()[:40]!r}")


async def read_submission(request: Request, settings: Settings) -> Submission:
    """Parse the multipart body, counting bytes as they arrive; raise TooLarge or InvalidInput."""
    max_upload_bytes = settings.max_upload_bytes
    check_declared_length(request.headers.get("content-length"), max_upload_bytes)
    counted = Request(request.scope, CountingReceive(request.receive, max_upload_bytes))
    form = await parse_form(counted, max_upload_bytes + MULTIPART_OVERHEAD_BYTES)
    try:
        upload = form.get(ARCHIVE_FIELD)
        if not isinstance(upload, UploadFile):
            raise InvalidInput(f"missing file field '{ARCHIVE_FIELD}' (a zip of the project)")
        archive = await upload.read()
        timeout = form.get(TIMEOUT_FIELD)
        if timeout is not None and not isinstance(timeout, str):
            raise InvalidInput(f"'{TIMEOUT_FIELD}' must be a form field, not a file")
        timeout_seconds = parse_timeout(timeout, settings.max_job_timeout_s)
        pytest_args = check_pytest_args(pytest_args_from_json(
            _text_field(form.get(PYTEST_ARGS_FIELD), PYTEST_ARGS_FIELD)))
        python_version = settings.python_images().resolve(
            _text_field(form.get(PYTHON_FIELD), PYTHON_FIELD))
        no_cache = parse_flag(NO_CACHE_FIELD, form.get(NO_CACHE_FIELD))
    finally:
        await form.close()
    if len(archive) > max_upload_bytes:
        raise TooLarge(too_large_message(len(archive), max_upload_bytes))
    return Submission(archive=archive, timeout_seconds=timeout_seconds,
                      pytest_args=pytest_args, python_version=python_version, no_cache=no_cache)


def _text_field(value: object, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InvalidInput(f"'{name}' must be a form field, not a file")
    return value
