"""Output lines, byte-identical to the seed's ``print(epoch, json.dumps(item))``.

A hot key's output lines carry its whole state (the cart join emits every order id
of the user at every event), so their JSON is most of what its worker does:
``json``'s encoder takes ~900 us for a line of 10,000 ids. A long list of ints is
encoded by orjson instead (~6x faster), whose compact JSON differs from
``json.dumps``'s only by the space after each comma; orjson's bytes are used only
once they are seen to hold nothing but digits, minus signs and commas, where
adding that space gives ``json.dumps``'s text exactly.
"""

from __future__ import annotations

import json
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

import orjson

from tasks.tuning import enabled

# json.dumps builds a new C encoder on every call; one built once gives the same bytes in
# under half the time (the ``encoder`` tuning knob). json's private constructor takes
# json.dumps's defaults here: no indent, ": " and ", ", no sorting, skipkeys off, allow_nan.
_ENCODER = (
    c_make_encoder(
        None,
        json.JSONEncoder().default,
        encode_basestring_ascii,
        None,
        ": ",
        ", ",
        False,
        False,
        True,
    )  # fmt: skip
    if c_make_encoder is not None and enabled("encoder")
    else None
)

# A list at least this long, in an output item (or one of its values), is tried with orjson:
# shorter ones cost more to check than they save.
LONG_LIST = 32
_INT_LIST_BYTES = b"0123456789,-"


def format_line(epoch: int, item: Any) -> str:
    """An output line, byte-identical to the seed's ``print(epoch, json.dumps(item))``."""
    if _ENCODER is None:
        return f"{epoch} {json.dumps(item)}"
    return f"{epoch} {''.join(_ENCODER(item, 0))}"


def format_large_line(epoch: int, item: Any) -> str:
    """``format_line`` for an item that may hold long lists: the same line, faster for them.

    (Looking for them costs a small item ~0.35 us, a quarter of its line: the caller
    chooses, by the size of the state the item comes from.)
    """
    if _ENCODER is None:
        return f"{epoch} {json.dumps(item)}"
    if type(item) is dict:
        for value in item.values():
            if type(value) is list and len(value) >= LONG_LIST:
                return f"{epoch} {_dict_json(item)}"
    elif type(item) is list and len(item) >= LONG_LIST:
        return f"{epoch} {_int_list_json(item) or _json(item)}"
    return f"{epoch} {''.join(_ENCODER(item, 0))}"


def _json(item: Any) -> str:
    assert _ENCODER is not None
    return "".join(_ENCODER(item, 0))


def _dict_json(item: dict[Any, Any]) -> str:
    """``json.dumps(item)`` of a dict, its long lists of ints encoded by orjson."""
    parts = []
    for key, value in item.items():
        if type(key) is not str:  # (json.dumps turns numbers, booleans and None into keys)
            return _json(item)
        fast = None
        if type(value) is list and len(value) >= LONG_LIST:
            fast = _int_list_json(value)
        parts.append(f"{encode_basestring_ascii(key)}: {fast or _json(value)}")
    return "{" + ", ".join(parts) + "}"


def _int_list_json(value: list[Any]) -> str | None:
    """``json.dumps(value)`` of a list of ints, by orjson; None for any other list."""
    try:
        compact = orjson.dumps(value)
    except TypeError:  # (orjson's error: an int beyond 64 bits, a type it does not take)
        return None
    if compact[1:-1].translate(None, _INT_LIST_BYTES):  # a float, a string, a nested list...
        return None
    return compact.replace(b",", b", ").decode()
