"""The `Queued: 3 jobs ahead` line on stderr while a job waits.

On a terminal the line is rewritten in place (carriage return, then clear to the end of the
line) and coloured, unless NO_COLOR is set (https://no-color.org); anywhere else (a pipe, a
CI log) each change is one plain line, so nothing but the text ever lands in a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TextIO

import click

CLEAR_TO_END = "\x1b[K"


def queue_text(ahead: int | None) -> str:
    """`Queued: 3 jobs ahead`, `Queued: 1 job ahead`, `Queued: next in line`, or starting."""
    if ahead is None:
        return "Queued: starting"
    if ahead == 0:
        return "Queued: next in line"
    return f"Queued: {ahead} job{'' if ahead == 1 else 's'} ahead"


def wants_color(is_tty: bool, environ: Mapping[str, str]) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set to anything non-empty."""
    return is_tty and not environ.get("NO_COLOR")


class QueueLine:
    """Shows queue positions as they change; `close()` before anything else is printed."""

    def __init__(self, stream: TextIO, is_tty: bool, color: bool) -> None:
        self._stream = stream
        self._is_tty = is_tty
        self._color = color
        self._shown: str | None = None
        self._open = False  # a rewritten line is on screen without its newline

    def show(self, ahead: int | None) -> None:
        text = queue_text(ahead)
        if text == self._shown:
            return
        self._shown = text
        if not self._is_tty:
            self._stream.write(text + "\n")
        else:
            shown = click.style(text, fg="yellow") if self._color else text
            self._stream.write("\r" + shown + CLEAR_TO_END)
            self._open = True
        self._stream.flush()

    def close(self) -> None:
        """End an in-place line, so what follows starts on a line of its own."""
        if self._open:
            self._stream.write("\n")
            self._stream.flush()
            self._open = False
