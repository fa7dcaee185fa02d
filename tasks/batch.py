"""The records that cross the driver/worker boundary: a batch of input lines and its commit notice.

Both are a small JSON header, a newline, and raw lines joined by newlines: the
lines themselves (input lines in a batch, output lines in a notice) are never
JSON-encoded a second time, only split with ``bytes.split`` at the other end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from tasks.keys import LEGACY_SLOTS

OnError = Literal["fail", "skip", "dead-letter"]


def _frame(header: object, lines: list[bytes]) -> bytes:
    # orjson never writes a raw newline, so the first newline ends the header.
    return orjson.dumps(header) + b"\n" + b"\n".join(lines)


def _unframe(data: bytes) -> tuple[Any, list[bytes]]:
    header, _, body = data.partition(b"\n")
    return orjson.loads(header), body.split(b"\n")


@dataclass(frozen=True)
class Batch:
    """Input lines of one partition for epochs ``after_epoch + 1 .. last_epoch``: one RQ job.

    ``after_epoch`` is what the partition must have applied before this batch:
    the commit refuses the batch otherwise, which keeps a partition's batches in
    order. The lines are raw input (without their newline); the worker parses
    them and runs the flow's first steps again (they are deterministic), keeping
    the events whose key belongs to this partition.
    """

    namespace: str
    generation: int
    partition: int
    partitions: int  # of the namespace: a line's events can belong to several partitions
    after_epoch: int
    last_epoch: int
    flow: str
    on_error: OnError
    epochs: list[int]
    lines: list[bytes]
    # --batch-timeout: the longest the flow may run on one event of the batch (0: no limit)
    timeout: float = 0.0
    slots: int = LEGACY_SLOTS  # of the namespace (tasks/keys.py): with partitions, a key's owner

    def encode(self) -> bytes:
        """Encode for storage in Redis."""
        header = [
            self.namespace,
            self.generation,
            self.partition,
            self.partitions,
            self.after_epoch,
            self.last_epoch,
            self.flow,
            self.on_error,
            self.epochs,
            self.timeout,
            self.slots,
        ]
        return _frame(header, self.lines)

    @classmethod
    def decode(cls, data: bytes) -> Batch:
        """Decode a batch made by ``encode``."""
        header, lines = _unframe(data)
        ns, gen, part, parts, after, last, flow, on_error, epochs = header[:9]
        rest = header[9:]
        lines = lines if epochs else []
        timeout = rest[0] if rest else 0.0  # (a batch stored before the timeout existed)
        slots = rest[1] if len(rest) > 1 else LEGACY_SLOTS
        return cls(ns, gen, part, parts, after, last, flow, on_error, epochs, lines, timeout, slots)


@dataclass(frozen=True)
class Rejection:
    """An event the flow rejected on a worker, with the reason."""

    epoch: int
    key: str
    reason: str
    # what the flow did: "rejected" (raised), "timeout" (ran past --batch-timeout),
    # "killed" (its worker died on it, twice): the driver's advice differs
    kind: str = "rejected"


def _rejection(r: Rejection) -> list[object]:
    # A plain rejection keeps the three-field form older drivers read.
    fields: list[object] = [r.epoch, r.key, r.reason]
    return fields if r.kind == "rejected" else [*fields, r.kind]


@dataclass(frozen=True)
class CommitNotice:
    """What a committed batch tells the driver: its partition, how far it applied, its output.

    Written in the same atomic operation as the state, so a committed batch's
    output lines cannot be lost while the driver runs.
    """

    partition: int
    applied_through: int
    epochs: list[int] = field(default_factory=list)  # the epoch of each output line
    lines: list[bytes] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    # set when on_error=fail stopped the batch at this event
    failed: Rejection | None = None

    @staticmethod
    def encode_outputs(
        partition: int,
        applied_through: int,
        epochs: list[int],
        lines: list[str],
        rejected: list[Rejection],
        failed: Rejection | None,
    ) -> bytes:
        """Encode a notice from a batch's output lines and their epochs (one join, one encode)."""
        header = {
            "p": partition,
            "through": applied_through,
            "epochs": epochs,
            "rejected": [_rejection(r) for r in rejected],
            "failed": None if failed is None else _rejection(failed),
        }
        return orjson.dumps(header) + b"\n" + "\n".join(lines).encode()

    @classmethod
    def decode(cls, data: bytes) -> CommitNotice:
        """Decode a notice made by ``encode``."""
        d, lines = _unframe(data)
        assert isinstance(d, dict)
        failed = d["failed"]
        return cls(
            partition=d["p"],
            applied_through=d["through"],
            epochs=d["epochs"],
            lines=lines if d["epochs"] else [],
            rejected=[Rejection(*r) for r in d["rejected"]],
            failed=None if failed is None else Rejection(*failed),
        )
