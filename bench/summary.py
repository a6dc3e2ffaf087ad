"""The table `bench/run.py` ends with: each figure of issue #10 beside its target, ✓ or ✗.

Sections print their details as they go; each also returns its headline figures as `Figure`s,
so a run of several sections (`--only all`) closes with one table to read or paste.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    """One measured figure and the target it is held to."""

    name: str
    measured: str  # as printed: "0.85 s (0.25 × plain)"
    target: str  # as printed: "≤ 0.5 × plain"
    met: bool


def print_table(figures: list[Figure]) -> None:
    """A plain-text table, one figure a row."""
    if not figures:
        return
    header = ("figure", "measured", "target", "")
    rows = [(f.name, f.measured, f.target, "✓" if f.met else "✗") for f in figures]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    print()
    print("summary (issue #10 targets):")
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print(("  " + "  ".join([*cells, row[3]])).rstrip())
    met = sum(f.met for f in figures)
    print(f"  {met} of {len(figures)} targets met")
