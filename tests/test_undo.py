"""Undo records: a key's state once per batch, the states between re-derived by the flow.

The oracle is the per-event format's meaning: for every applied event, the exact
bytes its key's state held before it, computed here by a plain loop.
"""

from __future__ import annotations

import json
import random
from typing import Any

import orjson
import pytest

from orchestrator.queries import _state_at
from tasks.apply import apply_events
from tasks.cartjoin import FLOW_PATH
from tasks.cartjoin import flow as cart_flow
from tasks.errors import FlowError
from tasks.flow import Dataflow
from tasks.keys import Keys
from tasks.store import claim_partition, restore_partition
from tasks.undo import decode_undo, encode_undo, first_befores_after, truncate_undo

from reference import reference_run


def ledger_mapper(state: dict[str, Any], value: Any) -> tuple[dict[str, Any] | None, Any]:
    """Appends what it got; rejects "bad", deletes on "del"; tells a tuple from a list."""
    if value == "bad":
        raise ValueError("bad value")
    if value == "del":
        return None, None
    if isinstance(value, dict) and "n" in value:
        value["n"] += 1  # changes the value in place: it cannot be stored after the event
    kind = type(value).__name__
    state["items"].append([kind, list(value) if isinstance(value, tuple) else value])
    return state, len(state["items"])


LEDGER = Dataflow().stateful_map("ledger", lambda key: {"key": key, "items": []}, ledger_mapper)
LEDGER.capture()

VALUES: list[Any] = ["x", 1, 2.5, None, [1, "a"], {"k": [1, 2]}, "bad", "del", (1, 2), {"n": 0}]
VALUES += [float("nan"), True, "é\n"]


def ledger_events(seed: int, count: int, first: int = 0) -> list[tuple[int, str, Any]]:
    """Events on a hot key, a few others, keys that appear once; every kind of value."""
    rng = random.Random(seed)
    keys = ["hot"] * 6 + ["b", "c", "d"] + [f"once{i}" for i in range(3)]
    return [
        (first + i, rng.choice(keys), rng.choice(VALUES)) for i in range(count)
    ]  # fmt: skip


def plain_befores(
    events: list[tuple[int, str, Any]], loaded: dict[str, bytes]
) -> tuple[list[tuple[int, str, bytes | None]], dict[str, bytes | None]]:
    """Each applied event's (epoch, key, exact state bytes before it), and the final states."""
    raw: dict[str, bytes | None] = dict(loaded)
    befores = []
    for epoch, key, value in events:
        before = raw.get(key)
        state = {"key": key, "items": []} if before is None else orjson.loads(before)
        try:
            new_state, _ = ledger_mapper(state, _copy(value))
        except ValueError:
            continue
        befores.append((epoch, key, before))
        raw[key] = None if new_state is None else orjson.dumps(new_state)
    return befores, raw


def _copy(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value


def fresh(events: list[tuple[int, str, Any]]) -> list[tuple[int, str, Any]]:
    # The mapper changes some values in place: each run gets its own.
    return [(e, k, _copy(v)) for e, k, v in events]


LOADED = {"b": orjson.dumps({"key": "b", "items": [["str", "old"]]}), "hot": b'{"items":[]}'}


@pytest.mark.parametrize("seed", range(8))
def test_every_events_before_image_is_the_bytes_the_per_event_format_held(seed):
    events = ledger_events(seed, 60)
    applied = apply_events(LEDGER, fresh(events), LOADED, 59, "skip")
    expected, final = plain_befores(fresh(events), LOADED)
    assert list(decode_undo(applied.encode_undo(), lambda: LEDGER)) == expected
    assert {k: final[k] for k in applied.writes} == applied.writes
    assert len(applied.rejected) == sum(1 for _, _, v in events if v == "bad")


def images(record: bytes) -> int:
    return len(record.partition(b"\n")[2].split(b"\n"))


def test_a_key_s_state_is_stored_at_most_twice_per_batch_when_its_values_are_json():
    events = [(i, "hot", {"order": i}) for i in range(200)] + [(200, "other", "x")]
    record = apply_events(LEDGER, events, {}, 200, "fail").encode_undo()
    # the hot key's first and second events, the other key's
    assert images(record) == 3
    assert len(record) < 200 * 30 + 3 * 4000  # (the per-event format: ~200²·8 bytes)


def test_values_that_do_not_come_back_from_json_keep_their_image():
    # a tuple (JSON makes it a list), NaN, a value the mapper changed in place
    for value, stored in [("v", 2), ((1, 2), 3), (float("nan"), 3), ({"n": 0}, 3)]:
        events = [(0, "k", "w"), (1, "k", value), (2, "k", "x"), (3, "k", "y")]
        applied = apply_events(LEDGER, fresh(events), {}, 3, "fail")
        assert images(applied.encode_undo()) == stored
        expected, _ = plain_befores(fresh(events), {})
        assert list(decode_undo(applied.encode_undo(), lambda: LEDGER)) == expected


def test_a_rejected_event_is_never_run_again():
    calls = []

    def mapper(n: int, value: str) -> tuple[int, int]:
        calls.append(value)
        if value == "hang":
            raise TimeoutError("stands for an event that hung or killed its worker")
        return n + 1, n + 1

    counting = Dataflow().stateful_map("c", lambda key: 0, mapper).capture()
    events = [(0, "k", "a"), (1, "k", "b"), (2, "k", "hang"), (3, "k", "c"), (4, "k", "d")]
    record = apply_events(counting, events, {}, 4, "skip").encode_undo()
    calls.clear()
    assert list(decode_undo(record, lambda: counting)) == [
        (0, "k", None),
        (1, "k", b"1"),
        (3, "k", b"2"),
        (4, "k", b"3"),
    ]
    assert calls == ["b", "c"]


def test_version_1_records_still_decode_and_truncate():
    befores = [None, b'{"x":"a\\nb"}', b"[]", b'"s"', None]
    names = ["k", "l", "k", "m:n", "o\np"]
    record = encode_undo([3, 4, 5, 6, 7], names, befores)
    assert list(decode_undo(record)) == list(zip([3, 4, 5, 6, 7], names, befores, strict=True))
    assert list(decode_undo(encode_undo([], [], []))) == []
    assert first_befores_after(record, 4) == {"k": b"[]", "m:n": b'"s"', "o\np": None}
    truncated = truncate_undo(record, 5)
    assert truncated is not None
    assert list(decode_undo(truncated)) == list(zip([3, 4, 5], names[:3], befores[:3], strict=True))
    assert truncate_undo(record, 2) is None


def batches(events: list[tuple[int, str, Any]], sizes: list[int]) -> list[list[Any]]:
    out, i = [], 0
    for size in sizes:
        out.append(events[i : i + size])
        i += size
    return out


def commit_plainly(r, keys: Keys, parts: list[list[Any]], old_format: set[int]) -> None:
    """Store the batches' states and undo records as commits do (parts in old_format: v1)."""
    raw: dict[str, bytes | None] = dict(LOADED)
    r.hset(keys.state(0), mapping={k: v for k, v in LOADED.items()})
    for i, part in enumerate(parts):
        last = part[-1][0]
        applied = apply_events(LEDGER, fresh(part), raw, last, "skip")
        if i in old_format:
            per_event, _ = plain_befores(fresh(part), raw)
            record = encode_undo(*(list(c) for c in zip(*per_event, strict=True)))
        else:
            record = applied.encode_undo()
        raw.update(applied.writes)
        r.zadd(keys.undo(0), {record: last})
        for k, v in applied.writes.items():
            if v is None:
                r.hdel(keys.state(0), k)
            else:
                r.hset(keys.state(0), k, v)
    r.hset(keys.progress(0), "applied", parts[-1][-1][0])


def plain_states_at(events: list[tuple[int, str, Any]], epoch: int) -> dict[str, bytes]:
    _, final = plain_befores(fresh([e for e in events if e[0] <= epoch]), LOADED)
    return {k: v for k, v in final.items() if v is not None}


@pytest.mark.parametrize("old_format", [set(), {0}, {1, 2}])
def test_restore_to_every_epoch_gives_the_plain_loop_s_states(r, keys, old_format):
    events = ledger_events(7, 48)
    parts = batches(events, [15, 1, 20, 12])
    for epoch in [-1, *range(48)]:
        r.delete(keys.state(0), keys.undo(0), keys.progress(0))
        claim_partition(r, keys, 0, 1)
        commit_plainly(r, keys, parts, old_format)
        restore_partition(r, keys, 0, epoch, flow=LEDGER)
        assert r.hgetall(keys.state(0)) == {
            k.encode(): v for k, v in plain_states_at(events, epoch).items()
        }
        # The truncated record restores the epochs before it as exactly.
        earlier = max(epoch - 5, -1)
        restore_partition(r, keys, 0, earlier, flow=LEDGER)
        assert r.hgetall(keys.state(0)) == {
            k.encode(): v for k, v in plain_states_at(events, earlier).items()
        }


def test_state_at_epoch_re_derives_a_hot_key_from_the_namespace_s_flow(r, keys):
    orders = [{"user_id": "a", "type": "order", "order_id": i} for i in range(30)]
    pays = [{"user_id": "a", "type": "payment", "order_id": i} for i in range(0, 30, 3)]
    values = orders[:10] + pays[:2] + orders[10:] + pays[2:]
    events = [(i, v["user_id"], v) for i, v in enumerate(values)]
    r.hset(keys.meta, "flow", FLOW_PATH)
    raw: dict[str, bytes | None] = {}
    for part in batches(events, [7, 13, 20]):
        applied = apply_events(cart_flow, part, raw, part[-1][0], "fail")
        raw.update(applied.writes)
        r.zadd(keys.undo(0), {applied.encode_undo(): part[-1][0]})
    r.hset(keys.state(0), mapping={k: v for k, v in raw.items() if v is not None})
    lines = [json.dumps(v) for v in values]
    for epoch in range(-1, len(events)):
        _, expected = reference_run(lines[: epoch + 1])
        assert _state_at(r, keys, 0, "a", epoch) == expected.get("a")


def test_a_record_that_re_derives_states_without_a_flow_is_refused(r, keys):
    events = [(0, "k", "a"), (1, "k", "b"), (2, "k", "c")]
    record = apply_events(LEDGER, events, {}, 2, "fail").encode_undo()
    with pytest.raises(FlowError, match="needs the namespace's flow"):
        list(decode_undo(record))
    # A namespace whose meta names no flow: its restore writes nothing.
    claim_partition(r, keys, 0, 1)
    r.zadd(keys.undo(0), {record: 2})
    r.hset(keys.progress(0), "applied", 2)
    with pytest.raises(FlowError, match="names no flow"):
        restore_partition(r, keys, 0, 1)
    assert r.hget(keys.progress(0), "applied") == b"2"


def test_a_flow_that_changed_since_the_commit_is_refused_not_trusted():
    events = [(0, "k", "a"), (1, "k", "b"), (2, "k", "c"), (3, "k", "d")]
    record = apply_events(LEDGER, events, {}, 3, "fail").encode_undo()

    def other_mapper(state: dict[str, Any], value: Any) -> tuple[dict[str, Any], int]:
        state["items"].append(value)  # no longer records the value's type
        return state, 0

    changed = Dataflow().stateful_map("ledger", lambda key: {"key": key, "items": []}, other_mapper)
    with pytest.raises(FlowError, match="no longer gives the state key 'k' had before epoch 2"):
        list(decode_undo(record, lambda: changed.capture()))


def test_without_derive_every_event_keeps_its_image():
    events = [(i, "k", "v") for i in range(5)]
    record = apply_events(LEDGER, events, {}, 4, "fail", derive=False).encode_undo()
    assert images(record) == 5
    assert list(decode_undo(record)) == plain_befores(events, {})[0]
