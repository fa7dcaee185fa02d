"""Output lines are byte-identical to the seed's ``print(epoch, json.dumps(item))``, whatever
the item holds, long lists of ints (encoded by orjson) included."""

import enum
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.output_line import LONG_LIST, format_large_line, format_line


class Level(enum.IntEnum):
    LOW = 1
    HIGH = -70


class Counted(int):
    pass


def seed_line(epoch, item):
    return f"{epoch} {json.dumps(item)}"


ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
scalars = st.one_of(
    ints,
    st.integers(),  # beyond 64 bits too: orjson refuses them
    st.booleans(),
    st.none(),
    st.floats(),  # NaN and infinities included
    st.text(max_size=5),
    st.sampled_from([Level.LOW, Level.HIGH, Counted(7)]),
)
long_int_lists = st.lists(ints, min_size=LONG_LIST, max_size=3 * LONG_LIST)
long_lists = st.one_of(
    long_int_lists,
    # a long list of ints with one thing that is not an int somewhere in it
    st.tuples(long_int_lists, scalars, st.integers(min_value=0)).map(
        lambda t: t[0][: t[2] % len(t[0])] + [t[1]] + t[0][t[2] % len(t[0]) :]
    ),
    st.lists(st.lists(ints, max_size=3), min_size=LONG_LIST, max_size=LONG_LIST + 2),
)
values = st.one_of(scalars, long_lists, st.lists(scalars, max_size=4))
keys = st.one_of(st.text(max_size=6), st.integers(), st.booleans(), st.none(), st.floats())
items = st.one_of(
    st.dictionaries(st.text(max_size=6), values, max_size=4),
    st.dictionaries(keys, values, max_size=4),
    long_lists,
    values,
)


@settings(max_examples=400, deadline=None)
@given(st.integers(min_value=0), items)
def test_any_item_gives_the_seeds_line(epoch, item):
    assert format_large_line(epoch, item) == format_line(epoch, item) == seed_line(epoch, item)


def test_a_hot_users_line_gives_the_seeds_line():
    item = {
        "user_id": 'hot "é", user: 1',
        "paid_order_ids": list(range(0, 20_000, 2)),
        "unpaid_order_ids": [-5, *range(1, 20_000, 2), 2**63 - 1],
    }
    assert format_large_line(12, item) == seed_line(12, item)


def test_lists_of_ints_with_anything_else_in_them_give_the_seeds_line():
    base = list(range(LONG_LIST))
    for odd in (True, 1.0, 1e16, None, "7", [1], Level.HIGH, Counted(3), 2**64, -(2**70)):
        item = {"ids": [*base, odd, *base]}
        assert format_large_line(0, item) == seed_line(0, item), odd
        assert format_large_line(0, item["ids"]) == seed_line(0, item["ids"]), odd
