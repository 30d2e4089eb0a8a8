"""The one byte-size formatter, for log lines, refusals and `bootctl` tables alike (binary units)."""
from __future__ import annotations

from typing import Optional


def human(n: Optional[int | float]) -> str:
    """1536 -> '1.5 KiB', 512 -> '512 B', None (not known) -> '-'."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
