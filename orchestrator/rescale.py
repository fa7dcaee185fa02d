"""Change a namespace's partition count, keeping its states and its replay history.

Keys hash once into slots (``tasks/keys.py``: crc32 modulo ``SLOTS``) and each
partition owns a contiguous range of slots. A rescale from P to Q partitions,
at the start of a run, after every partition was claimed by the run and
restored as of the committed epoch C, moves the namespace in steps of bounded
size, each one MULTI/EXEC:

1. it reads a chunk of one of the P partitions (an HSCAN of its state hash, or a
   range of its undo records), under a WATCH on the meta hash whose generation
   must still be the run's;
2. routes each key's state to its partition under Q, and splits each undo record
   into one per partition under Q, keeping the events (and their order) of each
   key (``tasks/undo.py``, ``split_undo``);
3. writes them to the Q partitions' *staged* keys (``Keys.staged_state``,
   ``staged_undo``: named after the run's generation, with the hash tag of their
   partition), and counts the step in meta (``rescale_steps``), in the same
   transaction.

The P partitions' keys are not touched until the last step, one MULTI/EXEC again,
which first checks (under a WATCH on them) that Redis holds every step it
acknowledged and every state it staged, then deletes the P partitions' keys,
renames the staged ones to the Q partitions' names, and sets meta's partition
count, slot count and floors. So the driver holds one chunk at a time and Redis
never runs a transaction the size of the namespace; a command killed at any
point leaves the namespace at P (with staged keys that the next run deletes:
meta's ``rescale_staged`` names them) or at Q, never between; a next run asking
for Q again does it all again. A Redis that comes back with fewer steps than it
acknowledged (a lost append-only-file tail, a lagging replica promoted) stops the
rescale before its last step, with nothing moved. A namespace made before slots
existed (its keys spread by crc32 modulo P) is moved to slots by its first
rescale.

A replay from an epoch before the rescale restores from the moved history, in
Q partitions, as if the namespace had always had Q.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar, cast

from redis import Redis, WatchError
from redis.exceptions import ConnectionError as RedisConnectionError

from orchestrator.messages import note
from orchestrator.wording import counted
from tasks.errors import RedisLostData, Superseded
from tasks.keys import Keys, Layout
from tasks.rqcompat import RQ_QUEUES_SET
from tasks.store import PROGRESS_FIELDS, TORN, decode_progress
from tasks.undo import split_undo

# Meta fields of a rescale under way: "GENERATION:PARTITIONS" of its staged keys, and the
# steps it has written (each step's transaction adds one).
STAGED = "rescale_staged"
STEPS = "rescale_steps"

READ_KEYS = 5_000  # states a step asks HSCAN for (a hint: it may give a few more)
READ_BYTES = 32 << 20  # undo records' bytes a step aims at (at least one record)
MAX_RECORDS = 1_024  # undo records a step reads at most
# Fields and members per command of a step: one reply each, and no command near Redis's
# argument limits.
WRITE_CHUNK = 2_000
WRITE_BYTES = 32 << 20  # (Redis refuses a command argument over proto-max-bulk-len, 512 MB)
PROGRESS_EVERY = 1.0  # seconds between two progress lines of a rescale
STEP_ATTEMPTS = 10  # tries of a step whose connection is lost

_T = TypeVar("_T")


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
    """Move the namespace from ``source`` to ``target`` as of ``epoch``, in bounded steps.

    Every partition of ``source`` must be owned by ``generation`` and restored as
    of ``epoch`` (``start_run`` does both first): no batch can commit meanwhile.
    A namespace whose key names have no hash tags yet (``source.tagged`` false) is
    moved the same way, to the same count or another; ``leftovers`` (what older runs
    left under those names) are deleted by the last step.

    Raises:
        Superseded: another driver claimed the namespace or a partition meanwhile
            (nothing is moved).
        RedisLostData: Redis lost steps of the rescale that it had acknowledged
            (nothing is moved).
    """
    started = time.monotonic()
    old, new = source.partitions, target.partitions
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
    drop_staged(r, keys)
    move = _Move(r, keys, generation, source, target)
    for p in range(old):
        move.states_of(p)
        move.history_of(p)
    done = move.finish(epoch, leftovers, started)
    note(
        f"rescaled namespace {keys.namespace!r} to {counted(new, 'partition')} in "
        f"{done.seconds:.1f}s ({counted(done.keys, 'key')}, {counted(done.records, 'undo record')} "
        f"of replay history)"
    )
    return done


def drop_staged(r: Redis, keys: Keys) -> int:
    """Delete the staged keys of a rescale that did not finish (killed, or superseded);
    the number of keys deleted."""
    staged = r.hget(keys.meta, STAGED)
    if staged is None:
        return 0
    generation, partitions = (int(x) for x in cast("bytes", staged).split(b":"))
    will = Keys(keys.namespace)
    names = [
        name
        for q in range(partitions)
        for name in (will.staged_state(q, generation), will.staged_undo(q, generation))
    ]
    deleted = sum(
        int(r.unlink(*names[i : i + WRITE_CHUNK])) for i in range(0, len(names), WRITE_CHUNK)
    )
    r.hdel(keys.meta, STAGED, STEPS)
    return deleted


@dataclass
class _Move:
    """One rescale's steps: what it staged so far."""

    r: Redis
    keys: Keys
    generation: int
    source: Layout
    target: Layout
    steps: int = 0
    staged: set[str] = field(default_factory=set)  # the staged keys written
    moved_keys: int = 0  # states staged (HSCAN may give a key twice: a progress figure)
    moved_records: int = 0
    shown: float = field(default_factory=time.monotonic)
    finished: tuple[int, int] | None = None  # states and undo records, once checked

    def __post_init__(self) -> None:
        self.was = Keys(self.keys.namespace, self.source.tagged)
        self.will = Keys(self.keys.namespace, self.target.tagged)
        self.route = self.target.router()
        # (for the progress lines: nothing writes the old partitions while it runs)
        with self.r.pipeline(transaction=False) as pipe:
            for p in range(self.source.partitions):
                pipe.hlen(self.was.state(p))
                pipe.zcard(self.was.undo(p))
            counts = pipe.execute()
        self.total_keys, self.total_records = sum(counts[::2]), sum(counts[1::2])

    def states_of(self, p: int) -> None:
        """Stage the states of old partition ``p``, a chunk a step."""
        cursor = 0
        while True:
            read = partial(self._read_states, p=p, cursor=cursor)
            cursor, states = self._step(read, self._write_states, lambda found: bool(found[1]))
            self.moved_keys += len(states)
            self._show(p)
            if cursor == 0:
                return

    def history_of(self, p: int) -> None:
        """Stage the undo records of old partition ``p``, split by new partition, a range of
        records a step."""
        start, count = 0, 1
        while True:
            read = partial(self._read_records, p=p, start=start, count=count)
            records = self._step(read, self._write_records, bool)
            self.moved_records += len(records)
            self._show(p)
            if len(records) < count:
                return
            start += len(records)
            size = sum(len(record) for record, _ in records)
            # (a record is at most a commit's bytes: aim each step at READ_BYTES of them)
            if size <= READ_BYTES // 2:
                count = min(count * 2, MAX_RECORDS)
            elif size > READ_BYTES:
                count = max(count // 2, 1)

    def _read_states(self, pipe: Any, *, p: int, cursor: int) -> tuple[int, dict[bytes, bytes]]:
        self._check_owner(pipe, p)
        found = pipe.hscan(self.was.state(p), cursor, count=READ_KEYS)
        return cast("tuple[int, dict[bytes, bytes]]", found)

    def _write_states(self, pipe: Any, found: tuple[int, dict[bytes, bytes]]) -> None:
        routed: list[dict[bytes, bytes]] = [{} for _ in range(self.target.partitions)]
        for key, state in found[1].items():
            routed[self.route(key)][key] = state
        for q, states in enumerate(routed):
            if states:
                name = self.will.staged_state(q, self.generation)
                for chunk in _chunks(states.items()):
                    pipe.hset(name, items=[x for pair in chunk for x in pair])
                self.staged.add(name)

    def _read_records(
        self, pipe: Any, *, p: int, start: int, count: int
    ) -> list[tuple[bytes, float]]:
        self._check_owner(pipe, p)
        found = pipe.zrange(self.was.undo(p), start, start + count - 1, withscores=True)
        return cast("list[tuple[bytes, float]]", found)

    def _write_records(self, pipe: Any, records: list[tuple[bytes, float]]) -> None:
        routed: list[dict[bytes, float]] = [{} for _ in range(self.target.partitions)]
        for record, score in records:
            for q, part in split_undo(record, self.route).items():
                routed[q][part] = score
        for q, parts in enumerate(routed):
            if parts:
                name = self.will.staged_undo(q, self.generation)
                for chunk in _chunks(parts.items()):
                    pipe.zadd(name, dict(chunk))
                self.staged.add(name)

    def _step(
        self,
        read: Callable[[Any], _T],
        write: Callable[[Any, _T], None],
        any_to_write: Callable[[_T], bool],
    ) -> _T:
        """One step: ``read`` under a WATCH on meta, then ``write`` and the step's count in
        one transaction; again if the connection was lost (a step written twice is the same)."""
        return _again_if_lost(lambda: self._try_step(read, write, any_to_write), self._superseded)

    def _try_step(
        self,
        read: Callable[[Any], _T],
        write: Callable[[Any, _T], None],
        any_to_write: Callable[[_T], bool],
    ) -> _T:
        meta = self.keys.meta
        with self.r.pipeline(transaction=True) as pipe:
            pipe.watch(meta)
            found = pipe.hget(meta, "generation")
            if found is None or int(found) != self.generation:
                raise self._superseded()
            data = read(pipe)
            if not any_to_write(data):
                return data
            pipe.multi()
            pipe.hincrby(meta, TORN, 1)  # first, and taken back last
            write(pipe, data)
            pipe.hset(meta, STAGED, f"{self.generation}:{self.target.partitions}")
            pipe.hincrby(meta, STEPS, 1)
            pipe.hincrby(meta, TORN, -1)
            pipe.execute()
        self.steps += 1
        return data

    def _superseded(self) -> Superseded:
        return _superseded(self.keys, -1, self.generation, None)

    def _check_owner(self, pipe: Any, p: int) -> None:
        owner, _ = decode_progress(pipe.hmget(self.was.progress(p), PROGRESS_FIELDS))
        if owner != self.generation:
            raise _superseded(self.was, p, self.generation, owner)

    def _show(self, p: int) -> None:
        if time.monotonic() - self.shown >= PROGRESS_EVERY:  # a long rescale shows where it is
            self.shown = time.monotonic()
            # (HSCAN may give a key twice: the count may run a little ahead)
            moved = min(self.moved_keys, self.total_keys)
            note(
                f"rescale: {moved:,} of {counted(self.total_keys, 'key')} and "
                f"{self.moved_records:,} of {counted(self.total_records, 'undo record')} "
                f"moved ({moved / max(self.total_keys, 1):.0%} of the keys)"
            )

    def finish(self, epoch: int, leftovers: Sequence[bytes], started: float) -> Rescaled:
        """The last step: check that Redis holds every step, then swap the staged keys in."""

        def attempt() -> None:
            if self.finished is None or not self._swapped():  # (its reply may have been lost)
                self._try_finish(epoch, leftovers)

        _again_if_lost(attempt, self._superseded)
        assert self.finished is not None
        keys, records = self.finished
        return Rescaled(keys, records, time.monotonic() - started)

    def _swapped(self) -> bool:
        """Whether the last step's transaction was done (by this run): meta then holds the
        target layout, which differs from the source's in one of its three fields at least."""
        fields = ["generation", "partitions", "slots", "hash_tags", STAGED]
        found = self.r.hmget(self.keys.meta, fields)
        layout = [str(x).encode() for x in self.target_fields().values()]
        mine = found[0] is not None and int(found[0]) == self.generation
        return mine and found[1:4] == layout and found[4] is None

    def target_fields(self) -> dict[str, int]:
        """The meta fields of the target layout."""
        target = self.target
        return {"partitions": target.partitions, "slots": target.slots,
                "hash_tags": int(target.tagged)}  # fmt: skip

    def _try_finish(self, epoch: int, leftovers: Sequence[bytes]) -> None:
        was, will, generation = self.was, self.will, self.generation
        old, new = self.source.partitions, self.target.partitions
        staged = sorted(self.staged)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.watch(was.meta, *[was.progress(p) for p in range(old)], *staged)
            for p in range(old):
                self._check_owner(pipe, p)
            found = pipe.hmget(was.meta, ["generation", STEPS])
            if found[0] is None or int(found[0]) != generation:
                raise self._superseded()
            sizes = [int(pipe.hlen(was.state(p))) for p in range(old)]
            records = sum(int(pipe.zcard(was.undo(p))) for p in range(old))
            moved = [int(pipe.hlen(will.staged_state(q, generation))) for q in range(new)]
            present = int(pipe.exists(*staged)) if staged else 0
            steps = int(found[1] or 0)
            # (more steps than counted here: one written twice, its reply lost; fewer: lost)
            if steps < self.steps or sum(moved) != sum(sizes) or present != len(staged):
                raise self._lost(pipe, steps, sum(moved), sum(sizes))
            self.finished = (sum(sizes), records)
            gone = range(new, old) if was == will else range(old)  # (renamed: every old queue)
            pipe.multi()
            pipe.hincrby(will.meta, TORN, 1)  # first, and taken back last
            for p in range(old):
                pipe.unlink(was.state(p), was.undo(p))
                pipe.delete(was.progress(p), was.probe(p), was.lease(p))
            for p in gone:
                pipe.delete(was.queue_key(p))
                pipe.srem(RQ_QUEUES_SET, was.queue_key(p))
            if leftovers:
                pipe.delete(*leftovers)
            for q in range(new):
                # (keys of a partition beyond the old count may be left by a run whose own
                # rescale Redis lost afterwards: none of it belongs to the namespace's state)
                pipe.unlink(will.state(q), will.undo(q))
                pipe.delete(will.progress(q), will.probe(q))
                for name, final in ((will.staged_state(q, generation), will.state(q)),
                                    (will.staged_undo(q, generation), will.undo(q))):  # fmt: skip
                    if name in self.staged:  # (each exists: checked above, under the WATCH)
                        pipe.rename(name, final)
                pipe.hset(will.progress(q), mapping={"generation": generation, "applied": epoch})
            pipe.delete(will.backlog)
            fields: dict[Any, Any] = {**self.target_fields(), "floors": json.dumps([epoch] * new)}
            pipe.hset(will.meta, mapping=fields)
            pipe.hdel(will.meta, STAGED, STEPS)
            pipe.hincrby(will.meta, TORN, -1)
            pipe.execute()

    def _lost(self, pipe: Any, steps: int, moved: int, states: int) -> RedisLostData:
        """The error for a Redis that lost some of the steps it acknowledged; the staged keys
        are deleted first."""
        pipe.reset()
        drop_staged(self.r, self.keys)
        msg = (
            f"Redis lost part of the rescale of namespace {self.keys.namespace!r} while it ran "
            f"(it holds {steps} of its {self.steps} steps and {moved} of {states} states: "
            f"a lost append-only-file tail, or a failover to a lagging replica); nothing was "
            f"moved: run the command again"
        )
        return RedisLostData(msg)


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


def _again_if_lost(attempt: Callable[[], _T], superseded: Callable[[], Superseded]) -> _T:
    """``attempt()``, again while it loses its connection under a WATCH (a Redis restarting,
    a failover): redis-py then raises WatchError, as it does for a key that changed."""
    for tries in range(1, STEP_ATTEMPTS + 1):
        try:
            return attempt()
        except WatchError as error:
            if "occurred while watching" not in str(error):
                raise superseded() from None  # (a watched key changed: another driver)
            if tries == STEP_ATTEMPTS:
                raise RedisConnectionError(f"Redis kept dropping the connection: {error}") from None
            # (the next WATCH reconnects, through the client's retry)
    raise AssertionError("unreachable")


def _superseded(keys: Keys, partition: int, generation: int, owner: int | None) -> Superseded:
    what = "the namespace" if partition < 0 else f"partition {partition}"
    now = "changed" if owner is None else f"belongs to generation {owner}"
    msg = (
        f"{what} of namespace {keys.namespace!r} {now} while run {generation} was rescaling "
        f"it: another driver took over (nothing was moved)"
    )
    return Superseded(msg)
