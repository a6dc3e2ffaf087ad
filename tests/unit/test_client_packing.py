"""Packing a project for upload: layout check, exclusions, .gitignore, symlinks, size limit."""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

import pytest

from ci_client.packing import DEFAULT_MAX_UPLOAD_BYTES, describe_archive, pack, pack_project
from ci_common.errors import ProjectLayoutError, TooLarge


def make_project(root: Path) -> Path:
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "__init__.py").write_text("VALUE = 1\n")
    (root / "tests").mkdir()
    (root / "tests" / "test_value.py").write_text("def test_value():\n    assert True\n")
    (root / "requirements.txt").write_text("pytest\n")
    return root


def names(archive: bytes) -> list[str]:
    """The files in the archive (without the src/ and tests/ directory entries)."""
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        return [info.filename for info in zf.infolist() if not info.is_dir()]


def read(archive: bytes, name: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        return zf.read(name)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


def test_packs_project_files_sorted_and_deflated(project: Path) -> None:
    archive = pack_project(project, DEFAULT_MAX_UPLOAD_BYTES)
    assert names(archive) == ["requirements.txt", "src/pkg/__init__.py", "tests/test_value.py"]
    assert read(archive, "src/pkg/__init__.py") == b"VALUE = 1\n"
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        files = [info for info in zf.infolist() if not info.is_dir()]
        assert {info.compress_type for info in files} == {zipfile.ZIP_DEFLATED}
        assert zf.testzip() is None


def test_required_directories_are_stored_even_when_empty(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    (root / "tests" / "test_value.py").unlink()
    archive = pack_project(root, DEFAULT_MAX_UPLOAD_BYTES)
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        assert [i.filename for i in zf.infolist() if i.is_dir()] == ["src/", "tests/"]
        assert zf.namelist()[:2] == ["src/", "tests/"]
    assert names(archive) == ["requirements.txt", "src/pkg/__init__.py"]


def test_packing_is_deterministic(project: Path) -> None:
    first = pack_project(project, DEFAULT_MAX_UPLOAD_BYTES)
    os.utime(project / "requirements.txt", (1_000_000_000, 1_000_000_000))
    assert pack_project(project, DEFAULT_MAX_UPLOAD_BYTES) == first


def test_executable_bit_is_kept(project: Path) -> None:
    script = project / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    with zipfile.ZipFile(io.BytesIO(pack_project(project, DEFAULT_MAX_UPLOAD_BYTES))) as zf:
        assert (zf.getinfo("run.sh").external_attr >> 16) & 0o777 == 0o755
        assert (zf.getinfo("requirements.txt").external_attr >> 16) & 0o777 == 0o644


@pytest.mark.parametrize("missing", [
    ["src/"], ["tests/"], ["requirements.txt"], ["src/", "requirements.txt"],
    ["src/", "tests/", "requirements.txt"],
])
def test_missing_layout_names_each_missing_item(tmp_path: Path, missing: list[str]) -> None:
    root = make_project(tmp_path / "p")
    for item in missing:
        path = root / item.rstrip("/")
        if path.is_dir():
            for child in sorted(path.rglob("*"), reverse=True):
                child.unlink() if child.is_file() else child.rmdir()
            path.rmdir()
        else:
            path.unlink()
    with pytest.raises(ProjectLayoutError) as info:
        pack_project(root, DEFAULT_MAX_UPLOAD_BYTES)
    said_missing = re.search(r"missing (.*?) \(", info.value.message)
    assert said_missing is not None
    assert said_missing.group(1).split(", ") == missing
    assert info.value.exit_code == 2


def test_a_file_named_src_is_not_a_source_directory(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    (root / "tests" / "test_value.py").unlink()
    (root / "tests").rmdir()
    (root / "tests").write_text("not a directory")
    with pytest.raises(ProjectLayoutError, match=r"missing tests/ "):
        pack_project(root, DEFAULT_MAX_UPLOAD_BYTES)


def test_always_excluded_directories_and_files(project: Path) -> None:
    for name in [".git", ".venv", "venv", "env", "__pycache__", ".pytest_cache", ".mypy_cache",
                 ".ruff_cache", ".tox", ".nox", "build", "dist", "pkg.egg-info", "node_modules"]:
        (project / name).mkdir()
        (project / name / "inside.txt").write_text("x")
    (project / "src" / "pkg" / "__pycache__").mkdir()
    (project / "src" / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    (project / "src" / "pkg" / "stray.pyc").write_bytes(b"\0")
    (project / "src" / "pkg" / "environment.py").write_text("# kept: only dirs named env go\n")
    assert names(pack_project(project, DEFAULT_MAX_UPLOAD_BYTES)) == [
        "requirements.txt", "src/pkg/__init__.py", "src/pkg/environment.py",
        "tests/test_value.py",
    ]


def test_any_directory_with_pyvenv_cfg_is_a_virtualenv(project: Path) -> None:
    venv = project / "my-odd-env-name"
    (venv / "lib").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (venv / "lib" / "site.py").write_text("x = 1\n")
    (project / "tests" / "data").mkdir()
    (project / "tests" / "data" / "config.cfg").write_text("kept\n")
    packed = names(pack_project(project, DEFAULT_MAX_UPLOAD_BYTES))
    assert not any(name.startswith("my-odd-env-name") for name in packed)
    assert "tests/data/config.cfg" in packed


def test_root_gitignore_is_honoured(project: Path) -> None:
    (project / ".gitignore").write_text("# comment\n*.log\n!keep.log\n/data/\nsecret.txt\n")
    (project / "debug.log").write_text("x")
    (project / "keep.log").write_text("x")
    (project / "data").mkdir()
    (project / "data" / "big.bin").write_text("x")
    (project / "tests" / "data").mkdir()
    (project / "tests" / "data" / "fixture.json").write_text("{}")  # /data/ is anchored
    (project / "src" / "pkg" / "secret.txt").write_text("x")
    (project / "src" / "pkg" / "trace.log").write_text("x")
    assert names(pack_project(project, DEFAULT_MAX_UPLOAD_BYTES)) == [
        ".gitignore", "keep.log", "requirements.txt", "src/pkg/__init__.py",
        "tests/data/fixture.json", "tests/test_value.py",
    ]


def test_nested_gitignore_applies_below_its_directory_and_wins(project: Path) -> None:
    (project / ".gitignore").write_text("*.tmp\n")
    (project / "src" / "pkg" / ".gitignore").write_text("generated.py\n!wanted.tmp\n")
    (project / "src" / "pkg" / "generated.py").write_text("x")
    (project / "src" / "pkg" / "wanted.tmp").write_text("x")
    (project / "src" / "pkg" / "other.tmp").write_text("x")
    (project / "tests" / "generated.py").write_text("x")  # outside src/pkg: kept
    (project / "scratch.tmp").write_text("x")
    assert names(pack_project(project, DEFAULT_MAX_UPLOAD_BYTES)) == [
        ".gitignore", "requirements.txt", "src/pkg/.gitignore", "src/pkg/__init__.py",
        "src/pkg/wanted.tmp", "tests/generated.py", "tests/test_value.py",
    ]


def test_files_in_an_ignored_directory_cannot_be_re_included(project: Path) -> None:
    (project / ".gitignore").write_text("logs/\n!logs/important.txt\n")
    (project / "logs").mkdir()
    (project / "logs" / "important.txt").write_text("x")
    assert "logs/important.txt" not in names(pack_project(project, DEFAULT_MAX_UPLOAD_BYTES))


def test_symlink_to_a_file_outside_the_project_is_never_read(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    secret = tmp_path / "outside" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("TOP-SECRET-KEY-MATERIAL")
    (project / "src" / "pkg" / "innocent.txt").symlink_to(secret)
    (project / "outside_dir").symlink_to(secret.parent, target_is_directory=True)
    (project / "relative_escape").symlink_to(Path("..") / "outside" / "id_rsa")
    archive = pack_project(project, DEFAULT_MAX_UPLOAD_BYTES)
    assert names(archive) == ["requirements.txt", "src/pkg/__init__.py", "tests/test_value.py"]
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        everything = b"".join(zf.read(name) for name in zf.namelist())
    assert b"TOP-SECRET" not in everything


def test_symlink_to_a_file_inside_is_stored_as_its_content(project: Path) -> None:
    (project / "tests" / "shared.py").symlink_to(project / "src" / "pkg" / "__init__.py")
    (project / "src" / "alias").symlink_to(project / "src" / "pkg", target_is_directory=True)
    (project / "dangling").symlink_to(project / "nowhere")
    (project / ".git").mkdir()
    (project / ".git" / "config").write_text("[remote] token=abc")
    (project / "gitconfig").symlink_to(project / ".git" / "config")
    archive = pack_project(project, DEFAULT_MAX_UPLOAD_BYTES)
    assert names(archive) == [
        "requirements.txt", "src/pkg/__init__.py", "tests/shared.py", "tests/test_value.py",
    ]
    assert read(archive, "tests/shared.py") == b"VALUE = 1\n"


def test_fifo_is_skipped(project: Path) -> None:
    os.mkfifo(project / "pipe")
    assert "pipe" not in names(pack_project(project, DEFAULT_MAX_UPLOAD_BYTES))


def test_over_the_limit_names_both_sizes(project: Path) -> None:
    (project / "src" / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024))  # incompressible
    with pytest.raises(TooLarge) as info:
        pack_project(project, 2 * 1024 * 1024)
    assert info.value.message.startswith(
        "project archive is 3.0 MB, over the server's 2.0 MB limit")


def test_under_the_limit_and_described(project: Path) -> None:
    packed = pack(project, DEFAULT_MAX_UPLOAD_BYTES)
    assert packed.file_count == 3
    assert describe_archive(packed) == f"3 files, {len(packed.archive)} B"
    assert pack_project(project, len(packed.archive)) == packed.archive  # the limit is inclusive
    with pytest.raises(TooLarge):
        pack_project(project, len(packed.archive) - 1)
