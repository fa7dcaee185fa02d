"""``run_main``: run a flow in the calling process, with the engine's commits and recovery.

The flow's functions run here (so functions defined in ``__main__`` work);
state, undo records and progress live in Redis exactly as with the
distributed engine, committed per batch in the same transaction. Outputs go to the
output handler in epoch order, after their batch has committed.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterable, Iterator
from copy import deepcopy
from dataclasses import replace
from pathlib import Path
from typing import Any

from redis import Redis

from orchestrator.fence import (
    LOSS_CAUSES,
    EvictionWatch,
    Fence,
    check_consistency,
    eviction_problem,
)
from orchestrator.lock import DriverLock
from orchestrator.namespace import Committer, check_compatible, read_info, start_run
from orchestrator.recovery import RedisRecoveryConfig
from orchestrator.server import EmbeddedServer, client_for, connect
from tasks.apply import AppliedBatch, apply_events
from tasks.errors import NamespaceError, PipelineError, RedisLostData, StaleGeneration
from tasks.flow import RUN_MAIN_FLOW, Dataflow, keyed, run_steps
from tasks.jobs import part_bytes
from tasks.keys import Keys
from tasks.store import (
    PROGRESS_FIELDS,
    CommitOutcome,
    CommitTarget,
    decode_progress,
    outcome_of,
    partition_transaction,
)

InputBuilder = Callable[[int, int], Iterable[tuple[int, Any]]]
OutputBuilder = Callable[[int, int], Callable[[tuple[int, Any]], Any]]

BATCH_EVENTS = 1_000
# A key's state of at least this many bytes of JSON is re-derived by the flow at restore
# time (tasks/undo.py) instead of stored before each of its events: an image per event
# made a hot key's replay history grow as N² (docs/performance.md, "Hot keys: run_main").
# A smaller state keeps every image, so a later run may go back with another flow object;
# going back over a large one needs a flow that gives the same states (else FlowError).
DERIVE_FROM_BYTES = 4096


@contextlib.contextmanager
def _redis(recovery_config: RedisRecoveryConfig | None) -> Iterator[tuple[Redis, Keys]]:
    if recovery_config is not None:
        with connect(recovery_config.settings()) as conn:
            yield conn.client, Keys(recovery_config.namespace)
        return
    # No recovery: a private server without persistence, gone after the call.
    with (
        tempfile.TemporaryDirectory(prefix="orchestrator-run-") as tmp,
        EmbeddedServer(Path(tmp), persistent=False) as url,
    ):
        client = client_for(url)
        try:
            yield client, Keys("run-main")
        finally:
            client.close()


def run_main(
    flow: Dataflow,
    input_builder: InputBuilder,
    output_builder: OutputBuilder,
    recovery_config: RedisRecoveryConfig | None = None,
) -> None:
    """Run ``flow`` over the items of ``input_builder``, in this process.

    Args:
        flow: the dataflow.
        input_builder: ``input_builder(worker_index, worker_count)`` yields
            ``(epoch, item)`` with epochs that never decrease.
        output_builder: ``output_builder(worker_index, worker_count)`` returns a
            function called with ``(epoch, item)`` for every output item, in epoch order.
        recovery_config: where to keep state across calls. With it, a run whose
            first epoch is N starts from the state as it was at the end of epoch
            N-1. Without it nothing is kept after the call.

    Raises:
        Exception: whatever the input builder, a step or the output handler
            raised, after every earlier epoch has been committed and delivered.
    """
    _, stateful, _ = flow.split()
    flow_id = f"{RUN_MAIN_FLOW}{stateful.step_id}"
    inputs = iter(input_builder(0, 1))
    first = next(inputs, None)
    if first is None:
        return
    with _redis(recovery_config) as (r, keys), DriverLock(r, keys) as lock:
        info = read_info(r, keys)
        try:
            check_compatible(info, 1, flow_id)
        except NamespaceError:
            msg = (
                f"recovery namespace {keys.namespace!r} holds another flow ({info.flow}, "
                f"{info.partitions} partitions): pass RedisRecoveryConfig(..., namespace=...)"
            )
            raise NamespaceError(msg) from None
        start = min(first[0], info.committed + 1)
        # What a resume of the CLI checks first (orchestrator/commands.py): a server that may
        # evict the state, and one that came back with less than the namespace recorded.
        allow = recovery_config is not None and recovery_config.allow_eviction
        problem = eviction_problem(r, allow="pass RedisRecoveryConfig(..., allow_eviction=True)")
        if problem is not None and not allow:
            raise NamespaceError(problem)
        check_consistency(r, Keys(keys.namespace, info.tagged), info.floors, start,
                          info.evicted_keys, torn=info.torn)  # fmt: skip
        if not info.exists and r.exists(keys.progress(0), keys.state(0), keys.undo(0)):
            msg = (
                f"namespace {keys.namespace!r} holds a partition's data but no record of its "
                f"runs: Redis lost part of it (evicted, or came back with less); nothing was "
                f"written; start over with a namespace of its own, or reset this one"
            )
            raise RedisLostData(msg)
        # (without a recovery config, the namespace is a private server's, new every time)
        new_from = None if recovery_config is None else recovery_config.first_epoch
        if not info.exists and new_from is not None and first[0] > new_from:
            msg = (
                f"recovery namespace {keys.namespace!r} has no record of earlier runs, but the "
                f"input starts at epoch {first[0]}: if runs came before, their state is gone "
                f"(Redis restarted empty, or the namespace was reset); nothing was written. If "
                f"this is its first run, pass RedisRecoveryConfig(..., first_epoch={first[0]})"
            )
            raise RedisLostData(msg)
        fence = start_run(
            r, keys, token=lock.token, lock_ttl_ms=lock.ttl_ms, info=info, partitions=1,
            flow=flow_id, input_name="run_main", start_epoch=start, start_offset=0,
            dataflow=flow,
        )  # fmt: skip
        runner = _Runner(r, keys, flow, fence, after=start - 1)
        runner.run(first, inputs, output_builder(0, 1))


class _Runner:
    """Reads items, commits them in batches of whole epochs, delivers outputs."""

    def __init__(self, r: Redis, keys: Keys, flow: Dataflow, fence: Fence, after: int) -> None:
        self.r, self.keys, self.flow, self.generation = r, keys, flow, fence.generation
        # (as the CLI's runs: stopped if the server evicts keys, possible under allow_eviction)
        self.evictions = EvictionWatch(r, keys)
        self.committer = Committer(
            r, keys, 1, fence, last_committed=after, evictions=self.evictions
        )
        self.before, self.stateful, _ = flow.split()
        self.after = after  # the last committed epoch
        self.events: list[tuple[int, str, Any]] = []
        self.max_bytes = part_bytes()
        self.read_through = after

    def run(
        self, first: tuple[int, Any], inputs: Iterator[tuple[int, Any]], output: Callable[..., Any]
    ) -> None:
        item: tuple[int, Any] | None = first
        while item is not None:
            epoch, value = _epoch_item(item, self.read_through)
            if epoch > self.read_through and len(self.events) >= BATCH_EVENTS:
                self._flush(self.read_through, output)
            try:
                events = [keyed(self.stateful, x) for x in run_steps(self.before, value)]
            except Exception:
                self._flush(epoch - 1, output)  # commit and deliver what came before it
                raise
            self.events += [(epoch, k, v) for k, v in events]
            self.read_through = epoch
            try:
                item = next(inputs, None)
            except Exception:
                self._flush(self.read_through, output)
                raise
        self._flush(self.read_through, output)

    def _flush(self, through: int, output: Callable[..., Any]) -> None:
        """Commit and deliver the events up to ``through``, in parts bounded by bytes."""
        events = [e for e in self.events if e[0] <= through]
        self.events = self.events[len(events) :]
        start = 0
        while through > self.after:
            while start < len(events) and events[start][0] <= self.after:
                start += 1  # (committed by the part before)
            applied = self._commit(events[start:], through)
            self._deliver(applied, output)
            if applied.failed_exception is not None:
                raise applied.failed_exception
            if not applied.more:
                return

    def _commit(self, events: list[tuple[int, str, Any]], through: int) -> AppliedBatch:
        """Apply and commit events after ``self.after``, through ``through`` or, once the
        commit carries ``max_bytes``, through the end of that epoch (``more`` is then set)."""
        wanted = list(dict.fromkeys(key for _, key, _ in events))
        target = CommitTarget(self.keys, self.generation, 0, self.after, through)
        with partition_transaction(self.r, self.keys, 0) as txn:
            loaded = txn.load(wanted)
            # (as a worker does: the WATCH only catches changes after the load, so a run that
            # was paused before it must see here that another run took the partition over)
            self._check_loaded(target, loaded.generation, loaded.applied)
            # Outputs are delivered after the commit: copy each one as it is emitted, since
            # a mapper may emit its state and change it again for a later event.
            applied = apply_events(
                self.flow, events, loaded.states, through, "fail",
                render=lambda e, x: (e, copy_output(x)),
                derive_from=DERIVE_FROM_BYTES,
                # (the bytes of the states, which a hot key's outputs follow: they are held
                # until the commit, as copies)
                max_bytes=self.max_bytes,
            )  # fmt: skip
            outcome = txn.commit(replace(target, part=applied.more), applied)
        if outcome is not CommitOutcome.COMMITTED:
            progress = self.r.hmget(self.keys.progress(0), PROGRESS_FIELDS)
            self._check_loaded(target, *decode_progress(progress))
            msg = f"namespace {self.keys.namespace!r} was taken over by another run"
            raise StaleGeneration(msg)  # (a progress that changed and came back)
        return applied

    def _check_loaded(self, target: CommitTarget, generation: int | None, applied: int) -> None:
        """Refuse to commit on a partition that is not where this run left it."""
        refused = outcome_of(target, generation, applied)
        if refused is None:
            return
        if refused is CommitOutcome.STALE:
            msg = (
                f"namespace {self.keys.namespace!r} was taken over by another run (generation "
                f"{generation}) while this one (generation {self.generation}) was paused or "
                f"cut off; this run stopped without writing anything more"
            )
            raise StaleGeneration(msg)
        msg = (
            f"Redis came back with less than it acknowledged ({LOSS_CAUSES}): partition 0 "
            f"is at epoch {applied}, but this run saw it commit through epoch {self.after}; "
            f"this run stopped without writing anything more"
        )
        raise RedisLostData(msg)

    def _deliver(self, applied: AppliedBatch, output: Callable[..., Any]) -> None:
        """Hand the committed outputs over, and record how far they went."""
        # (none made from states the server may have evicted: allow_eviction's promise)
        self.evictions.check(now=True)
        delivered = self.after  # every epoch up to this one is out
        try:
            for epoch, rendered in applied.outputs:
                delivered = epoch - 1
                output(rendered)
            delivered = applied.applied_through
        finally:
            # (an eviction during the handler's calls is named as such, and marked for the
            # next run, before the record can find some key of the run gone)
            self.evictions.check(now=True)
            self.committer.record(delivered, 0, [], floors=[applied.applied_through])
            self.after = delivered


_ATOMS = frozenset({str, int, float, bool, bytes, type(None)})


def copy_output(item: Any) -> Any:
    """A copy of an output that later changes to the objects it holds cannot reach: ``deepcopy``,
    with JSON-like values (dicts, lists and tuples of strings and numbers) copied by hand.

    (deepcopy was about a fifth of run_main's time: docs/performance.md, "Hot keys:
    run_main".) Objects shared inside one output come out as separate copies, equal to each
    other; a self-containing one goes to deepcopy.
    """
    try:
        return _copied(item)
    except RecursionError:
        return deepcopy(item)


def _copied(item: Any) -> Any:
    kind = type(item)
    if kind in _ATOMS:
        return item
    if kind is dict:
        copied = {}
        for key, value in item.items():
            if type(key) not in _ATOMS:  # (a key deepcopy would copy too)
                return deepcopy(item)
            copied[key] = _copied(value)
        return copied
    if kind is list:
        return [_copied(value) for value in item]
    if kind is tuple:
        return tuple([_copied(value) for value in item])
    return deepcopy(item)


def _epoch_item(item: Any, previous: int) -> tuple[int, Any]:
    if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], int)):
        msg = f"the input builder must yield (epoch, item) with an int epoch, got {item!r:.60}"
        raise TypeError(msg)
    if item[0] < previous:
        msg = f"epochs must not decrease: epoch {item[0]} came after epoch {previous}"
        raise PipelineError(msg)
    return item[0], item[1]
