"""Messages to the user: one line on stderr each."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    """A one-line message on stderr."""
    print(f"orchestrator: {message}", file=sys.stderr)
