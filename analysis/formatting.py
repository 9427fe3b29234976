"""One way to write numbers in every table (terminal, Markdown, HTML): latencies in ms, shares as
percentages, no `nan` or scientific notation, a dash where there is no value."""

from __future__ import annotations

import math
from typing import Any

DASH = "–"


def missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def num(x: Any) -> str:
    """A plain number with about three significant digits, thousands separated."""
    if missing(x):
        return DASH
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    a = abs(x)
    if isinstance(x, int) or a >= 100 or (a >= 10 and float(x).is_integer()):
        return f"{x:,.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    if a == 0:
        return "0"
    s = f"{x:.3g}"
    return s if "e" not in s else f"{x:.9f}".rstrip("0")


def ms(seconds: Any) -> str:
    """Seconds → milliseconds, as a number (the column title carries the unit)."""
    return DASH if missing(seconds) else num(seconds * 1e3)


def pct(share: Any) -> str:
    """A share in [0, 1] as a percentage: 1 → 100%, 0.875 → 87.5%."""
    if missing(share):
        return DASH
    p = share * 100
    return f"{p:.0f}%" if p in (0, 100) or abs(p) >= 100 else f"{p:.1f}%"


def bytes_rate(bytes_per_s: Any) -> str:
    """Bytes per second in the largest unit that keeps the number readable (MB/s, GB/s)."""
    if missing(bytes_per_s):
        return DASH
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if abs(bytes_per_s) >= scale:
            return f"{num(bytes_per_s / scale)} {unit}"
    return f"{num(bytes_per_s)} B/s"


def cell(x: Any) -> str:
    """A table cell of unknown kind: numbers through `num`, nothing as a dash."""
    if missing(x):
        return DASH
    return num(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)
