"""The Lua scripts of the pipeline (``tasks/lua/*.lua``) and one typed wrapper per script.

Each script's contract (KEYS, ARGV, reply) is the header of its file. Key names
come from ``tasks/keys.py``; no script builds a key name itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from redis import Redis
from redis.commands.core import Script

from tasks.keys import Keys


@cache
def _source(name: str) -> str:
    return resources.files("tasks").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def _script(r: Redis, name: str) -> Script:
    # register_script only hashes the source: EVALSHA, with EVAL on NOSCRIPT.
    return r.register_script(_source(name))


@dataclass(frozen=True)
class Refusal:
    """Why a fenced script wrote nothing: its code, the partition (-1 meta, -2 lock, -4 the
    output stream) and values."""

    code: str  # "gone", "superseded", "lost" or "wrongtype" (the output stream's key)
    partition: int
    found: str
    expected: str


@dataclass(frozen=True)
class StreamEntries:
    """What a record adds to the output stream of ``--output redis-stream:KEY``."""

    key: str
    through: int  # the committed epoch: entries of later epochs are deleted first
    entries: tuple[tuple[bytes, bytes], ...] = ()  # (epoch, output) of each new entry
    maxlen: int | None = None  # trim the stream to this many entries


@dataclass(frozen=True)
class ProgressRecord:
    """What one fenced record of a driver's progress writes (see ``record_progress.lua``)."""

    meta: dict[str, Any]
    checkpoint: tuple[str, int] | None = None  # member, score
    backlog: dict[Any, Any] | None = None  # None: leave the hash as it is
    dead_letters: tuple[dict[str, Any], ...] = ()
    retained_from: int | None = None
    output_stream: StreamEntries | None = None


def record_progress(
    r: Redis,
    keys: Keys,
    *,
    generation: int,
    token: str,
    lock_ttl_ms: int,
    last_committed: int | None,
    floors: list[int],
    record: ProgressRecord,
) -> Refusal | None:
    """Write ``record`` if this driver still owns the run and Redis lost nothing it saw.

    Returns:
        None when written; otherwise why nothing was written.
    """
    partitions = len(floors)
    script_keys = [keys.meta, keys.driver_lock, keys.checkpoints, keys.dead_letters, keys.backlog]
    script_keys += [keys.progress(p) for p in range(partitions)]
    script_keys += [keys.undo(p) for p in range(partitions)]
    stream = record.output_stream
    if stream is not None:
        script_keys.append(stream.key)
    args: list[Any] = [generation, token, lock_ttl_ms]
    args += ["" if last_committed is None else last_committed, partitions, *floors]
    args += [len(record.meta), *_pairs(record.meta)]
    args += list(record.checkpoint) if record.checkpoint else ["", 0]
    if record.backlog is None:
        args.append(-1)
    else:
        args += [len(record.backlog), *_pairs(record.backlog)]
    args.append(len(record.dead_letters))
    for letter in record.dead_letters:
        assert len(letter) == 5, letter
        args += _pairs(letter)
    args.append("" if record.retained_from is None else record.retained_from)
    if stream is not None:
        args += [stream.through, "" if stream.maxlen is None else stream.maxlen]
        args += [len(stream.entries), *(x for entry in stream.entries for x in entry)]
    reply = _script(r, "record_progress")(keys=script_keys, args=args)
    return _refusal(reply)


def start_run(
    r: Redis,
    keys: Keys,
    *,
    token: str,
    lock_ttl_ms: int,
    planned_generation: int,
    partitions: int,
    start_epoch: int,
    meta: dict[str, Any],
) -> int | str:
    """Take the namespace's next generation and claim every partition for it.

    Returns:
        The new generation, or (nothing written) what superseded the driver: the
        token of another lock holder, or the generation another run took since.
    """
    script_keys = [keys.meta, keys.driver_lock, keys.checkpoints, keys.dead_letters]
    script_keys += [keys.progress(p) for p in range(partitions)]
    seconds, microseconds = r.time()
    first = seconds * 1000 + microseconds // 1000
    args = [token, lock_ttl_ms, planned_generation, start_epoch, first, *_pairs(meta)]
    code, value = _script(r, "start_run")(keys=script_keys, args=args)
    if _text(code) == "ok":
        return int(value)
    return _text(value)


def renew_lease(r: Redis, key: str, job_id: str, ttl_ms: int) -> bool:
    """Renew a partition's lease for ``job_id``; False (nothing written) if another job
    holds it."""
    return bool(_script(r, "renew_lease")(keys=[key], args=[job_id, ttl_ms]))


def _pairs(mapping: dict[Any, Any]) -> list[Any]:
    return [x for item in mapping.items() for x in item]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _refusal(reply: Any) -> Refusal | None:
    if _text(reply[0]) == "ok":
        return None
    code, partition, found, expected = reply
    return Refusal(_text(code), int(partition), _text(found), _text(expected))
