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
    """Follows one generation's notice streams, one per partition (each in its partition's
    Redis Cluster slot: ``tasks/keys.py``), with one XREAD for all of them."""

    def __init__(self, r: Redis, keys: list[str]) -> None:
        self.r = r
        self.last_ids: dict[str, bytes] = dict.fromkeys(keys, b"0-0")
        self._reads = 0
        self._untaken: set[str] = set()  # streams with entries taken since the last trim
        self._untrimmed = 0  # bytes of the notices taken since the last trim

    def read(self, block_ms: int | None = None) -> list[CommitNotice]:
        """Notices after the last one taken; wait up to ``block_ms`` if there are none."""
        streams: Any = self.last_ids  # (redis-py annotates the mapping more narrowly)
        reply: Any = self.r.xread(streams, count=READ_COUNT, block=block_ms)
        notices: list[bytes] = []
        for key, entries in _entries(reply):
            self.last_ids[key] = entries[-1][0]
            self._untaken.add(key)
            notices += [fields[b"n"] for _, fields in entries]
        if not notices:
            return []
        self._reads += 1
        self._untrimmed += sum(map(len, notices))
        if self._reads % TRIM_EVERY == 0 or self._untrimmed >= TRIM_BYTES:
            with self.r.pipeline(transaction=False) as pipe:
                for key in self._untaken:
                    pipe.xtrim(key, minid=self.last_ids[key])
                pipe.execute()
            self._untaken.clear()
            self._untrimmed = 0
        return [CommitNotice.decode(n) for n in notices]

    def close(self) -> None:
        """Delete the streams: the run has taken every notice it waits for."""
        self.r.delete(*self.last_ids)


def _entries(reply: Any) -> list[tuple[str, list[tuple[bytes, dict[bytes, bytes]]]]]:
    """Each stream's key and entries in an XREAD reply.

    RESP2 answers [[key, entries], ...]; RESP3 answers {key: [entries]}.
    """
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, dict) else reply
    found = []
    for key, value in pairs:
        entries = value[0] if value and isinstance(value[0], list) else value
        if entries:
            found.append((key.decode() if isinstance(key, bytes) else key, list(entries)))
    return found
