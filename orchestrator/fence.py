"""What keeps a driver from writing a wrong result: the fence on its writes, and the checks of
Redis against what the namespace recorded.

Every write that records progress runs in a script that first checks that the
run is still this driver's (generation and lock token) and that Redis still
holds everything the driver saw committed (``tasks/lua/record_progress.lua``).
A driver that was paused past its lock's TTL, or a Redis that came back with
less than it acknowledged (a lost append-only-file tail, a failover to a
lagging replica, evicted keys, an empty restart), therefore makes the driver
stop without writing, instead of recording progress that Redis does not back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis
from redis import Redis

from orchestrator.server import server_config
from orchestrator.wording import counted
from tasks.errors import PipelineError, RedisLostData, Superseded, TornWrite
from tasks.keys import Keys
from tasks.scripts import Refusal
from tasks.store import applied_epochs, torn_message

LOSS_CAUSES = "a lost append-only-file tail, a failover to a lagging replica, or evicted keys"


@dataclass(frozen=True)
class Fence:
    """What fences a driver's writes: its run's generation and its lock token."""

    generation: int
    token: str
    lock_ttl_ms: int


def refusal_error(refusal: Refusal, keys: Keys, fence: Fence) -> PipelineError:
    """The error that stops a driver whose fenced write was refused."""
    ns = keys.namespace
    stopped = "this driver stopped without writing anything more"
    if refusal.code == "gone":
        msg = (
            f"the data of namespace {ns!r} is gone from Redis (it was reset, or Redis restarted "
            f"empty, e.g. without persistence); {stopped}"
        )
        return RedisLostData(msg)
    if refusal.code == "torn":
        where = "meta" if refusal.partition < 0 else f"partition {refusal.partition}'s progress"
        return TornWrite(torn_message(f"the namespace's {where}"))
    if refusal.code == "superseded":
        if refusal.partition == -2:
            who = f"another driver holds its lock ({refusal.found})"
        else:
            who = f"a newer run (generation {refusal.found}) owns it"
        ttl = f" {fence.lock_ttl_ms / 1000:.0f}s" if fence.lock_ttl_ms else ""
        msg = (
            f"another driver took over namespace {ns!r}: {who}, while this one (generation "
            f"{fence.generation}) was paused or cut off for longer than its lock's{ttl} TTL; "
            f"{stopped}"
        )
        return Superseded(msg)
    if refusal.partition >= 0 and refusal.found.startswith("generation"):
        what = (
            f"partition {refusal.partition} is back at {refusal.found} (-1: its progress is "
            f"gone), but this run is {refusal.expected}"
        )
    elif refusal.partition >= 0:
        what = (
            f"partition {refusal.partition} is at epoch {refusal.found}, but this driver saw "
            f"it commit through epoch {refusal.expected}"
        )
    elif refusal.partition == -5:
        what = (
            f"the namespace is back at {counted(int(refusal.found), 'partition')}, but this "
            f"run moved it to {refusal.expected} (the rescale at its start is gone)"
        )
    elif refusal.partition == -3:
        what = (
            f"the namespace is back at generation {refusal.found}, but this run is "
            f"generation {refusal.expected}"
        )
    else:
        what = (
            f"the namespace's committed epoch is back at {refusal.found}, but this driver "
            f"recorded epoch {refusal.expected}"
        )
    msg = f"Redis came back with less than it acknowledged ({LOSS_CAUSES}): {what}; {stopped}"
    return RedisLostData(msg)


def check_consistency(
    r: Redis,
    keys: Keys,
    floors: tuple[int, ...] | None,
    start: int,
    evicted: int = 0,
    *,
    torn: bool = False,
) -> None:
    """Refuse to start a run at epoch ``start`` on data that Redis no longer fully holds.

    Each partition must have applied at least through ``min(floor, start - 1)``:
    what it had applied when the committed epoch was recorded. (Whether its undo
    history is complete cannot be told from its presence: a batch whose events
    were all rejected commits progress without an undo record.)

    Raises:
        RedisLostData: a partition is behind what the namespace recorded, or the
            server evicted keys during an earlier run.
        TornWrite: meta (``torn``) or a partition holds part of a transaction.
    """
    if torn:
        raise TornWrite(torn_message("the namespace's meta"))
    if evicted:
        msg = (
            f"the Redis server evicted {counted(evicted, 'key')} during an earlier run of "
            f"namespace {keys.namespace!r}: its state may be incomplete in ways a resume "
            f"cannot see; start over with 'reset' (and run Redis with maxmemory-policy noeviction)"
        )
        raise RedisLostData(msg)
    if floors is None:
        return  # recorded by a version that kept no floors
    # (a partition that holds part of a transaction raises TornWrite here)
    for p, applied in enumerate(applied_epochs(r, keys, len(floors))):
        if applied >= min(floors[p], start - 1):
            continue
        msg = (
            f"Redis lost data of namespace {keys.namespace!r} ({LOSS_CAUSES}): partition {p} "
            f"is at epoch {applied}, but it had applied through {floors[p]}; starting at epoch "
            f"{start} would skip events. Replay from epoch {applied + 1} or earlier if its "
            f"history is kept ('orchestrator replay FILE --from-epoch N'), or start over "
            f"with 'reset'"
        )
        raise RedisLostData(msg)


def eviction_problem(r: Redis, allow: str = "pass --allow-eviction") -> str | None:
    """What is wrong with the server's eviction policy for this pipeline, if anything
    (``allow``: how the caller's user runs anyway)."""
    try:
        policy = server_config(r, "maxmemory-policy") or "noeviction"
    except redis.ResponseError:
        return None  # CONFIG disabled: nothing to check (the persistence warning says so)
    if policy == "noeviction":
        return None
    return (
        f"the Redis server runs with maxmemory-policy {policy}: it may evict the pipeline's "
        f"keys (state, progress, queued batches) under memory pressure, which loses data "
        f"silently; set maxmemory-policy noeviction, or {allow} to run anyway"
    )


class EvictionWatch:
    """Stops a run as soon as the server evicts keys (possible only under --allow-eviction,
    or if someone changes maxmemory-policy during the run)."""

    EVERY = 1.0  # seconds between two looks at the server's eviction counter

    def __init__(self, r: Redis, keys: Keys) -> None:
        self.r, self.keys = r, keys
        self.baseline = self._evicted()
        self._looked_at = time.monotonic()

    def _evicted(self) -> int:
        try:
            return int(self.r.info("stats").get("evicted_keys", 0))
        except redis.ResponseError:
            return 0  # INFO disabled: nothing to watch

    def check(self, *, now: bool = False) -> None:
        """Raise if the server evicted any key since the run started (looks once a second,
        or at once with ``now``).

        Raises:
            RedisLostData: keys were evicted; some may be the pipeline's.
        """
        at = time.monotonic()
        if not now and at - self._looked_at < self.EVERY:
            return
        self._looked_at = at
        evicted = self._evicted() - self.baseline
        if evicted > 0:
            # Marked, so that no later run builds on what may be left (check_consistency).
            self.r.hset(self.keys.meta, "evicted_keys", evicted)
            msg = (
                f"the Redis server evicted {counted(evicted, 'key')} during the run (its "
                f"maxmemory-policy allows it); some may be the pipeline's state or progress, "
                f"so this driver stopped without writing anything more"
            )
            raise RedisLostData(msg)
