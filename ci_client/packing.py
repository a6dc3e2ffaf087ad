"""Packing a project directory into the zip that `ci submit` uploads.

What goes in: every regular file under the project root except
- what the project's `.gitignore` files exclude (the root one and nested ones, git semantics:
  a deeper file's patterns win, and nothing inside an excluded directory can be re-included);
- what never belongs in a test run: `.git`, virtualenvs (`.venv`, `venv`, `env`, or any directory
  holding a `pyvenv.cfg`), caches (`__pycache__`, `*.pyc`, `.pytest_cache`, `.mypy_cache`,
  `.ruff_cache`), tool state (`.tox`, `.nox`), build output (`build`, `dist`, `*.egg-info`) and
  `node_modules`.

Symbolic links: a link to a regular file inside the project is stored as a regular file holding
the target's content (projects link shared fixtures; the server refuses zip symlink entries). A
link to a directory is skipped (it could loop, and what it points to inside the project is
packed anyway), and a link that leaves the project, or dangles, is skipped without ever being
read: packing must never upload e.g. `~/.ssh` because of a stray link. Sockets, FIFOs and
devices are skipped too (reading a FIFO would block).

The archive starts with directory entries for src/ and tests/ (so they exist even when empty),
then the files. It is deterministic: entries sorted by path, fixed timestamps and permissions,
so the same tree always packs to the same bytes.
"""

from __future__ import annotations

import io
import os
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ci_common.errors import ProjectLayoutError, TooLarge
from ci_common.sizes import DEFAULT_MAX_UPLOAD_BYTES, format_size

if TYPE_CHECKING:
    import pathspec

REQUIRED_LAYOUT = ("src/", "tests/", "requirements.txt")
# Stored as directory entries too, so a project whose tests/ holds no file yet still unpacks to
# the layout the server checks for.
REQUIRED_DIRS = ("src/", "tests/")

EXCLUDED_DIR_NAMES = frozenset({
    ".git", ".hg", ".svn", ".venv", "venv", "env", "__pycache__", ".pytest_cache",
    ".mypy_cache", ".ruff_cache", ".tox", ".nox", "build", "dist", "node_modules",
})
EXCLUDED_DIR_SUFFIXES = (".egg-info",)
EXCLUDED_FILE_SUFFIXES = (".pyc", ".pyo")
VENV_MARKER = "pyvenv.cfg"

# 1980-01-01 is the earliest time a zip header can hold; any fixed value makes builds repeatable.
_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_FILE_MODE = 0o644
_EXEC_MODE = 0o755
_COPY_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class PackedProject:
    """A packed project: the zip itself and how many files it holds."""

    archive: bytes
    file_count: int


@dataclass(frozen=True, slots=True)
class _Entry:
    arcname: str  # POSIX path inside the archive
    source: Path  # the file whose bytes are stored (a link's resolved target)
    executable: bool


def check_layout(root: Path) -> None:
    """Raise ProjectLayoutError naming each of src/, tests/, requirements.txt that is missing."""
    missing = []
    for item in REQUIRED_LAYOUT:
        path = root / item.rstrip("/")
        present = path.is_dir() if item.endswith("/") else path.is_file()
        if not present:
            missing.append(item)
    if missing:
        names = ", ".join(missing)
        raise ProjectLayoutError(
            f"{root} is not a project root: missing {names} "
            "(run `ci submit test` where src/, tests/ and requirements.txt are)"
        )


def pack_project(root: Path, max_bytes: int) -> bytes:
    """Zip the project at root (deflated, deterministic); raise TooLarge over max_bytes."""
    return pack(root, max_bytes).archive


def pack(root: Path, max_bytes: int) -> PackedProject:
    """Like pack_project, also counting the files packed."""
    root = root.resolve()
    check_layout(root)
    sink = _CappedSink(max_bytes)
    count = 0
    # The sink cannot seek, so zipfile writes sizes after each entry (data descriptors); that
    # lets an oversized project be measured without holding its whole archive in memory.
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for directory in REQUIRED_DIRS:
            _add_directory(zf, directory)
        for entry in sorted(iter_entries(root), key=lambda e: e.arcname):
            _add_file(zf, entry)
            count += 1
    if sink.size > max_bytes:
        raise TooLarge(
            f"project archive is {format_size(sink.size)}, over the server's "
            f"{format_size(max_bytes)} limit (leave files out with .gitignore)"
        )
    return PackedProject(archive=sink.getvalue(), file_count=count)


def iter_entries(root: Path) -> Iterator[_Entry]:
    """Every file to pack under the (resolved) root, in walk order."""
    ignores = _IgnoreRules()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir
        ignores.load(here, rel_dir)
        kept_dirs = []
        for name in sorted(dirnames):
            full = here / name
            rel = _join(rel_dir, name)
            if full.is_symlink():
                continue  # never descend through links (loops, escapes); see module docstring
            if is_always_excluded_dir(name) or (full / VENV_MARKER).exists():
                continue
            if ignores.ignored(rel, is_dir=True):
                continue
            kept_dirs.append(name)
        dirnames[:] = kept_dirs  # os.walk descends only into what is left here
        for name in sorted(filenames):
            rel = _join(rel_dir, name)
            if is_always_excluded_file(name) or ignores.ignored(rel, is_dir=False):
                continue
            entry = _entry_for(root, here / name, rel)
            if entry is not None:
                yield entry


def is_always_excluded_dir(name: str) -> bool:
    """Whether a directory of this name is left out of every archive."""
    return name in EXCLUDED_DIR_NAMES or name.endswith(EXCLUDED_DIR_SUFFIXES)


def is_always_excluded_file(name: str) -> bool:
    """Whether a file of this name is left out of every archive."""
    return name.endswith(EXCLUDED_FILE_SUFFIXES)


def _entry_for(root: Path, path: Path, rel: str) -> _Entry | None:
    try:
        info = path.lstat()
    except OSError:
        return None
    if stat.S_ISREG(info.st_mode):
        return _Entry(rel, path, bool(info.st_mode & stat.S_IXUSR))
    if not stat.S_ISLNK(info.st_mode):
        return None  # sockets, FIFOs, devices
    target = _link_target_inside(root, path)
    if target is None:
        return None
    target_info = target.stat()
    if not stat.S_ISREG(target_info.st_mode):
        return None
    return _Entry(rel, target, bool(target_info.st_mode & stat.S_IXUSR))


def _link_target_inside(root: Path, link: Path) -> Path | None:
    """The link's final target when it is inside root and not in an excluded place, else None."""
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling, or a loop of links
        return None
    if not target.is_relative_to(root):
        return None
    parts = target.relative_to(root).parts
    if any(is_always_excluded_dir(p) for p in parts[:-1]) or is_always_excluded_file(parts[-1]):
        return None  # a link must not smuggle in what is excluded, e.g. .git/config
    return target


def _add_file(zf: zipfile.ZipFile, entry: _Entry) -> None:
    info = zipfile.ZipInfo(entry.arcname, date_time=_FIXED_ZIP_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # Unix, so external_attr holds POSIX permissions
    mode = _EXEC_MODE if entry.executable else _FILE_MODE
    info.external_attr = (stat.S_IFREG | mode) << 16
    with entry.source.open("rb") as src:
        info.file_size = os.fstat(src.fileno()).st_size  # decides whether zip64 is needed
        with zf.open(info, "w") as dst:
            while chunk := src.read(_COPY_CHUNK_BYTES):
                dst.write(chunk)


def _add_directory(zf: zipfile.ZipFile, name: str) -> None:
    info = zipfile.ZipInfo(name, date_time=_FIXED_ZIP_TIME)
    info.create_system = 3
    info.external_attr = ((stat.S_IFDIR | _EXEC_MODE) << 16) | 0x10  # 0x10: MS-DOS directory
    zf.writestr(info, b"")


def _join(rel_dir: str, name: str) -> str:
    return f"{rel_dir}/{name}" if rel_dir else name


class _IgnoreRules:
    """The .gitignore files met so far during a top-down walk, each anchored at its directory."""

    def __init__(self) -> None:
        self._specs: list[tuple[str, pathspec.GitIgnoreSpec]] = []

    def load(self, directory: Path, rel_dir: str) -> None:
        gitignore = directory / ".gitignore"
        if not gitignore.is_file() or gitignore.is_symlink():
            return
        try:
            lines = gitignore.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return
        import pathspec  # here: `ci list` loads this module for a constant, never for rules

        self._specs.append((rel_dir, pathspec.GitIgnoreSpec.from_lines(lines)))

    def ignored(self, rel: str, *, is_dir: bool) -> bool:
        """Whether git would ignore rel; the deepest .gitignore with a matching pattern decides."""
        decision: bool | None = None
        for base, spec in self._specs:
            if base and not rel.startswith(base + "/"):
                continue
            local = rel[len(base) + 1:] if base else rel
            result = spec.check_file(local + "/" if is_dir else local)
            if result.include is not None:
                decision = result.include
        return bool(decision)


class _CappedSink(io.RawIOBase):
    """A write-only stream keeping bytes up to a cap and only counting them past it."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self._cap = cap
        self._buffer = io.BytesIO()
        self.size = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data: bytes) -> int:  # type: ignore[override]
        n = len(data)
        self.size += n
        if self.size <= self._cap:
            self._buffer.write(data)
        return n

    def tell(self) -> int:
        return self.size

    def getvalue(self) -> bytes:
        return self._buffer.getvalue()


def describe_archive(packed: PackedProject) -> str:
    """`12 files, 3.4 KB` for the status line."""
    files = "1 file" if packed.file_count == 1 else f"{packed.file_count} files"
    return f"{files}, {format_size(len(packed.archive))}"


__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES", "PackedProject", "check_layout", "describe_archive",
    "is_always_excluded_dir", "is_always_excluded_file", "iter_entries", "pack", "pack_project",
]
