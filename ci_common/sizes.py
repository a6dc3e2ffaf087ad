"""Byte sizes as people write them (`50MB`, `512k`) and read them (`50.0 MB`).

Kept apart from `ci_common.settings` (which re-exports them) so that the `ci` client, which
parses `--max-upload` at start-up, does not import the server's settings (issue #10).
"""

from __future__ import annotations

import re

from ci_common.errors import InvalidInput

# The largest project archive the server accepts unless CI_MAX_UPLOAD says otherwise; the client
# checks the same limit before uploading.
DEFAULT_MAX_UPLOAD_BYTES = 50 * 1024**2

_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3,
               "gb": 1024**3}


def parse_size(text: str) -> int:
    """Parse a byte size such as `50MB`, `512k` or `1048576` (units are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise InvalidInput(f"not a size: {text!r} (use e.g. 50MB, 512k or a number of bytes)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def format_size(num_bytes: int) -> str:
    """Format a byte count for people: `50.0 MB`, `812 B`."""
    value = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
