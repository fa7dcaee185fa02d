"""The namespace's stored facts (partitions, flow, committed epoch) and what a run does to them."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from redis import Redis

from orchestrator.fence import EvictionWatch, Fence, refusal_error
from orchestrator.output import OutputStream, wrong_stream_type
from orchestrator.reader import Input, PipeInput, fingerprint
from orchestrator.rescale import STAGED, STEPS, drop_staged, rescale
from orchestrator.settings import DEFAULT_PARTITIONS
from tasks import scripts
from tasks.errors import NamespaceError, Superseded, TornWrite
from tasks.flow import Dataflow
from tasks.keys import LEGACY_SLOTS, SLOTS, Keys, Layout
from tasks.rqcompat import RQ_QUEUES_SET, partition_queues, register_queues
from tasks.store import NOTHING, TORN, applied_epochs, restore_partition, torn_message

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NamespaceInfo:
    """What the namespace's meta hash says."""

    partitions: int | None
    flow: str | None
    generation: int
    committed: int  # the last committed epoch, or -1
    offset: int  # byte offset in the input of line committed + 1
    input: str | None
    output: str | None = None  # the --output file of the runs, if any
    output_length: int | None = None  # its length once the committed epochs are in it
    retained_from: int = 0  # the oldest epoch replay can start at
    read_epoch: int | None = None  # the last epoch the driver read
    events_per_s: float | None = None  # of the last run, as it went
    # Committed by the partitions, in the last run (for status): events, their rate, and the
    # epoch that run started at; ``at`` is when the last record was written (Unix time).
    committed_events: int | None = None
    committed_events_per_s: float | None = None
    run_first_epoch: int | None = None
    at: float | None = None
    retain_epochs: int | None = None
    fingerprint: str | None = None  # of the input's first fingerprint_end bytes
    fingerprint_end: int = 0
    # sha256 of every byte of the input before prefix_end (recorded by runs that read a pipe)
    prefix_sha256: str | None = None
    prefix_end: int = 0
    # For each partition, the epoch through which it had applied when ``committed`` was
    # recorded (capped at ``committed``): Redis must hold at least that much of each.
    floors: tuple[int, ...] | None = None
    evicted_keys: int = 0  # keys the server evicted during a run (--allow-eviction)
    torn: bool = False  # meta holds part of a transaction (tasks/store.py TORN)
    # (epoch, offset) of a committed last line that had no newline: resume reads it again
    open_line: tuple[int, int] | None = None
    # a Redis stream input's committed position (``ID:INDEX``, streamsource.Position)
    source_position: str | None = None
    # the slots the keys hash into (tasks/keys.py); LEGACY_SLOTS for a namespace made before
    # slots existed, SLOTS for one that does not exist yet
    slots: int = SLOTS
    # whether its partitions' keys have hash tags (tasks/keys.py): not in one made before them
    tagged: bool = True
    # a rescale under way, or killed before its last step: (its run's generation, the
    # partition count it moves to, the steps it staged) (orchestrator/rescale.py)
    staged_rescale: tuple[int, int, int] | None = None

    @property
    def layout(self) -> Layout | None:
        """How the namespace spreads its keys now (None: it does not exist)."""
        if self.partitions is None:
            return None
        return Layout(self.partitions, self.slots, self.tagged)

    @property
    def exists(self) -> bool:
        """Whether a run has ever started on the namespace."""
        return self.partitions is not None


_N = TypeVar("_N", int, float)


def read_info(r: Redis, keys: Keys) -> NamespaceInfo:
    """Read the namespace's meta hash (one round trip)."""
    raw = cast("dict[bytes, bytes]", r.hgetall(keys.meta))
    meta = {k.decode(): v.decode() for k, v in raw.items()}
    return NamespaceInfo(
        partitions=int(meta["partitions"]) if "partitions" in meta else None,
        flow=meta.get("flow"),
        generation=int(meta.get("generation", 0)),
        committed=int(meta.get("committed", NOTHING)),
        offset=int(meta.get("offset", 0)),
        input=meta.get("input"),
        output=meta.get("output"),
        output_length=int(meta["output_length"]) if "output_length" in meta else None,
        retained_from=int(meta.get("retained_from", 0)),
        read_epoch=int(meta["read_epoch"]) if "read_epoch" in meta else None,
        events_per_s=float(meta["events_per_s"]) if "events_per_s" in meta else None,
        retain_epochs=int(meta["retain_epochs"]) if "retain_epochs" in meta else None,
        committed_events=_number(meta, "committed_events", int),
        committed_events_per_s=_number(meta, "committed_events_per_s", float),
        run_first_epoch=_number(meta, "run_first_epoch", int),
        at=_number(meta, "at", float),
        fingerprint=meta.get("fingerprint") or None,
        fingerprint_end=int(meta.get("fingerprint_end", 0)),
        prefix_sha256=meta.get("prefix_sha256") or None,
        prefix_end=int(meta.get("prefix_end", 0)),
        floors=tuple(json.loads(meta["floors"])) if "floors" in meta else None,
        evicted_keys=int(meta.get("evicted_keys", 0)),
        torn=int(meta.get(TORN, 0)) != 0,
        open_line=_epoch_offset(meta.get("open_line")),
        source_position=meta.get("source_position") or None,
        slots=int(meta.get("slots", LEGACY_SLOTS if "partitions" in meta else SLOTS)),
        tagged=meta.get("hash_tags", "0" if "partitions" in meta else "1") == "1",
        staged_rescale=_staged(meta),
    )


def _staged(meta: dict[str, str]) -> tuple[int, int, int] | None:
    if STAGED not in meta:
        return None
    generation, _, partitions = meta[STAGED].partition(":")
    return int(generation), int(partitions), int(meta.get(STEPS, 0))


def _number(meta: dict[str, str], field: str, kind: type[_N]) -> _N | None:
    return kind(meta[field]) if field in meta else None


def _epoch_offset(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    epoch, _, offset = text.partition(":")
    return int(epoch), int(offset)


def check_compatible(info: NamespaceInfo, partitions: int | None, flow: str | None) -> int:
    """Return the partition count the run ends with (``--partitions``, else the namespace's:
    a different one than the namespace has is a rescale, done by ``start_run``); refuse a
    flow that contradicts the stored one.

    Raises:
        NamespaceError: a different flow than the namespace was created with.
    """
    if info.partitions is None:
        return partitions or DEFAULT_PARTITIONS
    if flow is not None and info.flow is not None and info.flow != flow:
        msg = (
            f"--flow {flow} does not match the namespace's flow {info.flow}; "
            f"use a different --namespace, or 'reset --yes' to start over"
        )
        raise NamespaceError(msg)
    return partitions or info.partitions


def run_layout(info: NamespaceInfo, partitions: int) -> Layout:
    """How a run that ends with ``partitions`` spreads the keys: the namespace's layout, or
    (a new namespace, a rescale, or a namespace made before slots or hash tags) ``partitions``
    owning ranges of SLOTS, with hash-tagged key names."""
    if info.partitions == partitions and info.tagged:
        return Layout(partitions, info.slots)
    return Layout(partitions, SLOTS)


def start_run(
    r: Redis,
    keys: Keys,
    *,
    token: str,
    lock_ttl_ms: int,
    info: NamespaceInfo,
    partitions: int,
    flow: str,
    input_name: str,
    start_epoch: int,
    start_offset: int,
    output: str | None = None,
    output_length: int | None = None,
    output_stream: OutputStream | None = None,
    source_fields: SourceFields | None = None,
    dataflow: Dataflow | None = None,  # the flow object, when its name cannot be imported
) -> Fence:
    """Take over the namespace for a run that processes input from ``start_epoch`` on.

    Takes the next generation and claims every partition for it in one script,
    refused if another driver started a run since ``info`` was read; batches of
    an earlier (killed or paused) run can then no longer commit. Records the
    committed epoch ``start_epoch - 1`` before restoring every partition as of
    it (a crash in between leaves a record that the restore can be done again
    from), then rescales the namespace if ``partitions`` is not its partition
    count (``orchestrator/rescale.py``), then drops stale jobs and the notices and
    batches of older runs.

    Returns:
        The fence of the run's writes (its generation and the lock token).

    Raises:
        Superseded: another driver started a run on the namespace meanwhile.
        TornWrite: the namespace holds part of a transaction.
    """
    if info.torn:
        raise TornWrite(torn_message("the namespace's meta"))
    # Until a rescale (below) moves them, the keys stay where, and as, the namespace has them.
    current = info.layout or run_layout(info, partitions)
    now = Keys(keys.namespace, current.tagged)
    meta: dict[str, Any] = {"partitions": current.partitions, "flow": flow, "input": input_name}
    if info.partitions is None:
        meta.update(slots=current.slots, hash_tags=1)
    if output is not None:
        meta["output"] = output
    applied = applied_epochs(r, now, current.partitions)
    generation = scripts.start_run(
        r, now, token=token, lock_ttl_ms=lock_ttl_ms, planned_generation=info.generation,
        partitions=current.partitions, start_epoch=start_epoch, meta=meta,
    )  # fmt: skip
    if isinstance(generation, str):
        msg = f"another driver started a run on namespace {keys.namespace!r} ({generation})"
        raise Superseded(msg)
    fence = Fence(generation, token, lock_ttl_ms)
    committer = Committer(
        r, now, current.partitions, fence, last_committed=info.committed,
        output_stream=output_stream, source_fields=source_fields,
    )  # fmt: skip
    committer.record(
        start_epoch - 1,
        start_offset,
        [],
        output_length=output_length,
        floors=[min(a, start_epoch - 1) for a in applied],
    )
    for p in range(current.partitions):
        restore_partition(r, now, p, start_epoch - 1, generation=generation, flow=dataflow)
    target = run_layout(info, partitions)
    if target != current:
        # (the run's own clean-up below finds only what its new names match)
        leftovers = [] if now == keys else _run_keys(r, now, lambda g: g < generation)
        rescale(
            r, keys, generation=generation, source=current, target=target,
            epoch=start_epoch - 1, leftovers=leftovers,
        )  # fmt: skip
    elif info.staged_rescale:  # (a rescale killed, or superseded, before its last step)
        drop_staged(r, keys)
    queues = partition_queues(r, keys, partitions)
    for queue in queues:
        queue.empty()
    register_queues(r, queues)
    # Only older runs' keys: a driver paused here must not delete a newer run's notices.
    stale = _run_keys(r, keys, lambda g: g < generation)
    if stale:
        r.delete(*stale)
    logger.info("generation %d starts at epoch %d (byte %d)", generation, start_epoch, start_offset)
    return fence


def forget_generation(r: Redis, keys: Keys, generation: int) -> int:
    """Delete the notices, stored batches and staged successors of one run's generation.

    Returns:
        The number of keys deleted.
    """
    doomed = _run_keys(r, keys, lambda g: g == generation)
    return int(r.delete(*doomed)) if doomed else 0


def _run_keys(r: Redis, keys: Keys, which: Callable[[int], bool]) -> list[bytes]:
    """The notice streams, stored batches and staged successors of the generations ``which``
    accepts."""
    return [
        key
        for pattern in (keys.notices_pattern, keys.batches_pattern, keys.successors_pattern)
        for key in r.scan_iter(match=pattern, count=1000)
        if (g := keys.generation_of(key.decode())) is not None and which(g)
    ]


# What identifies the input before the committed offset, recorded with it: called with
# (the committed offset, the offset a resume starts at, whether a costly one is due: at
# most once a second, and at the end), it gives meta fields. Each kind clears the other's:
# the namespace's input is described by the last run's.
SourceFields = Callable[[int, int, bool], dict[str, Any]]


def source_fields(f: Input) -> SourceFields:
    """A file's sampled fingerprint (once a second); a pipe's sha256 of every byte before the
    resume point (each record: it costs only the bytes since the last)."""
    if isinstance(f, PipeInput):
        pipe = f

        def hashed(offset: int, resume_at: int, due: bool) -> dict[str, Any]:
            return {
                "prefix_sha256": pipe.hash_at(resume_at),
                "prefix_end": resume_at,
                "fingerprint": "",
            }

        return hashed

    def sampled(offset: int, resume_at: int, due: bool) -> dict[str, Any]:
        if not due:
            return {}
        return {
            "fingerprint": fingerprint(f, offset),
            "fingerprint_end": offset,
            "prefix_sha256": "",
        }

    return sampled


class Committer:
    """Records the namespace's committed epoch, and what goes with it, fenced.

    One script call per record (``tasks/lua/record_progress.lua``): the committed
    epoch and the input offset after it, the floors (how far each partition had
    applied), a checkpoint for replay, the dead letters of the epochs it covers,
    and (at most once a second) a fingerprint of the input before that offset;
    every few seconds it also drops undo records older than the retention window.
    With an output stream, the lines of the epochs it commits are added to the stream by
    the same script, so the stream has them if and only if the record says they are
    committed: exactly once across crashes.
    It writes nothing, and raises, unless the run is still this driver's and
    Redis still holds the committed epoch it recorded last and every commit the
    driver saw.
    """

    FINGERPRINT_EVERY = 1.0
    GC_EVERY = 5.0

    def __init__(
        self,
        r: Redis,
        keys: Keys,
        partitions: int,
        fence: Fence,
        *,
        last_committed: int,
        input_path: str | None = None,
        retain_epochs: int | None = None,
        evictions: EvictionWatch | None = None,
        output_stream: OutputStream | None = None,
        source_fields: SourceFields | None = None,
    ) -> None:
        self.r, self.keys, self.partitions, self.fence = r, keys, partitions, fence
        self.output_stream = output_stream
        self.evictions = evictions
        self.last_committed = last_committed
        self.input_path = input_path
        self.source_fields = source_fields
        self.retain_epochs = retain_epochs
        self._fingerprinted_at = float("-inf")
        self._collected_at = time.monotonic()
        self.retained_from: int | None = None  # the retention window's start, last recorded

    def record(
        self,
        committed: int,
        offset: int,
        dead: list[Any],
        *,
        floors: list[int],
        output_length: int | None = None,
        progress: dict[str, Any] | None = None,
        open_line: tuple[int, int] | None = None,
        final: bool = False,
    ) -> None:
        """Record that every epoch up to ``committed`` is committed and its output written.

        ``output_length`` is the length of the output file once those lines are in
        it (and synced): a resume truncates the file back to it. ``open_line`` is the
        (epoch, offset) of a committed last line that had no newline: a resume starts
        again at it. ``floors`` is, for
        each partition, the epoch through which the driver saw it commit.

        Raises:
            Superseded: another driver run owns the namespace now.
            RedisLostData: Redis no longer holds what the driver saw committed.
        """
        if self.evictions is not None:
            self.evictions.check(now=final)  # the last record always looks
        now = time.monotonic()
        fields: dict[str, Any] = {"committed": committed, "offset": offset, "at": time.time()}
        fields["floors"] = json.dumps([min(f, committed) for f in floors])
        fields["open_line"] = "" if open_line is None else f"{open_line[0]}:{open_line[1]}"
        if output_length is not None:
            fields["output_length"] = output_length
        if self.retain_epochs is not None:
            fields["retain_epochs"] = self.retain_epochs
        backlog = None
        if progress is not None:  # for status: how far the driver read, how fast, what waits
            backlog = progress.pop("backlog")
            fields |= progress
        if self.source_fields is not None:
            due = final or now - self._fingerprinted_at >= self.FINGERPRINT_EVERY
            resume_at = offset if open_line is None else open_line[1]
            fields |= self.source_fields(offset, resume_at, due)
            if due:
                self._fingerprinted_at = now
        retained_from = None
        if self.retain_epochs is not None and (final or now - self._collected_at >= self.GC_EVERY):
            self._collected_at = now
            retained_from = max(0, committed + 1 - self.retain_epochs)
        # (a stream input's position goes with the checkpoint: replay reads on from there)
        checkpoint = Checkpoint(committed + 1, offset, output_length, fields.get("source_position"))
        stream = self.output_stream
        entries = None
        if stream is not None:  # (the held lines are of epochs up to committed)
            held = tuple(stream.take())
            entries = scripts.StreamEntries(stream.key, committed, held, stream.maxlen)
        refusal = scripts.record_progress(
            self.r,
            self.keys,
            generation=self.fence.generation,
            token=self.fence.token,
            lock_ttl_ms=self.fence.lock_ttl_ms,
            last_committed=self.last_committed,
            floors=floors,
            record=scripts.ProgressRecord(
                meta=fields,
                checkpoint=(checkpoint.member, committed + 1),
                backlog=backlog,
                dead_letters=tuple(self._dead_letter(bad) for bad in dead),
                retained_from=retained_from,
                output_stream=entries,
            ),
        )
        if refusal is not None and refusal.code == "wrongtype" and stream is not None:
            raise wrong_stream_type(stream.name, refusal.found)
        if refusal is not None:
            raise refusal_error(refusal, self.keys, self.fence)
        self.last_committed = committed
        if retained_from is not None:
            self.retained_from = retained_from

    def _dead_letter(self, bad: Any) -> dict[str, Any]:
        return {
            "epoch": bad.epoch,
            "line": bad.line_number,
            "input": self.input_path or "",
            "reason": bad.reason,
            "raw": bad.raw,
        }


@dataclass(frozen=True)
class Checkpoint:
    """Where epoch ``epoch`` starts: its byte offset in the input and in the output file."""

    epoch: int
    offset: int
    output_length: int | None  # None: no output file was recorded
    # a Redis stream input's position before the epoch (``ID:INDEX``, streamsource.Position)
    source_position: str | None = None

    @property
    def member(self) -> str:
        """Its member in the checkpoints sorted set (scored by epoch)."""
        out = -1 if self.output_length is None else self.output_length
        source = "" if self.source_position is None else f":{self.source_position}"
        return f"{self.epoch}:{self.offset}:{out}{source}"


def checkpoint_at_or_before(r: Redis, keys: Keys, epoch: int) -> Checkpoint:
    """The nearest recorded checkpoint at or before ``epoch`` (the start of the input if none)."""
    found = cast("list[bytes]", r.zrevrangebyscore(keys.checkpoints, epoch, "-inf", start=0, num=1))
    if not found:
        return Checkpoint(0, 0, 0)
    e, offset, out, *source = found[0].decode().split(":", 3)
    position = source[0] if source else None
    return Checkpoint(int(e), int(offset), None if int(out) < 0 else int(out), position)


def reset(r: Redis, keys: Keys) -> int:
    """Delete every key of the namespace, its RQ queues and its RQ jobs, and nothing else.

    Keys are matched by their exact shape (``Keys.owns``), never by a bare prefix:
    namespace ``orders`` must not touch the queues of namespace ``orders-prod``.

    Returns:
        The number of keys deleted.
    """
    # RQ's set of all queues is shared: only this namespace's queues leave it.
    queues = [
        q for q in r.sscan_iter(RQ_QUEUES_SET, match=keys.queues_pattern)
        if keys.owns(q.decode())
    ]  # fmt: skip
    if queues:
        r.srem(RQ_QUEUES_SET, *queues)
    deleted = 0
    for pattern in (keys.pattern, keys.rq_pattern):
        batch: list[bytes] = []
        for key in r.scan_iter(match=pattern, count=1000):
            if not keys.owns(key.decode()):
                continue
            batch.append(key)
            if len(batch) >= 1000:
                deleted += int(r.delete(*batch))
                batch = []
        if batch:
            deleted += int(r.delete(*batch))
    return deleted


def require_committed(info: NamespaceInfo, keys: Keys) -> None:
    """Refuse a command that needs committed epochs on an empty namespace."""
    if info.committed == NOTHING:
        msg = (
            f"namespace {keys.namespace!r} has no committed epochs; run 'orchestrator ingest FILE'"
        )
        raise NamespaceError(msg)
