"""The records that cross the driver/worker boundary: a batch of events and its commit notice."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

OnError = Literal["fail", "skip", "dead-letter"]


@dataclass(frozen=True)
class Batch:
    """Events of one partition for epochs ``after_epoch + 1 .. last_epoch``, sent as one RQ job.

    ``after_epoch`` is what the partition must have applied before this batch:
    the commit refuses the batch otherwise, which keeps a partition's batches in order.
    """

    namespace: str
    generation: int
    partition: int
    after_epoch: int
    last_epoch: int
    flow: str
    on_error: OnError
    # (epoch, key, value) in epoch order
    events: list[tuple[int, str, Any]]

    def encode(self) -> str:
        """Encode as one JSON string (RQ's JSON serializer then carries it as a single argument)."""
        return orjson.dumps(
            [
                self.namespace,
                self.generation,
                self.partition,
                self.after_epoch,
                self.last_epoch,
                self.flow,
                self.on_error,
                self.events,
            ]
        ).decode()

    @classmethod
    def decode(cls, payload: str) -> Batch:
        """Decode a payload made by ``encode``."""
        ns, gen, part, after, last, flow, on_error, events = orjson.loads(payload)
        return cls(ns, gen, part, after, last, flow, on_error, [tuple(e) for e in events])


@dataclass(frozen=True)
class Rejection:
    """An event the flow rejected on a worker, with the reason."""

    epoch: int
    key: str
    reason: str


@dataclass(frozen=True)
class CommitNotice:
    """What a committed batch tells the driver: its partition, how far it applied, its output.

    Written in the same atomic operation as the state, so a committed batch's
    output lines cannot be lost while the driver runs.
    """

    partition: int
    applied_through: int
    lines: list[tuple[int, str]] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    # set when on_error=fail stopped the batch at this event
    failed: Rejection | None = None

    def encode(self) -> bytes:
        """Encode as compact JSON."""
        return orjson.dumps(
            {
                "p": self.partition,
                "through": self.applied_through,
                "lines": self.lines,
                "rejected": [[r.epoch, r.key, r.reason] for r in self.rejected],
                "failed": None
                if self.failed is None
                else [self.failed.epoch, self.failed.key, self.failed.reason],
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> CommitNotice:
        """Decode a notice made by ``encode``."""
        d = orjson.loads(data)
        failed = d["failed"]
        return cls(
            partition=d["p"],
            applied_through=d["through"],
            lines=[(e, line) for e, line in d["lines"]],
            rejected=[Rejection(*r) for r in d["rejected"]],
            failed=None if failed is None else Rejection(*failed),
        )
