"""Change a namespace's partition count, keeping its states and its replay history.

Keys hash once into slots (``tasks/keys.py``: crc32 modulo ``SLOTS``) and each
partition owns a contiguous range of slots. A rescale from P to Q partitions,
at the start of a run, after every partition was claimed by the run and
restored as of the committed epoch C:

1. reads each of the P partitions' state hash and undo records, under a WATCH on
   the meta hash and the P progress hashes;
2. routes each key's state to its partition under Q, and splits each undo record
   into one per partition under Q, keeping the events (and their order) of each
   key (``tasks/undo.py``, ``split_undo``);
3. writes it all in one MULTI/EXEC: the P partitions' keys deleted, the Q
   partitions' written (each at C, owned by the run), and meta's partition count,
   slot count and floors set.

The EXEC is atomic, in memory and in the append-only file (Redis drops a MULTI
block cut by a crash when it loads the file), so a command killed at any point
leaves the namespace at P or at Q, never between; a next run asking for Q
again does the rest. A namespace made before slots existed (its keys spread by
crc32 modulo P) is moved to slots by its first rescale.

A replay from an epoch before the rescale restores from the moved history, in
Q partitions, as if the namespace had always had Q.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis import Redis, WatchError

from orchestrator.messages import note
from orchestrator.wording import counted
from tasks.errors import Superseded
from tasks.keys import Keys, Layout
from tasks.rqcompat import RQ_QUEUES_SET
from tasks.store import PROGRESS_FIELDS, decode_progress
from tasks.undo import split_undo

# Fields and members per command in the big transaction: one reply each, and no command
# near Redis's argument limits.
WRITE_CHUNK = 2_000
WRITE_BYTES = 32 << 20  # (Redis refuses a command argument over proto-max-bulk-len, 512 MB)
PROGRESS_EVERY = 1.0  # seconds between two progress lines of a rescale


@dataclass(frozen=True)
class Rescaled:
    """What a rescale moved."""

    keys: int  # states
    records: int  # undo records read (one per committed batch of each old partition)
    seconds: float


def rescale(
    r: Redis,
    keys: Keys,
    *,
    generation: int,
    source: Layout,
    target: Layout,
    epoch: int,
    leftovers: Sequence[bytes] = (),
) -> Rescaled:
    """Move the namespace from ``source`` to ``target`` as of ``epoch``, in one transaction.

    Every partition of ``source`` must be owned by ``generation`` and restored as
    of ``epoch`` (``start_run`` does both first): no batch can commit meanwhile.
    A namespace whose key names have no hash tags yet (``source.tagged`` false) is
    moved the same way, to the same count or another; ``leftovers`` (what older runs
    left under those names) are deleted in the same transaction.

    Raises:
        Superseded: another driver claimed the namespace or a partition meanwhile
            (nothing is written).
    """
    started = time.monotonic()
    old, new = source.partitions, target.partitions
    was, will = Keys(keys.namespace, source.tagged), Keys(keys.namespace, target.tagged)
    what = "every key's state and replay history"
    if old == new:
        note(
            f"moving namespace {keys.namespace!r} ({counted(new, 'partition')}) to key slots "
            f"and hash-tagged key names as of epoch {epoch}: {what}"
        )
    else:
        note(
            f"rescaling namespace {keys.namespace!r} from {counted(old, 'partition')} to {new} "
            f"as of epoch {epoch}: moving {what}"
        )
    with r.pipeline(transaction=True) as pipe:
        pipe.watch(was.meta, *[was.progress(p) for p in range(old)])
        moving = _read(pipe, was, source, target, generation)
        gone = range(new, old) if was == will else range(old)  # (renamed: every old queue)
        pipe.multi()
        for p in range(old):
            pipe.delete(was.state(p), was.undo(p), was.progress(p), was.probe(p), was.lease(p))
        for p in gone:
            pipe.delete(was.queue_key(p))
            pipe.srem(RQ_QUEUES_SET, was.queue_key(p))
        if leftovers:
            pipe.delete(*leftovers)
        for q in range(new):
            # (keys of a partition beyond the old count may be left by a run whose own
            # rescale Redis lost afterwards: none of it belongs to the namespace's state)
            pipe.delete(will.state(q), will.undo(q), will.progress(q), will.probe(q))
            _write_chunks(pipe, will.state(q), moving.states[q], will.undo(q), moving.history[q])
            pipe.hset(will.progress(q), mapping={"generation": generation, "applied": epoch})
        pipe.delete(will.backlog)
        pipe.hset(
            will.meta,
            mapping={
                "partitions": new,
                "slots": target.slots,
                "hash_tags": int(target.tagged),
                "floors": json.dumps([epoch] * new),
            },
        )
        try:
            pipe.execute()
        except WatchError:
            raise _superseded(keys, -1, generation, None) from None
    moved, records = moving.keys, moving.records
    done = Rescaled(moved, records, time.monotonic() - started)
    note(
        f"rescaled namespace {keys.namespace!r} to {counted(new, 'partition')} in "
        f"{done.seconds:.1f}s ({counted(moved, 'key')}, {counted(records, 'undo record')} of "
        f"replay history)"
    )
    return done


@dataclass
class _Moving:
    """What a rescale read, routed to the partitions it moves to."""

    states: list[dict[bytes, bytes]]  # key -> state JSON, per new partition
    history: list[dict[bytes, float]]  # undo record -> score, per new partition
    keys: int = 0
    records: int = 0


def _read(pipe: Any, was: Keys, source: Layout, target: Layout, generation: int) -> _Moving:
    """Read every partition of ``source`` (names ``was``), under the caller's WATCH."""
    route = target.router()
    moving = _Moving([{} for _ in range(target.partitions)], [{} for _ in range(target.partitions)])
    shown = time.monotonic()
    for p in range(source.partitions):
        owner, _ = decode_progress(pipe.hmget(was.progress(p), PROGRESS_FIELDS))
        if owner != generation:
            raise _superseded(was, p, generation, owner)
        for key, state in cast("dict[bytes, bytes]", pipe.hgetall(was.state(p))).items():
            moving.states[route(key)][key] = state
            moving.keys += 1
        undo = cast("list[tuple[bytes, float]]", pipe.zrange(was.undo(p), 0, -1, withscores=True))
        for record, score in undo:
            for q, part in split_undo(record, route).items():
                moving.history[q][part] = score
        moving.records += len(undo)
        if time.monotonic() - shown >= PROGRESS_EVERY:  # a long rescale shows where it is
            shown = time.monotonic()
            note(
                f"rescale: read {p + 1} of {source.partitions} partitions "
                f"({counted(moving.keys, 'key')}, {counted(moving.records, 'undo record')})"
            )
    return moving


def _write_chunks(
    pipe: Any, state_key: str, states: dict[bytes, bytes], undo_key: str, undo: dict[bytes, float]
) -> None:
    for chunk in _chunks(states.items()):
        pipe.hset(state_key, items=[x for pair in chunk for x in pair])
    for chunk in _chunks(undo.items()):
        pipe.zadd(undo_key, dict(chunk))


def _chunks(pairs: Iterable[tuple[bytes, Any]]) -> Iterator[list[tuple[bytes, Any]]]:
    """The pairs in groups of at most WRITE_CHUNK, and of at most WRITE_BYTES unless one pair
    alone is more (a hot key's state, a large undo record)."""
    chunk: list[tuple[bytes, Any]] = []
    size = 0
    for pair in pairs:
        chunk.append(pair)
        size += len(pair[0]) + (len(pair[1]) if isinstance(pair[1], bytes) else 0)
        if len(chunk) >= WRITE_CHUNK or size >= WRITE_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _superseded(keys: Keys, partition: int, generation: int, owner: int | None) -> Superseded:
    what = "the namespace" if partition < 0 else f"partition {partition}"
    now = "changed" if owner is None else f"belongs to generation {owner}"
    msg = (
        f"{what} of namespace {keys.namespace!r} {now} while run {generation} was rescaling "
        f"it: another driver took over (nothing was moved)"
    )
    return Superseded(msg)
