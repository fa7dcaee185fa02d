"""Routing a line by its declared layout (``Dataflow.key_lines_by``) without parsing it.

The cart join declares the layout ``json.dumps`` writes. The promise: every line the
pattern matches is valid input that the flow's first steps turn into one event keyed
by the pattern's ``key`` group, so the driver's partition is the one parsing gives.
Every other line is parsed and checked in full, so a run's output, states and bad
lines are the same with the fast path and without it (the ``line-key`` tuning knob).
"""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_driver_inprocess import run

from bench.generate import generate
from orchestrator.settings import Settings
from tasks.cartjoin import CART_LINE, flow
from tasks.errors import FlowError
from tasks.flow import Dataflow, make_router
from tasks.keys import SLOTS, Keys, Layout, partition_of

from helpers import states_in
from reference import reference_run

ROUTE = make_router(*flow.split()[:2])
MATCH = flow.line_key.fullmatch if flow.line_key else None

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=5,
)
printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
user_ids = st.text(printable, max_size=8) | st.text(max_size=4)
order_ids = st.integers(-(10**19) - 9, 10**19 + 9) | st.integers(-99, 99) | json_values
types = st.sampled_from(["order", "payment"]) | (st.sampled_from(["Order", ""]) | json_values)
separators = st.sampled_from([(", ", ": "), (",", ":")]) | st.sampled_from([(" , ", " : ")])


@st.composite
def cart_lines(draw: st.DrawFn) -> bytes:
    """Lines near the declared layout: odd values and separators; sometimes its fields
    in another order, a field more or less, or a byte changed."""
    event = {"user_id": draw(user_ids), "type": draw(types), "order_id": draw(order_ids)}
    fields = list(event)
    if draw(st.integers(0, 3)) == 0:
        fields = draw(st.permutations(fields))[: draw(st.integers(0, 3))]
        fields += draw(st.lists(st.sampled_from(["user_id", "type", "x", ""]), max_size=2))
    event = {f: event.get(f, 1) for f in fields}
    line = json.dumps(event, separators=draw(separators), ensure_ascii=draw(st.booleans()))
    data = line.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 3)) == 0 and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + draw(st.binary(max_size=2)) + data[at + draw(st.integers(0, 2)) :]
    return data


def routed_partitions(data: bytes, partitions: int) -> list[int] | None:
    """What parsing gives: the partition of each event of the line, None if it is rejected."""
    try:
        events = ROUTE(orjson.loads(data))
    except Exception:
        return None
    return [partition_of(key, partitions, SLOTS) for key, _ in events]


@settings(max_examples=1500, deadline=None)
@given(cart_lines(), st.integers(1, 1024))
def test_a_line_the_layout_matches_is_one_valid_event_of_the_key_it_names(data, partitions):
    assert MATCH is not None
    match = MATCH(data)
    if match is not None:
        events = ROUTE(orjson.loads(data))
        assert [key for key, _ in events] == [match["key"].decode()]
        assert routed_partitions(data, partitions) == [
            Layout(partitions, SLOTS).router()(match["key"])
        ]


def test_the_generators_lines_and_the_tutorials_layout_take_the_fast_path():
    assert MATCH is not None
    assert all(MATCH(line.encode()) for line in generate(2_000, 300, seed=3))
    assert MATCH(b'{"user_id":"a","type":"payment","order_id":-0}')
    # not the layout: parsed and checked in full
    for line in [
        b'{"type": "order", "user_id": "a", "order_id": 1}',  # another order of fields
        b'{"user_id": "\\u0061", "type": "order", "order_id": 1}',  # an escape
        b'{"user_id": "a", "type": "order", "order_id": 1.0}',
        b'{"user_id": "a", "type": "order", "order_id": 1234567890123456789}',  # 19 digits
        b'{"user_id": "a", "type": "order", "order_id": 01}',
        b'{"user_id": "a", "type": "order", "order_id": 1} ',
    ]:
        assert MATCH(line) is None, line


def test_a_flow_declares_a_layout_with_a_key_group():
    assert Dataflow().key_lines_by(rb"(?P<key>\w+)").line_key is not None
    with pytest.raises(FlowError, match="group named 'key'"):
        Dataflow().key_lines_by(rb"(\w+)")
    with pytest.raises(FlowError, match="bytes pattern"):
        Dataflow().key_lines_by(CART_LINE.decode())  # type: ignore[arg-type]
    with pytest.raises(FlowError, match="invalid pattern"):
        Dataflow().key_lines_by(rb"(?P<key>")


MIXED = [
    *generate(600, 40, seed=11),
    '{"type": "order", "user_id": "u3", "order_id": 9001}',  # valid, another layout
    '{"user_id": "ü", "type": "order", "order_id": 9002}',  # a key outside the layout
    '{"user_id":"u3","type":"payment","order_id":9001}',  # compact
    "FAIL HERE",
    '{"user_id": "u7", "type": "order"}',  # a field missing
    "",
    '{"user_id": "u7", "type": "order", "order_id": 9003',  # cut short
    *(line.replace(': "u', ': "w') for line in generate(600, 40, seed=12)),  # other users
]


@pytest.mark.parametrize("tuning", ["", "-line-key"])
def test_a_run_with_bad_and_odd_lines_is_the_same_with_the_fast_path_and_without(
    fake, tmp_path, monkeypatch, tuning
):
    monkeypatch.setenv("ORCHESTRATOR_TUNING", tuning)
    path = tmp_path / "events.json"
    path.write_text("\n".join(MIXED) + "\n")
    options = Settings(
        namespace="lk", partitions=3, batch_events=100, on_error="skip", output=tmp_path / "out"
    )

    result = run(fake, options, "ingest", path)

    output, states = reference_run(MIXED, skip_bad=True)
    assert (tmp_path / "out").read_text() == output
    assert states_in(fake, "lk") == states
    for p in range(3):  # every key's state is in the partition parsing gives it
        assert all(partition_of(k.decode(), 3, SLOTS) == p for k in fake.hkeys(Keys("lk").state(p)))
    offsets = [0]
    for line in MIXED:
        offsets.append(offsets[-1] + len(line.encode()) + 1)
    assert [(b.epoch, b.offset, b.reason) for b in result.skipped] == [
        (603, offsets[603], "invalid JSON: unexpected 'F' at column 1"),
        (604, offsets[604], "missing field 'order_id'"),
        (606, offsets[606], "invalid JSON: the line ends inside a JSON value"),
    ]
    assert result.events == len(MIXED) - 4
