"""The client's reading of the wire format: plain dataclasses and a small strict decoder.

The server describes its answers with pydantic models (`ci_common.wire`); importing and
building those costs `ci` more than its whole start-up budget (issue #10), and the client
reads only a few of them. So it decodes them here, field for field, and
tests/unit/test_client_wire_contract.py proves that both agree: same fields in the same order,
the same values, and the same JSON when the client prints a job (`ci list --json`,
`ci show --json` print what pydantic's `model_dump(mode="json")` would).

A decoder raises ValueError naming the first field that is missing or of the wrong type; the
caller turns it into one ServerError line. Fields the client does not know are ignored, so an
older client keeps working against a newer server.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import datetime
from typing import Any, TypeVar

from ci_common.statuses import JobStatus, OutputStream

SSE_EVENT_STATUS = "status"  # the event names of ci_common.wire, checked by the contract test
SSE_EVENT_OUTPUT = "output"
SSE_EVENT_END = "end"
SSE_EVENT_QUEUE = "queue"

E = TypeVar("E", bound=enum.Enum)


@dataclass(frozen=True, slots=True)
class SlowTestData:
    """One of the slowest tests of a run."""

    test: str
    duration_s: float

    @classmethod
    def from_json(cls, data: object) -> SlowTestData:
        obj = _object(data, "slowest test")
        return cls(test=_str(obj, "test"), duration_s=_float(obj, "duration_s"))


@dataclass(frozen=True, slots=True)
class ReportData:
    """pytest's summary of a run."""

    passed: int
    failed: int
    errors: int
    skipped: int
    duration_s: float
    failing: tuple[str, ...] = ()
    slowest: tuple[SlowTestData, ...] = ()

    @classmethod
    def from_json(cls, data: object) -> ReportData:
        obj = _object(data, "report")
        return cls(passed=_int(obj, "passed"), failed=_int(obj, "failed"),
                   errors=_int(obj, "errors"), skipped=_int(obj, "skipped"),
                   duration_s=_float(obj, "duration_s"),
                   failing=tuple(_str_item(item, "failing") for item in
                                 _list(obj, "failing")),
                   slowest=tuple(SlowTestData.from_json(item) for item in
                                 _list(obj, "slowest")))


@dataclass(frozen=True, slots=True)
class JobView:
    """A job as users see it."""

    id: str
    status: JobStatus
    success: bool | None
    exit_code: int | None
    reason: str | None
    created_at: datetime
    start_time: datetime | None
    end_time: datetime | None
    report: ReportData | None = None
    pruned_at: datetime | None = None
    pytest_args: list[str] = field(default_factory=list)
    python_version: str | None = None

    @classmethod
    def from_json(cls, data: object) -> JobView:
        obj = _object(data, "job")
        report = obj.get("report")
        return cls(id=_str(obj, "id"), status=_enum(obj, "status", JobStatus),
                   success=_optional(obj, "success", bool),
                   exit_code=_optional_int(obj, "exit_code"),
                   reason=_optional(obj, "reason", str), created_at=_datetime(obj, "created_at"),
                   start_time=_optional_datetime(obj, "start_time", required=True),
                   end_time=_optional_datetime(obj, "end_time", required=True),
                   report=None if report is None else ReportData.from_json(report),
                   pruned_at=_optional_datetime(obj, "pruned_at"),
                   pytest_args=[_str_item(item, "pytest_args")
                                for item in _list(obj, "pytest_args")],
                   python_version=_optional(obj, "python_version", str, required=False))


@dataclass(frozen=True, slots=True)
class JobList:
    """One page of the caller's jobs, newest first."""

    jobs: list[JobView]
    total: int
    limit: int
    offset: int

    @classmethod
    def from_json(cls, data: object) -> JobList:
        obj = _object(data, "job list")
        return cls(jobs=[JobView.from_json(item) for item in _list(obj, "jobs", required=True)],
                   total=_int(obj, "total"), limit=_int(obj, "limit"), offset=_int(obj, "offset"))


@dataclass(frozen=True, slots=True)
class JobCreated:
    """Answer to POST /jobs."""

    id: str
    status: JobStatus = JobStatus.QUEUED

    @classmethod
    def from_json(cls, data: object) -> JobCreated:
        obj = _object(data, "created job")
        status = _enum(obj, "status", JobStatus) if "status" in obj else JobStatus.QUEUED
        return cls(id=_str(obj, "id"), status=status)


@dataclass(frozen=True, slots=True)
class StatusData:
    """The body of a `status` event."""

    status: JobStatus

    @classmethod
    def from_json(cls, data: object) -> StatusData:
        return cls(status=_enum(_object(data, "status event"), "status", JobStatus))


@dataclass(frozen=True, slots=True)
class OutputData:
    """The body of an `output` event."""

    stream: OutputStream
    text: str

    @classmethod
    def from_json(cls, data: object) -> OutputData:
        obj = _object(data, "output event")
        return cls(stream=_enum(obj, "stream", OutputStream), text=_str(obj, "text"))


@dataclass(frozen=True, slots=True)
class EndData:
    """The terminal event: how the job ended."""

    status: JobStatus
    exit_code: int | None
    success: bool
    reason: str | None = None
    report: ReportData | None = None

    @classmethod
    def from_json(cls, data: object) -> EndData:
        obj = _object(data, "end event")
        report = obj.get("report")
        return cls(status=_enum(obj, "status", JobStatus),
                   exit_code=_optional_int(obj, "exit_code"), success=_bool(obj, "success"),
                   reason=_optional(obj, "reason", str, required=False),
                   report=None if report is None else ReportData.from_json(report))


@dataclass(frozen=True, slots=True)
class QueueData:
    """The body of a `queue` event: where a waiting job stands (None once it is claimed)."""

    ahead: int | None

    @classmethod
    def from_json(cls, data: object) -> QueueData:
        return cls(ahead=_optional_int(_object(data, "queue event"), "ahead"))


def to_json(value: Any) -> Any:
    """A decoded answer as JSON values, exactly as pydantic's `model_dump(mode="json")`."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        text = value.isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text  # pydantic writes UTC as Z
    return value


def dumps(value: Any) -> str:
    """`to_json` as indented text: the JSON of pydantic's `model_dump_json(indent=2)`."""
    return json.dumps(to_json(value), indent=2, ensure_ascii=False)


# ----------------------------------------------------------------- field readers
_MISSING = object()


def _object(data: object, what: str) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{what}: expected an object, got {type(data).__name__}")
    return data


def _get(obj: Mapping[str, Any], name: str) -> Any:
    value = obj.get(name, _MISSING)
    if value is _MISSING:
        raise ValueError(f"{name}: missing")
    return value


def _str(obj: Mapping[str, Any], name: str) -> str:
    value = _get(obj, name)
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a string")
    return value


def _str_item(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected strings")
    return value


def _bool(obj: Mapping[str, Any], name: str) -> bool:
    value = _get(obj, name)
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected true or false")
    return value


def _int(obj: Mapping[str, Any], name: str) -> int:
    value = _get(obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an integer")
    return value


def _float(obj: Mapping[str, Any], name: str) -> float:
    value = _get(obj, name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: expected a number")
    return float(value)


def _optional_int(obj: Mapping[str, Any], name: str) -> int | None:
    return None if _get(obj, name) is None else _int(obj, name)


def _optional(obj: Mapping[str, Any], name: str, kind: type[Any], *,
              required: bool = True) -> Any:
    value = _get(obj, name) if required else obj.get(name)
    if value is not None and (not isinstance(value, kind)
                              or (kind is not bool and isinstance(value, bool))):
        raise ValueError(f"{name}: expected {kind.__name__} or null")
    return value


def _enum(obj: Mapping[str, Any], name: str, kind: type[E]) -> E:
    value = _get(obj, name)
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name}: unknown value {value!r}") from None


def _list(obj: Mapping[str, Any], name: str, *, required: bool = False) -> list[Any]:
    value = _get(obj, name) if required else obj.get(name, [])
    if not isinstance(value, list):
        raise ValueError(f"{name}: expected a list")
    return value


def _datetime(obj: Mapping[str, Any], name: str) -> datetime:
    value = _str(obj, name)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name}: not an ISO 8601 time: {value!r}") from None
    return parsed


def _optional_datetime(obj: Mapping[str, Any], name: str, *,
                       required: bool = False) -> datetime | None:
    value = _get(obj, name) if required else obj.get(name)
    return None if value is None else _datetime(obj, name)
