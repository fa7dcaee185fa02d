"""How counts are worded in messages and progress lines."""

from __future__ import annotations


def counted(n: int, singular: str, plural: str | None = None) -> str:
    """``n`` and the noun that goes with it: "1 batch", "2 batches", "1,000 events"."""
    word = singular if n == 1 else plural or f"{singular}s"
    return f"{n:,} {word}"
