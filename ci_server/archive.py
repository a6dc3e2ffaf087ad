"""Validation of an uploaded project archive: a safe zip of a project root, within limits.

Pure: it works on the bytes in memory and writes nothing. Every refusal is an InvalidArchive
whose message is one line saying what is wrong, e.g.
"invalid archive: entry '../x' escapes the project" or "project is missing requirements.txt".

Header sizes in a zip are claims, not facts: the unpacked size is measured by streaming every
member through a bounded read, so a zip bomb is refused after at most `max_unpacked_bytes` of
inflation, never expanded in full.
"""

from __future__ import annotations

import io
import lzma
import re
import stat
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ci_common.errors import InvalidArchive
from ci_common.settings import Settings, format_size

REQUIRED_DIRS = ("src", "tests")
REQUIRED_FILES = ("requirements.txt",)
READ_CHUNK_BYTES = 64 * 1024
_DRIVE_LETTER = re.compile(r"[A-Za-z]:")
_ZIP_FLAG_ENCRYPTED = 0x1
# What a damaged member can raise while it is decompressed and checked (zipfile surfaces the
# codec's own errors, and EOFError for a member cut short).
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError,
                NotImplementedError, RuntimeError, ValueError)


@dataclass(frozen=True, slots=True)
class ArchiveLimits:
    """How much an upload may unpack to."""

    max_entries: int
    max_unpacked_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ArchiveLimits:
        return cls(max_entries=settings.max_archive_entries,
                   max_unpacked_bytes=settings.max_unpacked_bytes)


@dataclass(frozen=True, slots=True)
class ArchiveSummary:
    """What an accepted archive holds."""

    entries: int
    unpacked_bytes: int  # measured by decompressing, not read from headers


def validate_archive(data: bytes, limits: ArchiveLimits) -> ArchiveSummary:
    """Accept a zip of a project root, or raise InvalidArchive with a one-line reason."""
    if not data:
        raise InvalidArchive("invalid archive: the upload is empty")
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise InvalidArchive("invalid archive: not a zip file (empty, truncated or another format)")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            check_entries(infos, limits.max_entries)
            check_layout(info.filename for info in infos)
            unpacked = measure_unpacked(archive, infos, limits.max_unpacked_bytes)
    except InvalidArchive:
        raise
    except _READ_ERRORS as exc:
        reason = one_line(str(exc)) or type(exc).__name__
        raise InvalidArchive(f"invalid archive: {reason}") from exc
    return ArchiveSummary(entries=len(infos), unpacked_bytes=unpacked)


def check_entries(infos: Sequence[zipfile.ZipInfo], max_entries: int) -> None:
    """Refuse too many entries, unsafe names, links and special files, and duplicates."""
    if len(infos) > max_entries:
        raise InvalidArchive(
            f"invalid archive: {len(infos)} entries, over the limit of {max_entries}")
    seen: set[str] = set()
    for info in infos:
        check_entry_name(info.filename)
        check_entry_type(info)
        key = info.filename.rstrip("/")
        if key in seen:
            raise InvalidArchive(f"invalid archive: duplicate entry {quote(info.filename)}")
        seen.add(key)


def check_entry_name(name: str) -> None:
    """Refuse a name that could land outside the project when unpacked."""
    if not name or "\x00" in name:
        raise InvalidArchive(f"invalid archive: entry {quote(name)} has an invalid name")
    if "\\" in name:
        # Windows tools and some extractors treat a backslash as a separator: "..\\x" escapes.
        raise InvalidArchive(f"invalid archive: entry {quote(name)} contains a backslash")
    if name.startswith("/") or _DRIVE_LETTER.match(name):
        raise InvalidArchive(f"invalid archive: entry {quote(name)} is an absolute path")
    if ".." in name.split("/"):
        raise InvalidArchive(f"invalid archive: entry {quote(name)} escapes the project")


def check_entry_type(info: zipfile.ZipInfo) -> None:
    """Refuse symlinks and special files; zips record Unix file types in external_attr."""
    if info.flag_bits & _ZIP_FLAG_ENCRYPTED:
        raise InvalidArchive(f"invalid archive: entry {quote(info.filename)} is encrypted")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise InvalidArchive(f"invalid archive: entry {quote(info.filename)} is a symbolic link")
    if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise InvalidArchive(
            f"invalid archive: entry {quote(info.filename)} is not a regular file or directory")


def check_layout(names: Iterable[str]) -> None:
    """Require src/ and tests/ directories and requirements.txt at the root of the archive."""
    names = list(names)
    tops = {name.split("/", 1)[0] for name in names}
    dirs = {name.split("/", 1)[0] for name in names if "/" in name}
    files = {name for name in names if "/" not in name}
    missing = [f"{d}/" for d in REQUIRED_DIRS if d not in dirs]
    missing += [f for f in REQUIRED_FILES if f not in files]
    if not missing:
        return
    message = f"project is missing {join_words(missing)}"
    if len(tops) == 1 and dirs == tops:
        # The usual mistake: zipping the folder instead of its contents.
        message += f" (everything is under '{next(iter(tops))}/'; zip the project root itself)"
    raise InvalidArchive(message)


def measure_unpacked(archive: zipfile.ZipFile, infos: Sequence[zipfile.ZipInfo],
                     max_unpacked_bytes: int) -> int:
    """Decompress every member (checking its CRC) and count the bytes; stop past the limit."""
    limit_text = f"invalid archive: unpacks to more than {format_size(max_unpacked_bytes)}"
    # Headers cannot be trusted to be small, but a header that admits to being too big is
    # refused without decompressing anything.
    if sum(info.file_size for info in infos) > max_unpacked_bytes:
        raise InvalidArchive(limit_text)
    total = 0
    for info in infos:
        if info.is_dir():
            continue
        with archive.open(info) as member:
            while chunk := member.read(READ_CHUNK_BYTES):
                total += len(chunk)
                if total > max_unpacked_bytes:
                    raise InvalidArchive(limit_text)
    return total


def join_words(words: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def quote(name: str) -> str:
    """An entry name for a one-line message: repr-quoted, control characters escaped, bounded."""
    text = repr(name)
    return text if len(text) <= 120 else text[:117] + "...'"


def one_line(text: str) -> str:
    return " ".join(text.split())
