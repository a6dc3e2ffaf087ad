"""The several-hosts bench's own decisions: how jobs are split, and how fairness is judged."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bench.several_hosts import slot_shares, start_shares, submissions
from tests.e2e.hosts import lines_of, stamps_of

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def view(created_s: float, start_s: float, end_s: float) -> dict[str, Any]:
    return {"created_at": (T0 + timedelta(seconds=created_s)).isoformat(),
            "start_time": (T0 + timedelta(seconds=start_s)).isoformat(),
            "end_time": (T0 + timedelta(seconds=end_s)).isoformat()}


def test_the_burst_is_three_eighths_and_the_rest_split_evenly() -> None:
    assert submissions(120, 4) == (45, [25, 25, 25])
    burst, later = submissions(20, 4)
    assert burst + sum(later) == 20 and max(later) - min(later) <= 1


def test_shares_count_only_starts_after_a_slot_freed_with_everyone_waiting() -> None:
    views, owner = {}, {}
    # User a fills both slots before b arrives (starts at 1 and 1.5: not judged).
    for n, (created, start, end) in enumerate([(0, 1, 10), (0, 1.5, 11), (0, 12, 20),
                                               (0, 21, 30)]):
        views[f"a{n}"], owner[f"a{n}"] = view(created, start, end), "a"
    # b arrives at 2; first freed slot at 10. b's jobs start at 10.5 and 19, then a's last.
    for n, (created, start, end) in enumerate([(2, 10.5, 18), (2, 19, 25), (2, 31, 40)]):
        views[f"b{n}"], owner[f"b{n}"] = view(created, start, end), "b"
    shares, window = start_shares(views, owner)
    # Window [10, 21): a's start at 12, b's at 10.5 and 19.
    assert window == 3
    assert shares == {"a": 1 / 3, "b": 2 / 3}
    # Slot time in the same window: a holds 1 (a1 until 11) + 8 (a2), b 7.5 (b0) + 2 (b1).
    assert slot_shares(views, owner) == pytest.approx({"a": 9 / 18.5, "b": 9.5 / 18.5})


def test_tagged_lines_are_read_in_order_with_their_print_times() -> None:
    text = "x\njob-1 line 1 100.5\njob-11 line 1 3.0\njob-1 line 2 101.25\n"
    assert lines_of("job-1", text) == [1, 2]
    assert stamps_of("job-1", text) == [100.5, 101.25]
