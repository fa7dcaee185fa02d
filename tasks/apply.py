"""Apply a batch of keyed events to their states: pure, no Redis.

The result holds everything the commit writes: the final state of each
touched key, an undo record (each event's before-image, so any epoch of the
batch can be restored later), the outputs and the rejected events.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from tasks.batch import OnError, Rejection
from tasks.errors import InvalidEvent
from tasks.flow import Dataflow, StatefulMapStep, run_steps

# A stored state as JSON bytes, or None when the key has no state.
Raw = bytes | None


@dataclass
class AppliedBatch:
    """The effects of one batch, ready to be committed."""

    applied_through: int
    # key -> final state (None deletes the key's state)
    writes: dict[str, Raw] = field(default_factory=dict)
    # (epoch, key, state before the event or None): restoring epoch N-1 sets each
    # key to the before-image of its first event at epoch >= N
    undo: list[tuple[int, str, str | None]] = field(default_factory=list)
    # (epoch, rendered output) in epoch order
    outputs: list[tuple[int, Any]] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    failed: Rejection | None = None
    # the exception behind `failed`, for callers in the same process (run_main)
    failed_exception: BaseException | None = None


def describe_exception(e: BaseException) -> str:
    """A one-line reason for a rejected event."""
    if isinstance(e, InvalidEvent):
        return str(e)
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def format_line(epoch: int, item: Any) -> str:
    """An output line, byte-identical to the seed's ``print(epoch, json.dumps(item))``."""
    return f"{epoch} {json.dumps(item)}"


def apply_events(
    flow: Dataflow,
    events: Iterable[tuple[int, str, Any]],
    loaded: dict[str, Raw],
    last_epoch: int,
    on_error: OnError,
    render: Callable[[int, Any], Any] = format_line,
) -> AppliedBatch:
    """Apply events (in epoch order) to the loaded states.

    Args:
        flow: the flow; its stateful step and the steps after it run here.
        events: ``(epoch, key, value)`` in epoch order.
        loaded: the committed state of every key the events touch.
        last_epoch: the batch's last epoch (it may end after its last event).
        on_error: ``fail`` stops at the first rejected event; ``skip`` leaves it out.
        render: turns ``(epoch, output item)`` into what the batch outputs.

    Returns:
        The batch's effects. A rejected event leaves its key's state as it was
        before that event, whatever the mapper did to it in place.
    """
    _, stateful, after = flow.split()
    raw: dict[str, Raw] = dict(loaded)  # last good serialized state per key
    live: dict[str, Any] = {}  # decoded states, valid while equal to raw
    result = AppliedBatch(applied_through=last_epoch)
    for epoch, key, value in events:
        before = raw.get(key)
        state = live[key] if key in live else _decode_or_build(before, stateful.builder, key)
        try:
            new_state, emitted = _step(stateful, state, value)
            outputs = [render(epoch, item) for item in run_steps(after, (key, emitted))]
            new_raw = None if new_state is None else orjson.dumps(new_state)
        except Exception as e:  # the flow's code rejected this event
            live.pop(key, None)  # the mapper may have mutated it in place
            rejection = Rejection(epoch, key, describe_exception(e))
            if on_error == "fail":
                result.failed, result.failed_exception = rejection, e
                result.applied_through = epoch - 1
                break
            result.rejected.append(rejection)
            continue
        result.undo.append((epoch, key, None if before is None else before.decode()))
        raw[key] = new_raw
        if new_state is None:
            live.pop(key, None)
        else:
            live[key] = new_state
        result.writes[key] = new_raw
        result.outputs.extend((epoch, out) for out in outputs)
    return result


def _step(stateful: StatefulMapStep, state: Any, value: Any) -> tuple[Any, Any]:
    returned = stateful.mapper(state, value)
    if not (isinstance(returned, tuple | list) and len(returned) == 2):
        msg = (
            f"stateful_map {stateful.step_id!r}: the mapper must return (state, emitted), "
            f"got {type(returned).__name__}"
        )
        raise TypeError(msg)
    return returned[0], returned[1]


def _decode_or_build(raw: Raw, builder: Any, key: str) -> Any:
    return builder(key) if raw is None else orjson.loads(raw)
