"""Messages to the user: one line on stderr each (a JSON object with --log-format json)."""

from __future__ import annotations

import sys

from orchestrator.logs import message_line
from orchestrator.progress import clear_line

# -q/--quiet: notes (summaries, what a command is about to do) are not shown; errors
# and refusals always are.
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Show notes (the default) or only errors (-q)."""
    global _quiet
    _quiet = quiet


def say(message: str, *, level: str = "ERROR", who: str = "orchestrator") -> None:
    """A one-line message on stderr (an error, a refusal, a warning: never silenced).

    ``level`` is what a JSON line calls it; ``who`` starts a text line (``WHO: message``).
    """
    clear_line()  # a progress line on the terminal would run into the message
    print(message_line(message, level=level, who=who), file=sys.stderr)


def note(message: str) -> None:
    """A one-line note on stderr (a summary, a hint), unless -q asked for errors only."""
    if not _quiet:
        say(message, level="INFO")
