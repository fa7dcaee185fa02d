"""Undo records: what restores a partition as of any epoch of a committed batch.

One record per committed batch (a member of the partition's undo sorted set,
scored by the batch's last epoch). It gives, for each event the flow applied
(rejected events are not in it), the state its key had before the event.

Version 2 (written today) stores a key's state once per batch, not once per
event: a hot key with N events has a state of size ~N, so one image per event
made the history grow as N². Its bytes are a JSON header
``[2, [epoch, ...], [key, ...], [step, ...]]``, a newline, and the stored
images one per line, as the JSON the state hash held (an empty line for a key
that had no state). ``step`` says where an event's before-image comes from:

- ``0``: the next stored image (always so for a key's first event in the batch);
- ``[value, crc]``: re-derived by running the flow's stateful step on the
  previous event of the same key, whose value (what the mapper got) is
  ``value``, from that event's before-image: ``builder(key)`` if it had none,
  else the JSON decoded; the result encoded as apply encodes it. The flow is
  deterministic (the workers already rely on it to re-run its first steps), so
  this gives the bytes the state hash held; ``crc`` (their CRC-32) turns a flow
  changed since into a refusal rather than a wrong state.

A value is stored only if a JSON round trip gives it back equal (no tuple,
set, subclass of a builtin, NaN...) and the mapper did not change it in place;
otherwise the next event of the key stores its image. Records of version 1
(``[[epoch, ...], [key, ...]]``, then one image per event) are still read.

The stored images are never decoded or re-encoded on the way: they are the
exact bytes to put back. A state's JSON holds no raw newline (states are
written by ``orjson.dumps``, which escapes control characters).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import orjson

from tasks.errors import FlowError
from tasks.flow import Dataflow

# A stored state as JSON bytes, or None when the key has no state.
Raw = bytes | None

# Values that would not come back as they were (a subclass of a builtin, a dataclass,
# a datetime) are refused by orjson with these options rather than written as JSON.
VALUE_OPTIONS = (
    orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
)

# Where each event's before-image comes from (``steps`` of ``encode_undo``): IMAGE, or
# the JSON of the value of the key's previous event in the record.
IMAGE = b"0"

# Loads the namespace's flow, only when a record needs it.
FlowSource = Callable[[], Dataflow]


def encode_undo(epochs: list[int], keys: list[str], befores: list[Raw]) -> bytes:
    """A version-1 record of events ``(epochs[i], keys[i])`` whose states were ``befores[i]``.

    Every event has its image: what tests compare version 2 against.
    """
    body = b"\n".join([b"" if b is None else b for b in befores])
    return orjson.dumps([epochs, keys]) + b"\n" + body


def encode_undo_v2(
    epochs: list[int], keys: list[str], steps: list[bytes], images: list[Raw]
) -> bytes:
    """A version-2 record: ``steps[i]`` is IMAGE or ``[value, crc]`` as JSON."""
    header = b"[2,%b,%b,[%b]]" % (orjson.dumps(epochs), orjson.dumps(keys), b",".join(steps))
    return header + b"\n" + b"\n".join([b"" if b is None else b for b in images])


class _Record:
    """A record's header and images, parsed once."""

    def __init__(self, record: bytes) -> None:
        header, _, body = record.partition(b"\n")
        fields = orjson.loads(header)
        if fields and fields[0] == 2:
            _, self.epochs, self.keys, self.steps = fields
            self.version = 2
        else:
            self.epochs, self.keys = fields
            self.steps = [0] * len(self.epochs)
            self.version = 1
        self.images: list[bytes] = body.split(b"\n") if self.epochs else []


def decode_undo(record: bytes, flow: FlowSource | None = None) -> Iterator[tuple[int, str, Raw]]:
    """``(epoch, key, state before the event)`` of every event of a record, in epoch order.

    Each re-derived state is computed when its event is reached (``flow`` is
    called at most once, at the first state to re-derive).
    """
    yield from _events(_Record(record), flow)


def first_befores_after(
    record: bytes, epoch: int, flow: FlowSource | None = None, only: str | None = None
) -> dict[str, Raw]:
    """The state each key had before its first event after ``epoch`` in this record.

    Re-derives only what it needs: a key's states up to that event (``only``:
    that key alone). A record whose events are all after ``epoch`` needs no
    flow, since a key's first event in a record has its image.
    """
    found: dict[str, Raw] = {}
    for e, key, before in _events(_Record(record), flow, skip=found, only=only):
        if e > epoch:
            found[key] = before
    return found


_FIRST_EPOCH = re.compile(rb"\[(?:2,)?\[(-?\d+)")


def first_epoch(record: bytes) -> int | None:
    """The epoch of the record's first event (None if it has none), without parsing it."""
    found = _FIRST_EPOCH.match(record)
    return None if found is None else int(found.group(1))


def truncate_undo(record: bytes, epoch: int) -> bytes | None:
    """The record's part for the events up to ``epoch`` (None if none is), in its own version."""
    rec = _Record(record)
    n = sum(1 for e in rec.epochs if e <= epoch)  # the events are in epoch order
    if n == 0:
        return None
    if rec.version == 1:
        return encode_undo(rec.epochs[:n], rec.keys[:n], [b or None for b in rec.images[:n]])
    steps = [IMAGE if s == 0 else orjson.dumps(s, option=VALUE_OPTIONS) for s in rec.steps[:n]]
    images = [b or None for b in rec.images[: steps.count(IMAGE)]]
    return encode_undo_v2(rec.epochs[:n], rec.keys[:n], steps, images)


def split_undo(record: bytes, partition_of: Callable[[bytes], int]) -> dict[int, bytes]:
    """The record's events grouped by the partition of their key (given its UTF-8 bytes), each
    group a record of the same version: what a rescale moves (orchestrator/rescale.py).

    A key's events stay together and in order, so each re-derived state still follows
    its key's previous event; a record whose keys all go to one partition is kept as it is.
    """
    rec = _Record(record)
    owner = {key: partition_of(key.encode("utf-8", "surrogatepass")) for key in set(rec.keys)}
    if len(set(owner.values())) <= 1:
        return {owner[rec.keys[0]]: record} if rec.keys else {}
    groups: dict[int, tuple[list[int], list[str], list[bytes], list[Raw]]] = {}
    images = iter(rec.images)
    for epoch, key, step in zip(rec.epochs, rec.keys, rec.steps, strict=True):
        epochs, group_keys, steps, group_images = groups.setdefault(owner[key], ([], [], [], []))
        epochs.append(epoch)
        group_keys.append(key)
        if step == 0:
            steps.append(IMAGE)
            group_images.append(next(images) or None)
        else:
            steps.append(orjson.dumps(step, option=VALUE_OPTIONS))
    if rec.version == 1:
        return {q: encode_undo(g[0], g[1], g[3]) for q, g in groups.items()}
    return {q: encode_undo_v2(*g) for q, g in groups.items()}


def _events(
    rec: _Record,
    flow: FlowSource | None,
    skip: dict[str, Raw] | None = None,
    only: str | None = None,
) -> Iterator[tuple[int, str, Raw]]:
    """The record's events with their before-images; keys in ``skip`` are passed over."""
    images = iter(rec.images)
    current: dict[str, Raw] = {}  # key -> the before-image of its last event so far
    mapper: Any = None
    builder: Any = None
    for epoch, key, step in zip(rec.epochs, rec.keys, rec.steps, strict=True):
        if step == 0:
            image = next(images)
            before: Raw = image or None
        if (skip is not None and key in skip) or (only is not None and key != only):
            continue
        if step != 0:
            if mapper is None:
                if flow is None:
                    msg = "this undo record re-derives states: it needs the namespace's flow"
                    raise FlowError(msg)
                stateful = flow().split()[1]
                mapper, builder = stateful.mapper, stateful.builder
            previous = current[key]
            state = builder(key) if previous is None else orjson.loads(previous)
            new_state, _ = mapper(state, step[0])
            before = None if new_state is None else orjson.dumps(new_state)
            if zlib.crc32(before or b"") != step[1]:
                msg = (
                    f"the flow no longer gives the state key {key!r} had before epoch {epoch} "
                    "(was it changed since that epoch was processed?): restore the flow it ran with"
                )
                raise FlowError(msg)
        current[key] = before
        yield epoch, key, before
