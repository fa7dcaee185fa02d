"""Undo records: each event's before-image, so that a partition can be restored as of any epoch.

One record per committed batch (a member of the partition's undo sorted set,
scored by the batch's last epoch). Its bytes are a JSON header
``[[epoch, ...], [key, ...]]``, a newline, and the before-images one per line,
as the JSON the state hash held (an empty line for a key that had no state).
The states are never decoded or re-encoded on the way: they are the exact
bytes to put back. A state's JSON holds no raw newline (states are written by
``orjson.dumps``, which escapes control characters).
"""

from __future__ import annotations

from collections.abc import Iterator

import orjson

# A stored state as JSON bytes, or None when the key has no state.
Raw = bytes | None


def encode_undo(epochs: list[int], keys: list[str], befores: list[Raw]) -> bytes:
    """An undo record of events ``(epochs[i], keys[i])`` whose states were ``befores[i]``."""
    body = b"\n".join([b"" if b is None else b for b in befores])
    return orjson.dumps([epochs, keys]) + b"\n" + body


def decode_undo(record: bytes) -> Iterator[tuple[int, str, Raw]]:
    """``(epoch, key, state before the event)`` of every event of a record, in epoch order."""
    header, _, body = record.partition(b"\n")
    epochs, keys = orjson.loads(header)
    befores = body.split(b"\n") if epochs else []
    for epoch, key, before in zip(epochs, keys, befores, strict=True):
        yield epoch, key, before or None
