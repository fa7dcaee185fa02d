"""A Redis stream as the pipeline's input (``redis-stream:KEY``): one entry, one epoch.

The driver reads a ``StreamInput`` like a pipe: each entry's event field is one line, and
the byte offsets the driver keeps are synthetic (a running count of the lines' bytes).
The position recorded with every committed epoch, in the same fenced record, is the id of
the last consumed entry and, where Redis can tell it, that entry's **index** (how many
entries the stream had ever been given up to it): ``ID:INDEX`` in meta's
``source_position`` and at the end of every checkpoint member.

Entries lost before being read are refused, never skipped silently (``StreamLost``: exit 66,
what was read before is committed). Each fetch runs in one MULTI with XINFO STREAM, and
with the position P (the last entry read, or the point before the first) it checks:

- an entry after P was deleted (XDEL): Redis 7's ``max-deleted-entry-id`` is after P;
- entries after P were trimmed (XTRIM, MAXLEN): the first entry F is after P, and F is
  not P's successor by index (``entries-added - length``, the entries removed before F,
  is not P's index; XTRIM does not move ``max-deleted-entry-id``: measured on 7.0.15);
- the stream was deleted (the key is gone) or deleted and created again (fewer entries
  added than P's index, or P's successor missing as above).

Redis 6.2 (the embedded server) has none of these counters: there the run refuses unless
the first entry is at or just after P (nothing can have been trimmed between), and an XDEL
of an unread entry cannot be detected (docs/cli.md).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis
from redis import Redis

from orchestrator.errors import InputError
from orchestrator.messages import note
from orchestrator.settings import STREAM_SOURCE

logger = logging.getLogger(__name__)

FETCH = 1000  # entries per XRANGE
WAIT_POLL = 0.02  # seconds between two looks for a followed stream's first entry
MAX_SEQ = 2**64 - 1
COUNT_CAP = 1_000_000  # status counts at most this many entries behind


class StreamLost(InputError):
    """Raised when entries of the input stream were lost before the pipeline read them."""


def parse_id(text: str | bytes) -> tuple[int, int]:
    """A stream id as (milliseconds, sequence)."""
    if isinstance(text, bytes):
        text = text.decode()
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_id(ms: int, seq: int) -> str:
    """A stream id from (milliseconds, sequence)."""
    return f"{ms}-{seq}"


def predecessor(entry_id: str) -> str:
    """The greatest id before ``entry_id`` (``0-0`` for the first possible one)."""
    ms, seq = parse_id(entry_id)
    if seq > 0:
        return format_id(ms, seq - 1)
    return format_id(ms - 1, MAX_SEQ) if ms > 0 else "0-0"


@dataclass(frozen=True)
class Position:
    """A point in the stream: after entry ``id`` (``0-0``: before everything), whose index
    (entries ever added up to it) is ``index``, or None where Redis cannot say."""

    id: str = "0-0"
    index: int | None = None

    def encode(self) -> str:
        """``ID:INDEX`` (INDEX empty when unknown)."""
        return f"{self.id}:{'' if self.index is None else self.index}"

    @classmethod
    def decode(cls, text: str) -> Position:
        """The inverse of ``encode``."""
        entry_id, _, index = text.partition(":")
        return cls(entry_id, int(index) if index else None)


@dataclass(frozen=True)
class StreamInfo:
    """What XINFO STREAM says (None: the key does not exist); the counters only on Redis 7."""

    length: int
    first: str | None
    last: str | None
    last_generated: str = "0-0"  # the greatest id ever given (even if deleted since)
    added: int | None = None  # entries-added
    max_deleted: str | None = None  # max-deleted-entry-id

    @classmethod
    def parse(cls, reply: Any) -> StreamInfo:
        """From XINFO STREAM's reply (a flat list, or a dict under RESP3)."""
        if isinstance(reply, list):
            reply = dict(zip(reply[::2], reply[1::2], strict=True))
        d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in reply.items()}
        first, last = d.get("first-entry"), d.get("last-entry")
        added = d.get("entries-added")
        deleted = d.get("max-deleted-entry-id")
        return cls(
            length=int(d["length"]),
            first=first[0].decode() if first else None,
            last=last[0].decode() if last else None,
            last_generated=_text(d.get("last-generated-id", b"0-0")),
            added=None if added is None else int(added),
            max_deleted=None if deleted is None else _text(deleted),
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def check_position(name: str, pos: Position, info: StreamInfo | None, *, started: bool) -> None:
    """Refuse to read after ``pos`` if entries after it were lost (module docstring).

    ``started``: entries were consumed (or a run began) at ``pos``: the stream must exist.

    Raises:
        StreamLost: entries after ``pos`` were deleted or trimmed, or the stream was
            deleted or recreated, or (Redis 6.2) that cannot be ruled out.
    """
    where = f"{name}: after entry {pos.id}"
    if info is None:
        if started and pos.id != "0-0":
            msg = f"{name} was deleted (the stream no longer exists); {_HINT}"
            raise StreamLost(msg)
        return
    at = parse_id(pos.id)
    if info.max_deleted is not None and parse_id(info.max_deleted) > at:
        msg = f"{where}, entries were deleted (up to {info.max_deleted}) before being read; {_HINT}"
        raise StreamLost(msg)
    if info.added is not None and pos.index is not None:
        # Entries removed before the first one (none after pos was XDEL'd): a stream that still
        # holds what follows pos has removed exactly pos's index of them, or pos is still there.
        removed = info.added - info.length
        if info.added < pos.index or (removed < pos.index and not _holds(info, at)):
            msg = (
                f"{where}: the stream has had {info.added} entries added, {removed} removed: "
                f"fewer than the {pos.index} read, it was deleted and created again; {_HINT}"
            )
            raise StreamLost(msg)
    if info.first is not None and parse_id(info.first) <= at:
        return  # nothing after pos was trimmed (trimming removes the oldest entries)
    if parse_id(info.last_generated) <= at:
        return  # nothing was ever added after pos
    if info.added is not None and pos.index is not None:
        removed = info.added - info.length
        if removed == pos.index:
            return
        msg = (
            f"{where}, {removed - pos.index} entries were trimmed (XTRIM, MAXLEN) or the stream "
            f"was recreated before they were read; {_HINT}"
        )
        raise StreamLost(msg)
    if info.first is not None and parse_id(info.first) == parse_id(successor(pos.id)):
        return
    msg = (
        f"{where}, the oldest entry is {info.first or 'none'}: entries in between may have been "
        f"trimmed (XTRIM, MAXLEN) or the stream recreated, and Redis before 7.0 cannot tell; "
        f"{_HINT}"
    )
    raise StreamLost(msg)


_HINT = "their events are lost to the pipeline: reset and ingest again, or use a new namespace"


def _pair(position: Position) -> tuple[str, int | None]:
    return position.id, position.index


def _holds(info: StreamInfo, at: tuple[int, int]) -> bool:
    """Whether the stream's entries start at or before ``at``."""
    return info.first is not None and parse_id(info.first) <= at


def successor(entry_id: str) -> str:
    """The least id after ``entry_id``."""
    ms, seq = parse_id(entry_id)
    return format_id(ms + 1, 0) if seq == MAX_SEQ else format_id(ms, seq + 1)


class StreamInput:
    """The entries of a Redis stream, read like a pipe: ``readline`` gives the next entry's
    event field and a newline, or b"" when none is there now (followed) or any more.

    A line the driver must reject (no event field, a newline inside it) is returned without
    a newline, with ``rejection`` saying why. ``position_at(offset)`` is the position after
    the entry whose line ends at that synthetic offset: what the record stores.
    """

    def __init__(
        self,
        r: Redis,
        key: str,
        *,
        field: str = "event",
        follow: bool = False,
    ) -> None:
        self.r, self.key, self.field, self.follow = r, key, field.encode(), follow
        self.name = f"{STREAM_SOURCE}{key}"
        self.blocking = False
        self.stopped: str | None = None  # why reading stopped early (entries were lost)
        self.pos = Position()  # after the last entry fetched
        self.started = False  # a run has read from the position (it is not an ingest's)
        self.end: str | None = None  # without follow: the newest entry as of the start
        self._entries: deque[tuple[str, bytes, str | None]] = deque()  # id, line, rejection
        self._line = b""
        self._cut = 0  # how much of _line readline has returned
        self._id = ""
        self.rejection: str | None = None  # of the line just returned, if it is to be rejected
        self.position = 0  # synthetic offset of the next byte
        # (offset where an entry's line ends, the position after it: id, index), from the last
        # one recorded on (tuples: a Position per entry cost a tenth of the reading time)
        self._ends: deque[tuple[int, str, int | None]] = deque([(0, *_pair(self.pos))])
        self._done = False

    # ------------------------------------------------------------ reading

    def start_at(self, position: Position | None, offset: int) -> None:
        """Read after ``position`` (None: from the oldest entry, an ingest), the next line at
        synthetic ``offset``."""
        self.pos = position or Position()
        self.started = position is not None
        self.position = offset
        self._ends = deque([(offset, *_pair(self.pos))])

    def open(self) -> None:
        """Check the position against the stream (a refusal before anything is recorded) and
        fix the end of a run without --follow.

        Raises:
            InputError: not a stream, or missing (without --follow).
            StreamLost: entries after the position were lost.
        """
        info = self._info_and_fetch(0)[0]
        if info is None and not self.started and not self.follow:
            msg = f"{self.name}: no such stream (add --follow to wait for it)"
            raise InputError(msg)
        if not self.started and self.follow and (info is None or info.first is None):
            info = self._wait_for_entries()
        if not self.started and info is not None:
            # An ingest reads from the oldest entry: its position is the one just before it.
            if info.first is None:  # (an empty stream without --follow: nothing to read)
                self.pos = Position(info.last_generated, info.added)
            else:
                removed = None if info.added is None else info.added - info.length
                self.pos = Position(predecessor(info.first), removed)
            self._ends = deque([(self.position, *_pair(self.pos))])
        check_position(self.name, self.pos, info, started=self.started)
        self.started = True
        if not self.follow:
            self.end = info.last if info is not None else None

    def _wait_for_entries(self) -> StreamInfo:
        """A followed ingest of a stream without entries starts at its first entry: wait for it
        (entries trimmed before then would be unprovable on Redis 6.2)."""
        note(f"{self.name} has no entries yet: waiting for the first one")
        while True:
            time.sleep(WAIT_POLL)
            info = self._info_and_fetch(0)[0]
            if info is not None and info.first is not None:
                return info

    def _info_and_fetch(self, count: int) -> tuple[StreamInfo | None, list[Any]]:
        pipe = self.r.pipeline(transaction=True)
        pipe.execute_command("XINFO", "STREAM", self.key)
        if count:
            pipe.xrange(self.key, f"({self.pos.id}", self.end or "+", count=count)
        try:
            replies = pipe.execute(raise_on_error=False)
        except redis.ResponseError as e:  # (raised for an error in MULTI itself)
            raise self._wrong_type(e) from None
        info_reply = replies[0]
        if isinstance(info_reply, redis.ResponseError):
            if "no such key" in str(info_reply).lower():
                return None, []
            raise self._wrong_type(info_reply)
        entries = replies[1] if count else []
        if isinstance(entries, redis.ResponseError):
            raise self._wrong_type(entries)
        return StreamInfo.parse(info_reply), cast("list[Any]", entries)

    def _wrong_type(self, e: Exception) -> InputError:
        kind = _text(self.r.type(self.key))
        return InputError(f"{self.name}: the key holds a {kind}, not a stream ({e})")

    def _fetch(self) -> None:
        if self._done:
            return
        if not self.follow and (self.end is None or parse_id(self.pos.id) >= parse_id(self.end)):
            self._done = True
            return
        info, entries = self._info_and_fetch(FETCH)
        try:
            check_position(self.name, self.pos, info, started=True)
        except StreamLost as e:
            self.stopped, self._done = str(e), True
            return
        if not entries and not self.follow:
            self._done = True  # (the entries up to the end were deleted meanwhile)
            return
        for entry_id, fields in entries:
            self._entries.append((_text(entry_id), *self._line_of(_text(entry_id), fields)))
        if entries:
            index = self.pos.index
            index = None if index is None else index + len(entries)
            self.pos = Position(_text(entries[-1][0]), index)

    def _line_of(self, entry_id: str, fields: Any) -> tuple[bytes, str | None]:
        value = fields.get(self.field)
        if value is None:
            shown = {_text(k): v.decode("utf-8", "backslashreplace") for k, v in fields.items()}
            reason = f"entry {entry_id} has no field {self.field.decode()!r}"
            return orjson.dumps(shown), reason
        line = value[:-1] if value.endswith(b"\n") else value
        if b"\n" in line:
            reason = f"entry {entry_id}: its {self.field.decode()!r} holds a newline"
            return line.rstrip(b"\r\n") or b"-", reason
        return line + b"\n", None

    def readline(self, limit: int = -1) -> bytes:
        """The next line, as much of it as ``limit`` allows, or b"" when none is there."""
        if self._cut >= len(self._line):
            if not self._entries:
                self._fetch()
                if not self._entries:
                    return b""
            self._id, self._line, self.rejection = self._entries.popleft()
            self._cut = 0
        line, cut = self._line, self._cut
        n = len(line) - cut
        if 0 <= limit < n and self.rejection is None:  # (a rejected line comes whole)
            n = limit
        part = line if n == len(line) else line[cut : cut + n]
        self._cut = cut + n
        self.position += n
        if self._cut >= len(line):
            index = self._ends[-1][2]
            self._ends.append((self.position, self._id, None if index is None else index + 1))
        return part

    def unread(self, data: bytes) -> None:
        """Give back the last ``data`` readline returned."""
        if self._cut >= len(self._line) and self._ends[-1][0] == self.position:
            self._ends.pop()
        self._cut -= len(data)
        self.position -= len(data)

    @property
    def ended(self) -> bool:
        """No more entries will be read (without --follow: the end as of the start)."""
        if self.stopped is not None:
            return True
        return not self.follow and self._done and not self._entries

    def position_at(self, offset: int) -> Position:
        """The position after the entry whose line ends at ``offset`` (offsets never go back)."""
        while len(self._ends) > 1 and self._ends[1][0] <= offset:
            self._ends.popleft()
        _, entry_id, index = self._ends[0]
        return Position(entry_id, index)

    def fields(self, offset: int, resume_at: int, due: bool) -> dict[str, Any]:
        """The meta fields recorded with the committed epoch (``SourceFields``)."""
        return {
            "source_position": self.position_at(resume_at).encode(),
            "fingerprint": "",
            "prefix_sha256": "",
        }

    def skip(self, entries: int) -> None:
        """Read ``entries`` entries and drop them (replay from past a checkpoint).

        Raises:
            StreamLost: the stream has fewer (they were lost since they were committed).
        """
        for _ in range(entries):
            if not self.readline():
                msg = self.stopped or (
                    f"{self.name} ends before the committed epochs' entries (after "
                    f"{self.pos.id}): entries were deleted; {_HINT}"
                )
                raise StreamLost(msg)

    def close(self) -> None:
        pass

    def __enter__(self) -> StreamInput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lag(r: Redis, key: str, position: Position) -> dict[str, Any]:
    """How far the committed position is behind the stream's newest entry: entries and
    seconds (ids carry milliseconds). Counted by reading ids, up to COUNT_CAP entries."""
    unknown = {"source_lag_entries": None, "source_lag_seconds": None}
    if not r.exists(key):  # (or it lives on another Redis than the one asked)
        return unknown
    try:
        raw = cast("list[Any]", r.xrevrange(key, "+", "-", count=1))
    except redis.ResponseError:
        return unknown
    newest = _text(raw[0][0]) if raw else None
    if newest is None or parse_id(newest) <= parse_id(position.id):
        return {"source_lag_entries": 0, "source_lag_seconds": 0.0}
    behind, at = 0, f"({position.id}"
    while behind < COUNT_CAP:
        chunk = cast("list[Any]", r.xrange(key, at, "+", count=10_000))
        behind += len(chunk)
        if len(chunk) < 10_000:
            break
        at = f"({_text(chunk[-1][0])}"
    seconds = max(0, parse_id(newest)[0] - parse_id(position.id)[0]) / 1000
    return {"source_lag_entries": behind, "source_lag_seconds": seconds}


def produce(r: Redis, key: str, lines: Iterable[bytes], field: str = "event") -> int:
    """XADD each line (without its newline) as one entry's ``field``, pipelined; the count."""
    added = 0
    pipe = r.pipeline(transaction=False)
    for line in lines:
        pipe.xadd(key, {field: line.rstrip(b"\n")})
        added += 1
        if added % 1000 == 0:
            pipe.execute()
    pipe.execute()
    return added
