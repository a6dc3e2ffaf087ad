"""Hypothesis strategies for job submissions, each with the answer the server owes it.

An `Upload` is an archive (and maybe a `timeout` field) plus what must come back: 201 for a
valid project within the limits of tests/api/conftest.py, else one status and the start of the
one-line detail. `damaged()` uploads are owed only "201 or a one-line 4xx": flipping bytes of a
zip can hit a file's data (refused: bad CRC) or its name (still valid). No tests here.
"""

from __future__ import annotations

import io
import random
import stat
import string
import struct
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import strategies as st

# The live server's limits (tests/api/conftest.py SERVER_ENV).
MAX_UPLOAD_BYTES = 64 * 1024
MAX_UNPACKED_BYTES = 256 * 1024
MAX_ENTRIES = 40
MAX_TIMEOUT_S = 3600.0

FIXED_TIME = (2024, 1, 1, 0, 0, 0)  # entries' timestamps: the same bytes every run
ENCRYPTED_FLAG = 0x1
LOCAL_FLAGS_AT, CENTRAL_FLAGS_AT, CENTRAL_HEADER_BYTES = 6, 8, 46  # offsets in zip headers
NAME = st.text(alphabet=string.ascii_lowercase + string.digits + "_", min_size=1, max_size=10)
COMPRESSION = st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                               zipfile.ZIP_LZMA])


@dataclass(frozen=True)
class Entry:
    name: str
    data: bytes = b""
    mode: int = stat.S_IFREG | 0o644  # Unix file type and permissions, as zips record them
    encrypted: bool = False


@dataclass(frozen=True)
class Upload:
    """What to send, and what the server owes it."""

    kind: str
    archive: bytes
    timeout: str | None
    status: frozenset[int]
    detail_starts: str = ""  # for a refusal: how its one-line detail begins


def build_zip(entries: list[Entry], compression: int) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": made on purpose
        with zipfile.ZipFile(buffer, "w", compression) as archive:
            for entry in entries:
                info = zipfile.ZipInfo(entry.name, FIXED_TIME)
                info.compress_type = compression
                info.external_attr = entry.mode << 16
                archive.writestr(info, entry.data)
    data = buffer.getvalue()
    for index, entry in enumerate(entries):
        if entry.encrypted:
            data = flag_encrypted(data, index)
    return data


def flag_encrypted(data: bytes, index: int) -> bytes:
    """Set the 'encrypted' bit of entry `index` (zipfile writes no encrypted entries itself)."""
    patched = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.infolist()[index]
        central = archive.start_dir
    patched[info.header_offset + LOCAL_FLAGS_AT] |= ENCRYPTED_FLAG
    for _ in range(index):  # walk the central directory to the entry's own record
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", patched, central + 28)
        central += CENTRAL_HEADER_BYTES + name_len + extra_len + comment_len
    patched[central + CENTRAL_FLAGS_AT] |= ENCRYPTED_FLAG
    return bytes(patched)


@st.composite
def projects(draw: st.DrawFn) -> list[Entry]:
    """The entries of a valid project: the layout, a module, a test, a few more files."""
    module = draw(NAME)
    entries = [Entry("requirements.txt", draw(st.sampled_from([b"", b"pytest\n"]))),
               Entry(f"src/{module}.py", draw(st.binary(max_size=2000))),
               Entry(f"tests/test_{module}.py", draw(st.binary(max_size=2000)))]
    # Extra files end in .txt and directories have no dot, so no file shadows a directory.
    extra = draw(st.lists(st.tuples(st.sampled_from(["src", "tests"]), NAME, NAME,
                                    st.binary(max_size=1000)),
                          max_size=8, unique_by=lambda t: (t[0], t[1], t[2])))
    entries += [Entry(f"{top}/{folder}/{name}.txt", data) for top, folder, name, data in extra]
    if draw(st.booleans()):
        entries.append(Entry("src/", mode=stat.S_IFDIR | 0o755))
    return entries


# No NUL: zipfile cuts a name at it, both writing and reading, so "src/a\0b" is just "src/a".
HOSTILE_NAMES = st.one_of(
    st.sampled_from(["../evil.py", "src/../../evil.py", "/etc/passwd", "C:/evil.py", "c:evil",
                     "src\\..\\..\\evil.py", "tests/.."]),
    NAME.map(lambda n: f"../{n}"),
    NAME.map(lambda n: f"/{n}"),
)


@st.composite
def hostile_entries(draw: st.DrawFn, project: list[Entry]) -> Entry:
    """One entry no project may hold: an escaping name, a link, a device, a duplicate, …"""
    kind = draw(st.sampled_from(["name", "symlink", "special", "duplicate", "encrypted"]))
    if kind == "name":
        return Entry(draw(HOSTILE_NAMES), b"x")
    if kind == "symlink":
        return Entry(f"src/{draw(NAME)}", b"/etc/passwd", mode=stat.S_IFLNK | 0o777)
    if kind == "special":
        mode = draw(st.sampled_from([stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK]))
        return Entry(f"src/{draw(NAME)}", b"", mode=mode | 0o644)
    if kind == "duplicate":
        return Entry(draw(st.sampled_from(project)).name, b"again")
    return Entry(f"src/{draw(NAME)}.py", b"x", encrypted=True)


def random_bytes(seed: int, size: int) -> bytes:
    """Incompressible bytes from a drawn seed (drawing them all would overrun Hypothesis)."""
    return random.Random(seed).randbytes(size)


@st.composite
def valid(draw: st.DrawFn) -> Upload:
    archive = build_zip(draw(projects()), draw(COMPRESSION))
    timeout = draw(st.one_of(st.none(), st.floats(min_value=0.001, max_value=MAX_TIMEOUT_S)
                             .map(repr), st.integers(1, int(MAX_TIMEOUT_S)).map(str)))
    return Upload("valid", archive, timeout, frozenset({201}))


@st.composite
def bad_timeout(draw: st.DrawFn) -> Upload:
    archive = build_zip(draw(projects()), zipfile.ZIP_DEFLATED)
    timeout = draw(st.one_of(
        st.floats(max_value=0).map(repr), st.floats(min_value=MAX_TIMEOUT_S, exclude_min=True)
        .map(repr), st.sampled_from(["nan", "inf", "-inf", "1e300", "soon", "0x10"])))
    return Upload("bad timeout", archive, timeout, frozenset({400}), "timeout must be")


@st.composite
def truncated(draw: st.DrawFn) -> Upload:
    archive = build_zip(draw(projects()), draw(COMPRESSION))
    cut = draw(st.integers(0, len(archive) - 1))
    return Upload("truncated", archive[:cut], None, frozenset({400}), "invalid archive:")


@st.composite
def hostile(draw: st.DrawFn) -> Upload:
    project = draw(projects())
    entries = list(project)
    bad = draw(hostile_entries(project))
    entries.insert(draw(st.integers(0, len(entries))), bad)
    archive = build_zip(entries, zipfile.ZIP_DEFLATED)
    kind = f"hostile entry {bad.name!r}, mode {bad.mode:o}, encrypted {bad.encrypted}"
    return Upload(kind, archive, None, frozenset({400}), "invalid archive:")


@st.composite
def oversized(draw: st.DrawFn) -> Upload:
    project = draw(projects())
    kind = draw(st.sampled_from(["upload", "unpacked", "entries"]))
    if kind == "upload":  # incompressible, so the zip itself is over the upload limit
        size = draw(st.integers(MAX_UPLOAD_BYTES + 1, 2 * MAX_UPLOAD_BYTES))
        noise = Entry("src/noise.bin", random_bytes(draw(st.integers(0, 2**32)), size))
        archive = build_zip([*project, noise], zipfile.ZIP_STORED)
        return Upload("over the upload limit", archive, None, frozenset({413}), "archive is")
    if kind == "unpacked":  # zeros deflate to almost nothing: a small zip bomb
        size = draw(st.integers(MAX_UNPACKED_BYTES + 1, 4 * MAX_UNPACKED_BYTES))
        archive = build_zip([*project, Entry("src/zeros.bin", bytes(size))],
                            zipfile.ZIP_DEFLATED)
        return Upload("unpacks too big", archive, None, frozenset({400}),
                      "invalid archive: unpacks to more than")
    count = draw(st.integers(MAX_ENTRIES + 1, 2 * MAX_ENTRIES))
    many = [Entry(f"src/m{i}.py", b"") for i in range(count)]
    archive = build_zip([*project, *many], zipfile.ZIP_STORED)
    return Upload("too many entries", archive, None, frozenset({400}), "invalid archive:")


@st.composite
def damaged(draw: st.DrawFn) -> Upload:
    archive = bytearray(build_zip(draw(projects()), draw(COMPRESSION)))
    for position in draw(st.lists(st.integers(0, len(archive) - 1), min_size=1, max_size=4)):
        archive[position] ^= draw(st.integers(1, 255))
    return Upload("damaged", bytes(archive), None, frozenset({201, 400}))


def not_a_zip() -> st.SearchStrategy[Upload]:
    return st.binary(max_size=2000).map(
        lambda data: Upload("not a zip", data, None, frozenset({400}), "invalid archive:"))


# Each kind is fuzzed on its own, so none is starved of examples.
KINDS: dict[str, Callable[[], st.SearchStrategy[Upload]]] = {
    "valid": valid, "bad timeout": bad_timeout, "truncated": truncated, "hostile": hostile,
    "oversized": oversized, "damaged": damaged, "not a zip": not_a_zip,
}
