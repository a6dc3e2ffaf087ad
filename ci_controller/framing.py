"""Parse the runner's framed output (see `ci_controller.runner_entry`) from raw container chunks.

Pure: no I/O. A frame may straddle chunks; anything that is not a well-formed frame line (a
test writing to PID 1's stdout directly, a runner traceback) is passed through as stdout text
instead of being dropped or crashing the controller. Such unframed text carries the number of
the frame before it, so after a controller crash it is replayed at least once (never lost when
its predecessor was the last stored frame), while framed output is replayed exactly once.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ci_common.models import OutputChunk, OutputStream
from ci_common.settings import format_size

KIND_STDOUT = "stdout"
KIND_STDERR = "stderr"
KIND_PHASE = "phase"
KIND_SKIPPED = "skipped"  # text: bytes of output the runner dropped here (see runner_entry)
_KINDS = frozenset((KIND_STDOUT, KIND_STDERR, KIND_PHASE, KIND_SKIPPED))

# The runner's frames carry at most 64 KB of input; JSON escaping can make a line up to six
# times longer. Past this, a line without a newline cannot be a frame: flush it as text.
MAX_FRAME_LINE_BYTES = 1024 * 1024
MAX_EVENT_CHARS = 64 * 1024  # one stored OUTPUT event holds at most this much text


@dataclass(frozen=True, slots=True)
class Frame:
    """One record of the runner's output."""

    number: int  # the runner's frame number; for unframed text, the number of the frame before
    kind: str  # "stdout", "stderr", "phase" or "skipped"
    text: str
    framed: bool = True  # False for unframed text passed through as stdout


class FrameParser:
    """Turns raw output chunks into Frames, keeping partial lines between calls."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self._last_number = 0
        self._garbage_decoder = codecs.getincrementaldecoder("utf-8")("replace")

    @property
    def last_number(self) -> int:
        """The number of the last well-formed frame seen."""
        return self._last_number

    @property
    def pending(self) -> bool:
        """Whether part of a line (no newline yet) is held back."""
        return bool(self._pending)

    def feed(self, chunk: bytes) -> list[Frame]:
        """Frames completed by this chunk, in order."""
        self._pending += chunk
        frames: list[Frame] = []
        start = 0
        while True:
            end = self._pending.find(b"\n", start)
            if end < 0:
                break
            self._take_line(bytes(self._pending[start:end + 1]), frames)
            start = end + 1
        del self._pending[:start]
        if len(self._pending) > MAX_FRAME_LINE_BYTES:
            self._add_garbage(bytes(self._pending), frames, final=False)
            self._pending.clear()
        return frames

    def finish(self) -> list[Frame]:
        """Whatever is left once the output ended (a last line without a newline)."""
        frames: list[Frame] = []
        if self._pending:
            self._take_line(bytes(self._pending), frames)
            self._pending.clear()
        self._add_garbage(b"", frames, final=True)
        return frames

    def _take_line(self, line: bytes, frames: list[Frame]) -> None:
        frame = _parse_frame(line)
        if frame is None:
            self._add_garbage(line, frames, final=False)
        else:
            self._last_number = frame.number
            frames.append(frame)

    def _add_garbage(self, data: bytes, frames: list[Frame], final: bool) -> None:
        text = self._garbage_decoder.decode(data, final=final)
        if text:
            frames.append(Frame(self._last_number, KIND_STDOUT, text, framed=False))


def _parse_frame(line: bytes) -> Frame | None:
    stripped = line.rstrip(b"\r\n")
    if not stripped.startswith(b"[") or not stripped.endswith(b"]"):
        return None
    try:
        value = json.loads(stripped)
    except ValueError:  # includes UnicodeDecodeError
        return None
    if not (isinstance(value, list) and len(value) == 3):
        return None
    number, kind, text = value
    if type(number) is not int or number < 1 or kind not in _KINDS or not isinstance(text, str):
        return None
    if kind == KIND_SKIPPED and not (text.isascii() and text.isdigit()):
        return None
    return Frame(number, kind, text)


def skipped_text(skipped_bytes: int) -> str:
    """The line standing where the runner dropped output written faster than it is stored."""
    return (f"[ci] … {format_size(skipped_bytes)} of output skipped here: written faster than "
            "it can be stored; the last part is kept …\n")


def lost_text(frames: int) -> str:
    """The line standing where frames never arrived (the engine's log rotated them away)."""
    return (f"[ci] … output lost here: {frames} output frame(s) missing from the container "
            "engine's log …\n")


def skipped_bytes(frames: Iterable[Frame]) -> int:
    """Bytes the runner reported dropping in these frames."""
    return sum(int(frame.text) for frame in frames if frame.kind == KIND_SKIPPED and frame.framed)


def is_new(frame: Frame, stored_through: int) -> bool:
    """Whether a frame is not yet stored, given the job's log cursor."""
    if frame.framed:
        return frame.number > stored_through
    # Unframed text after frame N may or may not have been stored with cursor N: replay it.
    return frame.number >= stored_through


def to_chunks(frames: Iterable[Frame]) -> list[OutputChunk]:
    """Output frames as chunks to store: consecutive text of one stream merged, up to a cap."""
    chunks: list[OutputChunk] = []
    stream: OutputStream | None = None
    parts: list[str] = []
    size = 0
    for frame in frames:
        if frame.kind == KIND_PHASE:
            continue
        if frame.kind == KIND_SKIPPED:
            # An event of its own: one merging output from both sides of the gap would be
            # dropped whole by the cap, taking kept output with it.
            _flush(chunks, stream, parts)
            chunks.append(OutputChunk(stream=OutputStream.STDOUT,
                                      text=skipped_text(int(frame.text))))
            stream, parts, size = None, [], 0
            continue
        frame_stream, text = OutputStream(frame.kind), frame.text
        while text:
            if stream is not frame_stream or size >= MAX_EVENT_CHARS:
                _flush(chunks, stream, parts)
                stream, parts, size = frame_stream, [], 0
            piece = text[:MAX_EVENT_CHARS - size]
            parts.append(piece)
            size += len(piece)
            text = text[len(piece):]
    _flush(chunks, stream, parts)
    return chunks


def _flush(chunks: list[OutputChunk], stream: OutputStream | None, parts: Sequence[str]) -> None:
    if stream is not None and parts:
        chunks.append(OutputChunk(stream=stream, text="".join(parts)))
