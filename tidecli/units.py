"""Units and rates used everywhere: binary sizes, and counts per second or per step."""

from __future__ import annotations

MIB = 1 << 20
GIB = 1 << 30


def per(count: float, amount: float) -> float:
    """count / amount, 0 when amount is not positive (a rate over no time or no steps)."""
    return count / amount if amount > 0 else 0.0


def size_text(nbytes: float) -> str:
    """A size for people: GiB from a quarter GiB up, else MiB."""
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB // 4 else f"{nbytes / MIB:.1f} MiB"
