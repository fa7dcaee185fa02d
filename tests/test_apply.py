"""Applying events to state, checked against the seed's semantics without Redis."""

import itertools
import json

import orjson
import pytest

from tasks.apply import KEEP_DECODED_BYTES, apply_events, format_line
from tasks.cartjoin import flow, validate_event
from tasks.errors import InvalidEvent
from tasks.flow import Dataflow
from tasks.undo import decode_undo, encode_undo

from reference import reference_run


def order(user, oid):
    return {"user_id": user, "type": "order", "order_id": oid}


def payment(user, oid):
    return {"user_id": user, "type": "payment", "order_id": oid}


def events(*items, start=0):
    return [(start + i, e["user_id"], e) for i, e in enumerate(items)]


def test_the_seeds_first_epochs():
    batch = events(order("a", 1), order("a", 2), order("b", 3), payment("a", 2), order("b", 4))
    result = apply_events(flow, batch, {}, 4, "fail")
    assert [line for _, line in result.outputs] == [
        '0 {"user_id": "a", "paid_order_ids": [], "unpaid_order_ids": [1]}',
        '1 {"user_id": "a", "paid_order_ids": [], "unpaid_order_ids": [1, 2]}',
        '2 {"user_id": "b", "paid_order_ids": [], "unpaid_order_ids": [3]}',
        '3 {"user_id": "a", "paid_order_ids": [2], "unpaid_order_ids": [1]}',
        '4 {"user_id": "b", "paid_order_ids": [], "unpaid_order_ids": [3, 4]}',
    ]
    assert orjson.loads(result.writes["a"]) == {"unpaid_order_ids": [1], "paid_order_ids": [2]}
    assert result.applied_through == 4


def test_state_continues_from_the_loaded_state():
    loaded = {"a": orjson.dumps({"unpaid_order_ids": [1], "paid_order_ids": [2]})}
    result = apply_events(flow, events(payment("a", 1), start=6), loaded, 6, "fail")
    assert result.outputs == [
        (6, '6 {"user_id": "a", "paid_order_ids": [2, 1], "unpaid_order_ids": []}')
    ]


def test_undo_gives_each_events_before_image():
    result = apply_events(flow, events(order("a", 1), order("a", 2)), {}, 1, "fail")
    assert list(decode_undo(result.encode_undo(), lambda: flow)) == [
        (0, "a", None),
        (1, "a", b'{"unpaid_order_ids":[1],"paid_order_ids":[]}'),
    ]


def test_an_undo_record_keeps_the_stored_bytes_of_each_state():
    befores = [None, b'{"x":"a\\nb"}', b"[]", b'"s"', None]
    record = encode_undo([3, 4, 5, 6, 7], ["k", "l", "k", "m:n", "o\np"], befores)
    assert list(decode_undo(record)) == list(
        zip([3, 4, 5, 6, 7], ["k", "l", "k", "m:n", "o\np"], befores, strict=True)
    )
    assert list(decode_undo(encode_undo([], [], []))) == []


def picky_flow():
    """Counts values per key, and rejects the value 'bad'."""

    def mapper(n, value):
        if value == "bad":
            raise ValueError(f"cannot count {value!r}")
        return n + 1, n + 1

    return Dataflow().stateful_map("picky", lambda key: 0, mapper).capture()


def test_fail_stops_before_the_rejected_event():
    result = apply_events(picky_flow(), [(0, "a", 1), (1, "a", "bad"), (2, "a", 1)], {}, 2, "fail")
    assert result.failed is not None
    assert (result.failed.epoch, result.failed.key) == (1, "a")
    assert result.failed.reason == "ValueError: cannot count 'bad'"
    assert result.applied_through == 0
    assert [e for e, _ in result.outputs] == [0]
    assert orjson.loads(result.writes["a"]) == 1


def test_skip_leaves_the_rejected_event_out_and_the_state_intact():
    result = apply_events(picky_flow(), [(0, "a", 1), (1, "a", "bad"), (2, "a", 1)], {}, 2, "skip")
    assert [r.epoch for r in result.rejected] == [1]
    assert [e for e, _ in result.outputs] == [0, 2]
    assert orjson.loads(result.writes["a"]) == 2


def cart_states(*items):
    result = apply_events(flow, events(*items), {}, len(items) - 1, "fail")
    assert result.failed is None
    return orjson.loads(result.writes["a"]), [
        json.loads(line.split(" ", 1)[1]) for _, line in result.outputs
    ]


def test_a_payment_before_its_order_is_held_and_applied_when_the_order_arrives():
    state, outputs = cart_states(payment("a", 7), order("a", 1), order("a", 7))
    assert state == {"unpaid_order_ids": [1], "paid_order_ids": [7]}
    # The held payment is state, not output: the output keeps the tutorial's fields.
    assert outputs[0] == {"user_id": "a", "paid_order_ids": [], "unpaid_order_ids": []}
    assert outputs[2] == {"user_id": "a", "paid_order_ids": [7], "unpaid_order_ids": [1]}


def test_duplicates_change_nothing():
    state, outputs = cart_states(
        order("a", 1), order("a", 1), payment("a", 1), payment("a", 1), order("a", 1)
    )
    assert state == {"unpaid_order_ids": [], "paid_order_ids": [1]}
    assert outputs[-1] == outputs[-2] == outputs[-3]
    state, _ = cart_states(payment("a", 2), payment("a", 2), order("a", 2))
    assert state == {"unpaid_order_ids": [], "paid_order_ids": [2]}


def half_applying_mapper(state, value):
    state["n"] += 1  # mutates in place, then fails: the mutation must not survive
    if value == "boom":
        raise RuntimeError("boom")
    return state, dict(state)


def test_a_rejected_event_never_leaves_a_half_applied_state():
    f = Dataflow().stateful_map("count", lambda key: {"n": 0}, half_applying_mapper).capture()
    result = apply_events(f, [(0, "k", 1), (1, "k", "boom"), (2, "k", 1)], {}, 2, "skip")
    assert [line for _, line in result.outputs] == ['0 ["k", {"n": 1}]', '2 ["k", {"n": 2}]']
    assert orjson.loads(result.writes["k"]) == {"n": 2}


LARGE = "x" * KEEP_DECODED_BYTES  # a state this large stays decoded (with plain_json)


def test_nor_does_it_when_a_large_state_stays_decoded_between_events():
    def mapper(state, value):
        state["n"] += 1  # mutates in place, then fails: the mutation must not survive
        if value == "boom":
            raise RuntimeError("boom")
        return state, state["n"]

    f = Dataflow().stateful_map(
        "count", lambda key: {"n": 0, "pad": LARGE}, mapper, plain_json=True
    )
    items = [(0, "k", 1), (1, "k", "boom"), (2, "k", 1), (3, "k", "boom"), (4, "k", 1)]
    result = apply_events(f.capture(), items, {}, 4, "skip")
    assert [line for _, line in result.outputs] == ['0 ["k", 1]', '2 ["k", 2]', '4 ["k", 3]']
    assert orjson.loads(result.writes["k"]) == {"n": 3, "pad": LARGE}


def tuple_keeping_mapper(state, value):
    """Keeps the last value as a tuple, and says what type it found there."""
    found = type(state["last"]).__name__
    state["last"] = (value, value)
    return state, found


def test_without_the_promise_of_plain_json_every_event_sees_its_state_as_its_json_says():
    f = Dataflow().stateful_map("t", lambda key: {"last": []}, tuple_keeping_mapper).capture()
    result = apply_events(f, [(0, "k", 1), (1, "k", 2), (2, "k", 3)], {}, 2, "fail")
    assert [line for _, line in result.outputs] == [
        '0 ["k", "list"]', '1 ["k", "list"]', '2 ["k", "list"]'
    ]  # fmt: skip


def test_with_the_promise_a_state_stays_decoded_between_a_keys_events_in_a_batch():
    """(What a flow that breaks the promise sees: its tuple, where the JSON has a list.)"""

    def large(key):
        return {"last": [], "pad": LARGE}

    f = Dataflow().stateful_map("t", large, tuple_keeping_mapper, plain_json=True).capture()
    loaded = {"k": orjson.dumps({"last": [0, 0], "pad": LARGE}), "s": b'{"last":[0,0]}'}
    items = [(0, "k", 1), (1, "k", 2), (2, "j", 3), (3, "s", 4), (4, "s", 5)]
    result = apply_events(f, items, loaded, 4, "fail")
    assert [line for _, line in result.outputs] == [
        '0 ["k", "list"]', '1 ["k", "tuple"]', '2 ["j", "list"]',
        '3 ["s", "list"]', '4 ["s", "list"]',  # (a small state is decoded at every event)
    ]  # fmt: skip
    assert orjson.loads(result.writes["k"]) == {"last": [2, 2], "pad": LARGE}


@pytest.mark.parametrize("plain_json", [False, True])
def test_a_deleted_state_starts_again_from_the_builder(plain_json):
    def mapper(n, value):
        return (None if value == "end" else n + 1), n

    f = Dataflow().stateful_map("n", lambda key: 10, mapper, plain_json=plain_json).capture()
    items = [(0, "k", 1), (1, "k", "end"), (2, "k", 1), (3, "k", 1)]
    result = apply_events(f, items, {}, 3, "fail")
    assert [line for _, line in result.outputs] == [
        '0 ["k", 10]', '1 ["k", 11]', '2 ["k", 10]', '3 ["k", 11]'
    ]  # fmt: skip


def test_returning_none_deletes_the_state():
    f = Dataflow().stateful_map("once", lambda key: 0, lambda s, v: (None, s + v)).capture()
    result = apply_events(f, [(0, "k", 5)], {"k": b"10"}, 0, "fail")
    assert result.writes == {"k": None}
    assert result.outputs == [(0, '0 ["k", 15]')]


def test_output_lines_are_byte_identical_to_json_dumps():
    item = {"user_id": 'é"x', "paid_order_ids": [1.5, "x"], "unpaid_order_ids": []}
    assert format_line(3, item) == "3 " + json.dumps(item)


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ([1, 2], "not a JSON object (got array)"),
        ("x", "not a JSON object (got string)"),
        ({"type": "order", "order_id": 1}, "missing field 'user_id'"),
        ({"user_id": "a"}, "missing field 'type', 'order_id'"),
        (
            {"user_id": 5, "type": "order", "order_id": 1},
            "field 'user_id' must be a string (got number)",
        ),
    ],
)
def test_validation_names_what_is_wrong(event, reason):
    with pytest.raises(InvalidEvent) as info:
        validate_event(event)
    assert str(info.value) == reason


def test_a_hot_users_lines_are_the_seeds_in_and_across_batches():
    """Past KEEP_DECODED_BYTES of state, a key's state stays decoded and its lines are
    rendered by format_large_line: the output is the seed's all the same."""
    items = [order("hot", i) for i in range(300)]
    items += [payment("hot", i) for i in range(0, 300, 7)] + [order("cold", 5)]
    items += [order("hot", i) for i in range(300, 400)]
    lines = [json.dumps(e) for e in items]
    expected, states = reference_run(lines)
    raw, out = {}, []
    for start, end in itertools.pairwise([0, 150, 200, 400, len(items)]):  # (batches)
        part = events(*items[start:end], start=start)
        result = apply_events(flow, part, raw, part[-1][0], "fail")
        raw.update(result.writes)
        out += [line for _, line in result.outputs]
    assert "".join(f"{line}\n" for line in out) == expected
    assert {k: orjson.loads(v) for k, v in raw.items()} == states
