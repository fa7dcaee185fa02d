"""Messages to the user: one line on stderr each."""

from __future__ import annotations

import sys

# -q/--quiet: notes (summaries, what a command is about to do) are not shown; errors
# and refusals always are.
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Show notes (the default) or only errors (-q)."""
    global _quiet
    _quiet = quiet


def say(message: str) -> None:
    """A one-line message on stderr (an error, a refusal, a warning: never silenced)."""
    from orchestrator.progress import clear_line

    clear_line()  # a progress line on the terminal would run into the message
    print(f"orchestrator: {message}", file=sys.stderr)


def note(message: str) -> None:
    """A one-line note on stderr (a summary, a hint), unless -q asked for errors only."""
    if not _quiet:
        say(message)


def counted(n: int, singular: str, plural: str | None = None) -> str:
    """``n`` and the noun that goes with it: "1 batch", "2 batches", "1,000 events"."""
    word = singular if n == 1 else plural or f"{singular}s"
    return f"{n:,} {word}"
