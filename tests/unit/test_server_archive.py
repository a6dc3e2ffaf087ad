"""ci_server.archive: every hostile zip is refused with a one-line reason; a project passes."""

from __future__ import annotations

import io
import stat
import struct
import time
import warnings
import zipfile

import pytest

from ci_common.errors import InvalidArchive
from ci_server.archive import (
    ArchiveLimits,
    check_entry_name,
    check_layout,
    join_words,
    measure_unpacked,
    validate_archive,
)
from tests.unit.test_server_support import project_zip

LIMITS = ArchiveLimits(max_entries=100, max_unpacked_bytes=1024 * 1024)


def refused(data: bytes, limits: ArchiveLimits = LIMITS) -> str:
    with pytest.raises(InvalidArchive) as caught:
        validate_archive(data, limits)
    message = caught.value.message
    assert "\n" not in message
    return message


def zip_with(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for info, content in entries:
                archive.writestr(info, content)
    return buffer.getvalue()


LAYOUT: list[tuple[zipfile.ZipInfo | str, bytes]] = [
    ("requirements.txt", b"pytest\n"), ("src/a.py", b"x = 1\n"), ("tests/test_a.py", b"")]


def test_a_project_is_accepted_and_measured() -> None:
    entries = [*LAYOUT, ("src/pkg/data.bin", b"\0" * 5000)]
    summary = validate_archive(zip_with(entries), LIMITS)
    assert summary.entries == 4
    assert summary.unpacked_bytes == sum(len(content) for _, content in entries)


def test_directory_entries_are_fine() -> None:
    entries = [("src/", b""), ("tests/", b""), *LAYOUT]
    assert validate_archive(zip_with(entries), LIMITS).entries == 5


@pytest.mark.parametrize("data", [b"", b"hello, not a zip", b"PK\x03\x04garbage"])
def test_not_a_zip(data: bytes) -> None:
    assert refused(data).startswith("invalid archive:")


def test_truncated_zip() -> None:
    data = project_zip({"src/big.py": "x = 1\n" * 2000})
    for cut in (len(data) // 2, len(data) - 10):
        assert refused(data[:cut]).startswith("invalid archive:")


def test_corrupt_member_data() -> None:
    data = bytearray(project_zip({"src/big.py": "print('hello')\n" * 500}))
    start = data.index(b"src/big.py") + len("src/big.py")  # first local header's data follows
    data[start + 40:start + 60] = b"\xff" * 20
    assert refused(bytes(data)).startswith("invalid archive:")


@pytest.mark.parametrize(("name", "words"), [
    ("../evil.py", "escapes the project"),
    ("src/../../evil.py", "escapes the project"),
    ("/etc/passwd", "absolute path"),
    ("C:/windows/evil.py", "absolute path"),
    ("..\\evil.py", "backslash"),
    ("src\\..\\..\\evil.py", "backslash"),
])
def test_unsafe_names(name: str, words: str) -> None:
    message = refused(zip_with([*LAYOUT, (name, b"x")]))
    assert words in message
    assert repr(name) in message


def test_message_names_the_entry() -> None:
    assert refused(zip_with([*LAYOUT, ("../x", b"")])) == \
        "invalid archive: entry '../x' escapes the project"


def test_symlink_entry_is_refused() -> None:
    link = zipfile.ZipInfo("src/link")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    assert "symbolic link" in refused(zip_with([*LAYOUT, (link, b"/etc/passwd")]))


def test_device_entry_is_refused() -> None:
    device = zipfile.ZipInfo("src/dev")
    device.external_attr = (stat.S_IFCHR | 0o600) << 16
    assert "not a regular file" in refused(zip_with([*LAYOUT, (device, b"")]))


def test_regular_unix_modes_are_fine() -> None:
    script = zipfile.ZipInfo("src/run.sh")
    script.external_attr = (stat.S_IFREG | 0o755) << 16
    assert validate_archive(zip_with([*LAYOUT, (script, b"#!/bin/sh\n")]), LIMITS).entries == 4


def test_duplicate_names_are_refused() -> None:
    assert "duplicate entry 'src/a.py'" in refused(zip_with([*LAYOUT, ("src/a.py", b"y = 2\n")]))


def test_too_many_entries() -> None:
    entries = [*LAYOUT, *[(f"src/m{i}.py", b"") for i in range(10)]]
    message = refused(zip_with(entries), ArchiveLimits(max_entries=12, max_unpacked_bytes=10**6))
    assert message == "invalid archive: 13 entries, over the limit of 12"


def test_zip_bomb_is_refused_quickly() -> None:
    zeros = zip_with([*LAYOUT, ("src/zeros.bin", b"\0" * (20 * 1024 * 1024))])
    assert len(zeros) < 100_000  # deflate squeezes 20 MB of zeros to ~20 KB
    started = time.monotonic()
    message = refused(zeros, ArchiveLimits(max_entries=100, max_unpacked_bytes=1024 * 1024))
    assert message == "invalid archive: unpacks to more than 1.0 MB"
    assert time.monotonic() - started < 1.0


def _lie_about_sizes(data: bytes, name: bytes, claimed: int) -> bytes:
    """Rewrite the local and central headers of `name` to claim `claimed` unpacked bytes."""
    out = bytearray(data)
    local = 0
    while True:
        local = out.index(b"PK\x03\x04", local)
        name_len = struct.unpack_from("<H", out, local + 26)[0]
        if out[local + 30:local + 30 + name_len] == name:
            struct.pack_into("<I", out, local + 22, claimed)
            break
        local += 4
    central = out.index(b"PK\x01\x02")
    while True:
        central = out.index(b"PK\x01\x02", central)
        name_len = struct.unpack_from("<H", out, central + 28)[0]
        if out[central + 46:central + 46 + name_len] == name:
            struct.pack_into("<I", out, central + 24, claimed)
            return bytes(out)
        central += 4


def test_bomb_with_lying_headers_is_refused_without_inflating_it() -> None:
    honest = zip_with([*LAYOUT, ("src/zeros.bin", b"\0" * (50 * 1024 * 1024))])
    lying = _lie_about_sizes(honest, b"src/zeros.bin", 1000)
    assert zipfile.ZipFile(io.BytesIO(lying)).getinfo("src/zeros.bin").file_size == 1000
    started = time.monotonic()
    assert refused(lying).startswith("invalid archive:")
    assert time.monotonic() - started < 1.0  # inflating 50 MB would take longer


def test_measure_unpacked_counts_real_bytes_and_stops_at_the_limit() -> None:
    data = zip_with([("a.bin", b"\1" * 300_000), ("b.bin", b"\2" * 300_000)])
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert measure_unpacked(archive, archive.infolist(), 600_000) == 600_000
        with pytest.raises(InvalidArchive, match="unpacks to more than"):
            measure_unpacked(archive, archive.infolist(), 599_999)


def test_encrypted_entries_are_refused() -> None:
    data = bytearray(zip_with(LAYOUT))
    central = data.index(b"PK\x01\x02")
    flags = struct.unpack_from("<H", data, central + 8)[0]
    struct.pack_into("<H", data, central + 8, flags | 0x1)
    assert "encrypted" in refused(bytes(data))


@pytest.mark.parametrize(("names", "missing"), [
    (["src/a.py", "tests/t.py"], "project is missing requirements.txt"),
    (["requirements.txt", "tests/t.py"], "project is missing src/"),
    (["requirements.txt", "src/a.py"], "project is missing tests/"),
    ([], "project is missing src/, tests/ and requirements.txt"),
    (["src", "tests", "requirements.txt/x"],
     "project is missing src/, tests/ and requirements.txt"),
])
def test_layout(names: list[str], missing: str) -> None:
    with pytest.raises(InvalidArchive) as caught:
        check_layout(names)
    assert caught.value.message == missing


def test_layout_hints_at_a_zipped_parent_folder() -> None:
    message = refused(zip_with([("proj/requirements.txt", b""), ("proj/src/a.py", b""),
                                ("proj/tests/t.py", b"")]))
    assert message.startswith("project is missing src/, tests/ and requirements.txt")
    assert "'proj/'" in message


def test_empty_zip_lacks_the_layout() -> None:
    assert refused(zip_with([])) == "project is missing src/, tests/ and requirements.txt"


def test_check_entry_name_accepts_ordinary_names() -> None:
    for name in ("src/a.py", "tests/", "src/..hidden/x.py", "src/a..b.py", "requirements.txt"):
        check_entry_name(name)


def test_nul_in_name_is_refused() -> None:
    with pytest.raises(InvalidArchive, match="invalid name"):
        check_entry_name("src/a\x00.py")


def test_join_words() -> None:
    assert [join_words(w) for w in ([], ["a"], ["a", "b"], ["a", "b", "c"])] == \
        ["", "a", "a and b", "a, b and c"]


def test_crc_is_checked() -> None:
    data = bytearray(zip_with(LAYOUT))
    central = data.index(b"PK\x01\x02")
    crc = struct.unpack_from("<I", data, central + 16)[0]
    struct.pack_into("<I", data, central + 16, crc ^ 0xFFFF)
    assert refused(bytes(data)).startswith("invalid archive:")
