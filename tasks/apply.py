"""Apply a batch of keyed events to their states: pure, no Redis.

The result holds everything the commit writes: the final state of each
touched key, an undo record (each key's before-image once, and the values that
re-derive its states after it, so any epoch of the batch can be restored
later: ``tasks/undo.py``), the outputs and the rejected events.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from tasks.batch import OnError, Rejection
from tasks.errors import InvalidEvent
from tasks.flow import Dataflow, StatefulMapStep, make_emitter, single_emitter
from tasks.output_line import format_large_line, format_line
from tasks.undo import IMAGE, VALUE_OPTIONS, Raw, encode_undo_v2
from tasks.watchdog import EventWatch, FlowTimeout


@dataclass
class AppliedBatch:
    """The effects of one batch, ready to be committed."""

    applied_through: int
    # key -> final state (None deletes the key's state)
    writes: dict[str, Raw] = field(default_factory=dict)
    # Each applied event's epoch, key and where its before-image comes from (the undo
    # record): restoring epoch N-1 sets each key to the before-image of its first event
    # at epoch >= N. A step is IMAGE (the next of undo_images) or the previous event's
    # value of the same key, as ``[value]`` JSON.
    undo_epochs: list[int] = field(default_factory=list)
    undo_keys: list[str] = field(default_factory=list)
    undo_steps: list[bytes] = field(default_factory=list)
    undo_images: list[Raw] = field(default_factory=list)
    # The epoch of each rendered output, and the outputs, in epoch order
    out_epochs: list[int] = field(default_factory=list)
    out_items: list[Any] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    failed: Rejection | None = None
    # Stopped by ``max_bytes`` after ``applied_through``: the events after it are not applied
    # (their commit comes next), and ``applied_through`` is short of the batch's last epoch.
    more: bool = False
    # the exception behind `failed`, for callers in the same process (run_main)
    failed_exception: BaseException | None = None
    # The bytes apply_events counted: its undo images, its re-deriving undo steps (not the
    # one-byte IMAGE ones), its states and output lines (unknown: sys.maxsize)
    carried: int = sys.maxsize

    @property
    def outputs(self) -> list[tuple[int, Any]]:
        """``(epoch, rendered output)`` pairs in epoch order."""
        return list(zip(self.out_epochs, self.out_items, strict=True))

    def encode_undo(self) -> bytes:
        """The batch's undo record (see ``tasks/undo.py``)."""
        return encode_undo_v2(self.undo_epochs, self.undo_keys, self.undo_steps, self.undo_images)


def describe_exception(e: BaseException) -> str:
    """A one-line reason for a rejected event."""
    if isinstance(e, InvalidEvent):
        return str(e)
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# The size of a state's JSON from which it stays decoded between two events of its key in a
# batch (with ``plain_json``), and its outputs are rendered by ``format_large_line``: a 55
# KB state took 390 us to decode, 60 us to encode, and its line 960 us (330 us); but
# every small state kept decoded ran the 1M-event bench's batches slower (apply 5.5-6.2 ->
# 7.3-10.6 us an event, ``python -m bench.worker``), as objects kept alive across a batch
# did before (docs/performance.md).
KEEP_DECODED_BYTES = 1024


def apply_events(  # noqa: C901 - the hot loop of a worker, kept in one function
    flow: Dataflow,
    events: Iterable[tuple[int, str, Any]],
    loaded: dict[str, Raw],
    last_epoch: int,
    on_error: OnError,
    render: Callable[[int, Any], Any] = format_line,
    watch: EventWatch | None = None,
    derive: bool = True,
    max_bytes: int = 0,
    derive_from: int = 0,
) -> AppliedBatch:
    """Apply events (in epoch order) to the loaded states.

    Args:
        flow: the flow; its stateful step and the steps after it run here.
        events: ``(epoch, key, value)`` in epoch order.
        loaded: the committed state of every key the events touch.
        last_epoch: the batch's last epoch (it may end after its last event).
        on_error: ``fail`` stops at the first rejected event; ``skip`` leaves it out.
        render: turns ``(epoch, output item)`` into what the batch outputs.
        watch: stops an event that runs longer than its timeout (armed by the
            caller); the event is rejected as timed out, the batch goes on.
        derive: the undo record may re-derive states with the flow (else it
            stores every event's before-image).
        derive_from: with ``derive``, only a state of at least this many bytes of
            JSON is re-derived; a smaller one keeps its image at every event (0:
            any state may be). ``run_main``, whose caller may pass another flow
            object on its next run, derives only large states.
        max_bytes: once the bytes the commit would carry (output lines, each
            event's new state, undo images and values) pass this, stop at the end
            of that epoch: ``more`` is set and ``applied_through`` is that epoch
            (0: no bound). The events after it are consumed from ``events`` up to
            the first one of a later epoch, which is not applied.

    Returns:
        The batch's effects. A rejected event leaves its key's state as it was
        before that event, whatever the mapper did to it in place.
    """
    _, stateful, after = flow.split()
    mapper, builder = stateful.mapper, stateful.builder
    emit, emit_one = make_emitter(after), single_emitter(after)
    dumps, loads = orjson.dumps, orjson.loads
    # The last good serialized state per key. An event decodes its state from it: a key
    # seen again in the batch is decoded again, rather than kept decoded from its last
    # event: decoded states kept for the whole batch land in fresh memory, which costs
    # more than decoding again (docs/performance.md); and a state is always what its
    # JSON says, wherever the batch boundaries fall.
    raw: dict[str, Raw] = dict(loaded)
    # Unless the flow promises plain JSON states (decoding gives them back as they were)
    # and the state is large: then it stays decoded from its key's last good event to its
    # next one. (Taken out while the mapper runs: a rejected event may have changed it
    # in place.)
    keep = KEEP_DECODED_BYTES if stateful.plain_json else sys.maxsize
    kept: dict[str, Any] = {}
    # A large state's outputs may hold long lists: rendered by the line maker for them.
    render_large = format_large_line if render is format_line else render
    result = AppliedBatch(applied_through=last_epoch)
    writes = result.writes
    undo_epochs, undo_keys = result.undo_epochs, result.undo_keys
    undo_steps, undo_images = result.undo_steps, result.undo_images
    # key -> (JSON of the value of its last applied event, or None, and that value), for
    # keys applied more than once in the batch
    last_values: dict[str, tuple[bytes | None, Any]] = {}
    out_epochs, out_items = result.out_epochs, result.out_items
    # The bytes the commit would carry so far (a key's state counted at each of its events:
    # an upper bound). Once past the bound, the batch stops at the end of that epoch.
    limit, nbytes = max_bytes or sys.maxsize, 0
    iterator = iter(events)
    _follow(watch, iterator)
    # The hot loop of a worker: local names only, one mapper call, one encode per event.
    for epoch, key, value in iterator:
        # Past the bound (the event that passed it was applied), and a new epoch: stop.
        if nbytes > limit and epoch > undo_epochs[-1]:
            result.applied_through, result.more = undo_epochs[-1], True
            break
        before = raw.get(key)
        try:
            state = kept.pop(key, None)  # (None: not kept, or the key's state was deleted)
            if state is None:
                state = builder(key) if before is None else loads(before)
        except FlowTimeout as e:
            rejection = _timed_out(epoch, key, e)
            if _stop(result, rejection, on_error, e):
                break
            continue
        # Only a key's second event on stores its value (so a key's image may be stored twice
        # per batch): JSON of every value cost the 1M-event bench's worker +1.7 µs per event.
        # (taken before the mapper runs: it may change the value in place)
        value_json = (
            _value_json(value)
            if derive and key in writes and (not derive_from or len(before or b"") >= derive_from)
            else _FIRST
        )
        try:
            try:
                new_state, emitted = mapper(state, value)
            except (TypeError, ValueError) as e:
                raise _bad_return(stateful, mapper, state, value, e) from None
            line = render if before is None or len(before) < KEEP_DECODED_BYTES else render_large
            if emit_one is not None:  # the steps after the mapper are plain maps
                rendered = line(epoch, emit_one((key, emitted)))
            else:
                rendered_all = [line(epoch, item) for item in emit((key, emitted))]
            new_raw = None if new_state is None else dumps(new_state)
        except Exception as e:  # the flow's code rejected this event (its state stays as it was)
            if _stop(result, Rejection(epoch, key, describe_exception(e)), on_error, e):
                break
            continue
        except FlowTimeout as e:  # the flow ran past the timeout on this event: as rejected
            if _stop(result, _timed_out(epoch, key, e), on_error, e):
                break
            continue
        undo_epochs.append(epoch)
        undo_keys.append(key)
        if value_json is _FIRST:
            undo_steps.append(IMAGE)
            undo_images.append(before)
            nbytes += len(before or b"")
        else:
            nbytes += _undo_step(result, last_values.get(key), before)
            last_values[key] = (value_json, value)
        raw[key] = writes[key] = new_raw
        if new_raw is not None and len(new_raw) >= keep:
            kept[key] = new_state
        if emit_one is not None:
            out_epochs.append(epoch)
            out_items.append(rendered)
            nbytes += len(rendered) + len(new_raw or b"")
        else:
            out_epochs += [epoch] * len(rendered_all)
            out_items += rendered_all
            nbytes += sum(map(len, rendered_all)) + len(new_raw or b"")
    result.carried = nbytes
    return result


# Marks a key's first applied event in the batch (never returned by _value_json).
_FIRST = b"(first)"


def _undo_step(result: AppliedBatch, last: tuple[bytes | None, Any] | None, before: Raw) -> int:
    """Where the undo record takes an event's before-image from, given its key's last event.

    Re-derived from that event if its value comes back equal from its JSON (no
    tuple, NaN, value changed in place...); else stored. Returns the bytes it adds.
    """
    if last is not None and last[0] is not None and orjson.loads(last[0]) == last[1]:
        # with the CRC-32 of the state it re-derives: a flow that changed since is refused
        step = b"[%b,%d]" % (last[0], zlib.crc32(before or b""))
        result.undo_steps.append(step)
        return len(step)
    result.undo_steps.append(IMAGE)
    result.undo_images.append(before)
    return 0 if before is None else len(before)


def _value_json(value: Any) -> bytes | None:
    """The value as JSON for the undo record, or None if it is not JSON."""
    try:
        return orjson.dumps(value, option=VALUE_OPTIONS)
    except TypeError:  # (orjson's error) its key's next event keeps its image instead
        return None


def _stop(result: AppliedBatch, rejection: Rejection, on_error: OnError, e: BaseException) -> bool:
    """Record a rejected event; whether the batch stops at it (``fail``)."""
    if on_error == "fail":
        result.failed, result.failed_exception = rejection, e
        result.applied_through = rejection.epoch - 1
        return True
    result.rejected.append(rejection)
    return False


def _timed_out(epoch: int, key: str, e: FlowTimeout) -> Rejection:
    reason = (
        f"timed out: the flow did not finish epoch {epoch} (key {key!r}) within {e.seconds:g} s "
        "(--batch-timeout)"
    )
    return Rejection(epoch, key, reason, "timeout")


def _follow(watch: EventWatch | None, iterator: Any) -> None:
    """Let the watch's ticks read how far the batch is: nothing is counted per event."""
    if watch is not None:
        watch.follow(_remaining(iterator), apply_events.__code__, _HELPERS)


def _remaining(iterator: Any) -> Callable[[], int]:
    """How many events the iterator has left, as a function (0 if it cannot say)."""
    hint = getattr(iterator, "__length_hint__", None)
    return hint if hint is not None else (lambda: 0)


# What apply_events runs outside the flow's code: a tick never raises in them.
_HELPERS = tuple(
    f.__code__
    for f in (_stop, _timed_out, _undo_step, _value_json, describe_exception, Rejection.__init__)
)


def _bad_return(
    stateful: StatefulMapStep, mapper: Any, state: Any, value: Any, error: Exception
) -> Exception:
    """The error to report when ``new_state, emitted = mapper(...)`` failed.

    Either the mapper itself raised (its exception is the reason), or what it
    returned is not a pair (then say so, naming the step).
    """
    tb = error.__traceback__
    if tb is not None and tb.tb_next is not None:
        return error  # raised inside the mapper, not by unpacking what it returned
    msg = f"stateful_map {stateful.step_id!r}: the mapper must return (state, emitted)"
    return TypeError(msg)
