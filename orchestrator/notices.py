"""Reading the commit notices of a run from their stream.

Reads are idempotent (XREAD from the last id seen), so a reply lost to a
dropped connection is simply read again after the reconnect; entries are
trimmed once the driver has taken them.
"""

from __future__ import annotations

from typing import Any

from redis import Redis

from tasks.batch import CommitNotice

READ_COUNT = 8  # a notice holds up to a batch of output lines: keep replies small
TRIM_EVERY = 8  # reads between two trims of the entries already taken
# ... or sooner, once the notices taken since the last trim hold this many bytes: a notice
# holds up to ~16 MB (a worker's commit is bounded by bytes), and Redis keeps it until trimmed
TRIM_BYTES = 32 << 20


class NoticeReader:
    """Follows one generation's notice stream."""

    def __init__(self, r: Redis, key: str) -> None:
        self.r = r
        self.key = key
        self.last_id: bytes = b"0-0"
        self._reads = 0
        self._untrimmed = 0  # bytes of the notices taken since the last trim

    def read(self, block_ms: int | None = None) -> list[CommitNotice]:
        """Notices after the last one taken; wait up to ``block_ms`` if there are none."""
        reply: Any = self.r.xread({self.key: self.last_id}, count=READ_COUNT, block=block_ms)
        entries = _entries(reply)
        if not entries:
            return []
        self.last_id = entries[-1][0]
        self._reads += 1
        notices = [fields[b"n"] for _, fields in entries]
        self._untrimmed += sum(map(len, notices))
        if self._reads % TRIM_EVERY == 0 or self._untrimmed >= TRIM_BYTES:
            self.r.xtrim(self.key, minid=self.last_id)
            self._untrimmed = 0
        return [CommitNotice.decode(n) for n in notices]

    def close(self) -> None:
        """Delete the stream: the run has taken every notice it waits for."""
        self.r.delete(self.key)


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    # RESP2 answers [[key, entries]]; RESP3 answers {key: [entries]}.
    if not reply:
        return []
    if isinstance(reply, dict):
        [value] = reply.values()
        return list(value[0] if value and isinstance(value[0], list) else value)
    return list(reply[0][1])
