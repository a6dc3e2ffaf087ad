"""Parsing the runner's frames out of raw container output, whatever the chunking."""

from __future__ import annotations

import json

from ci_common.models import OutputChunk, OutputStream
from ci_controller.fake_runtime import runner_frames
from ci_controller.framing import MAX_EVENT_CHARS, Frame, FrameParser, is_new, to_chunks


def parse_all(chunks: list[bytes]) -> list[Frame]:
    parser = FrameParser()
    frames: list[Frame] = []
    for chunk in chunks:
        frames += parser.feed(chunk)
    return frames + parser.finish()


RECORDS = [("phase", "tests started"), ("stdout", "héllo wörld ✓\n"),
           ("stderr", "warning: x\n"), ("stdout", "partial "), ("phase", "tests exited 0")]


def test_whole_frames() -> None:
    frames = parse_all(runner_frames(*RECORDS))
    assert [(f.number, f.kind, f.text) for f in frames] == [
        (n, kind, text) for n, (kind, text) in enumerate(RECORDS, start=1)]
    assert all(f.framed for f in frames)


def test_frames_split_at_every_byte_boundary() -> None:
    data = b"".join(runner_frames(*RECORDS))
    expected = parse_all([data])
    for cut in range(1, len(data)):
        assert parse_all([data[:cut], data[cut:]]) == expected
    assert parse_all([data[i:i + 1] for i in range(len(data))]) == expected


def test_unframed_text_passes_through_as_stdout_with_the_previous_number() -> None:
    data = b"".join(runner_frames(("stdout", "a\n"), ("stdout", "b\n")))
    first, second = data.split(b"\n", 1)
    raw = b"garbage before\n" + first + b"\n" + b"written to PID 1 directly\n" + second
    frames = parse_all([raw])
    assert [(f.number, f.kind, f.text, f.framed) for f in frames] == [
        (0, "stdout", "garbage before\n", False),
        (1, "stdout", "a\n", True),
        (1, "stdout", "written to PID 1 directly\n", False),
        (2, "stdout", "b\n", True),
    ]


def test_invalid_utf8_and_binary_never_crash() -> None:
    raw = b"\xff\xfe\x00binary\x80\n" + b"".join(runner_frames(("stdout", "ok\n"))) + b"\xc3"
    frames = parse_all([raw[:3], raw[3:]])
    assert frames[0].text == "\ufffd\ufffd\x00binary\ufffd\n"
    assert frames[1].text == "ok\n"
    assert frames[2].text == "\ufffd"  # a truncated character at the very end


def test_malformed_frames_are_text() -> None:
    bad = [b'[1, "stdout"]\n', b'[0, "stdout", "x"]\n', b'[1, "video", "x"]\n',
           b'["1", "stdout", "x"]\n', b'[1, "stdout", 5]\n', b'[1, "stdout", "x"\n',
           b'[true, "stdout", "x"]\n']
    frames = parse_all(bad)
    assert [f.text.encode() for f in frames] == bad
    assert not any(f.framed for f in frames)


def test_a_huge_line_without_newline_still_flows() -> None:
    parser = FrameParser()
    texts: list[str] = []
    for _ in range(20):  # 2 MB in 100 KB chunks, no newline anywhere
        texts += [f.text for f in parser.feed(b"x" * 100_000)]
    assert texts, "an unterminated megabyte must be passed on before the stream ends"
    texts += [f.text for f in parser.finish()]
    assert "".join(texts) == "x" * 2_000_000


def test_a_64k_frame_with_escapes_is_still_a_frame() -> None:
    text = "\x01" * 65536  # JSON escapes each as \u0001: a 390 KB line
    frames = parse_all([json.dumps([7, "stdout", text]).encode() + b"\n"])
    assert [(f.number, f.framed, f.text == text) for f in frames] == [(7, True, True)]


def test_is_new_skips_stored_frames_exactly() -> None:
    assert not is_new(Frame(3, "stdout", "x"), stored_through=3)
    assert is_new(Frame(4, "stdout", "x"), stored_through=3)
    # unframed text after the last stored frame may not have been stored: replay it
    assert is_new(Frame(3, "stdout", "x", framed=False), stored_through=3)
    assert not is_new(Frame(2, "stdout", "x", framed=False), stored_through=3)


def test_to_chunks_merges_one_stream_and_drops_phases() -> None:
    frames = [Frame(1, "stdout", "a\n"), Frame(2, "stdout", "b\n"), Frame(3, "phase", "p"),
              Frame(4, "stdout", "c"), Frame(5, "stderr", "e\n"), Frame(6, "stdout", "d\n")]
    assert to_chunks(frames) == [OutputChunk(OutputStream.STDOUT, "a\nb\nc"),
                                 OutputChunk(OutputStream.STDERR, "e\n"),
                                 OutputChunk(OutputStream.STDOUT, "d\n")]


def test_to_chunks_caps_one_event() -> None:
    frames = [Frame(i, "stdout", "y" * 50_000) for i in range(1, 5)]
    chunks = to_chunks(frames)
    assert all(len(c.text) <= MAX_EVENT_CHARS for c in chunks)
    assert "".join(c.text for c in chunks) == "y" * 200_000
    assert len(chunks) == 4  # 200 000 chars in 64 K events
