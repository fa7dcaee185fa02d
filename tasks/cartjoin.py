"""The seed's cart join: orders and payments joined per user.

``key_off_user_id``, ``build_state``, ``joiner`` and ``format_output`` are the
tutorial's functions; ``validate_event`` rejects input that is not a cart event,
with a precise reason, before it reaches them. For in-order, duplicate-free
input the output is the tutorial's, byte for byte. Beyond the tutorial, the
joiner decides the cases two real streams produce:

- A payment before its order (the streams are joined; their relative order is
  not guaranteed): the payment is held in the user's state
  (``early_payment_ids``, not part of the output) and the order, when it
  arrives, is paid at once.
- A duplicate order (its id is already unpaid or paid) or a duplicate payment
  (already paid, or already held): nothing changes; the state is emitted as is.
"""

from __future__ import annotations

from typing import Any, cast

from tasks.errors import InvalidEvent
from tasks.flow import Dataflow

REQUIRED_FIELDS = ("user_id", "type", "order_id")
EVENT_TYPES = ("order", "payment")


def validate_event(event: Any) -> dict[str, Any]:
    """Return the event unchanged if it is a JSON object with the fields the join needs.

    Raises:
        InvalidEvent: the event is not an object, lacks a field, has a wrong-typed
            field or an unknown type.
    """
    # The common case first, in as few operations as possible: this runs for every event.
    if type(event) is dict:
        e_type = event.get("type")
        if (
            (e_type == "order" or e_type == "payment")
            and type(event.get("user_id")) is str
            and type(event.get("order_id")) is int
        ):
            return cast(dict[str, Any], event)
    _explain_invalid(event)
    return cast(
        dict[str, Any], event
    )  # unreachable: _explain_invalid raises for every invalid event


def _explain_invalid(event: Any) -> None:
    """Raise InvalidEvent with the precise reason an event is not valid."""
    if not isinstance(event, dict):
        msg = f"not a JSON object (got {_json_type(event)})"
        raise InvalidEvent(msg)
    missing = [f for f in REQUIRED_FIELDS if f not in event]
    if missing:
        msg = "missing field " + ", ".join(repr(f) for f in missing)
        raise InvalidEvent(msg)
    for field, wanted, ok in (
        ("user_id", "a string", isinstance(event["user_id"], str)),
        ("type", "a string", isinstance(event["type"], str)),
        ("order_id", "an integer", _is_int(event["order_id"])),
    ):
        if not ok:
            msg = f"field {field!r} must be {wanted} (got {_json_type(event[field])})"
            raise InvalidEvent(msg)
    if event["type"] not in EVENT_TYPES:
        msg = f"unknown event type {event['type']!r} (expected 'order' or 'payment')"
        raise InvalidEvent(msg)
    if type(event["user_id"]) is not str or type(event["order_id"]) is not int:
        # subclasses of str or int (not produced by a JSON parser, but possible from code)
        msg = "fields 'user_id' and 'order_id' must be a plain string and integer"
        raise InvalidEvent(msg)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    if isinstance(value, bool | dict | list | str | None):
        return names[type(value)]
    return "number"


def key_off_user_id(event: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Key every event by its user, so that one user's events share state."""
    return event["user_id"], event


def build_state(user_id_as_key: str) -> dict[str, list[Any]]:
    """The initial state of a user: no orders yet."""
    return {"unpaid_order_ids": [], "paid_order_ids": []}


def joiner(
    state: dict[str, list[Any]], event: dict[str, Any]
) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """Apply one order or payment to a user's state and emit the state (the seed's join)."""
    order_id = event["order_id"]
    unpaid, paid = state["unpaid_order_ids"], state["paid_order_ids"]
    early = state.get("early_payment_ids", [])
    if event["type"] == "order":
        if order_id in unpaid or order_id in paid:
            pass  # a duplicate order
        elif order_id in early:
            early.remove(order_id)  # its payment came first
            if not early:
                del state["early_payment_ids"]
            paid.append(order_id)
        else:
            unpaid.append(order_id)
    elif event["type"] == "payment":
        if order_id in unpaid:
            unpaid.remove(order_id)
            paid.append(order_id)
        elif order_id not in paid and order_id not in early:
            state.setdefault("early_payment_ids", []).append(order_id)  # before its order
    return state, state


def format_output(user_id__joined_state: tuple[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """Turn ``(user_id, state)`` into the output record."""
    user_id, joined_state = user_id__joined_state
    return {
        "user_id": user_id,
        "paid_order_ids": joined_state["paid_order_ids"],
        "unpaid_order_ids": joined_state["unpaid_order_ids"],
    }


def cart_flow(join: Any = joiner) -> Dataflow:
    """The tutorial's dataflow, with ``join`` as its stateful step (tests pass variants)."""
    return (
        Dataflow()
        .map(validate_event)
        .map(key_off_user_id)
        # (its states are dicts of lists of the events' int order ids: plain JSON)
        .stateful_map("joiner", build_state, join, plain_json=True)
        .map(format_output)
        .capture()
    )


# The layout ``json.dumps`` writes (the tutorial's and the generator's), a plain key of
# printable ASCII and an order id within 64 bits: such a line passes ``validate_event``
# and is keyed by its user id, so the driver routes it without parsing it (a line in any
# other layout is parsed and checked in full; tests/test_line_key.py holds the promise).
CART_LINE = (
    rb'\{"user_id": ?"(?P<key>[ !#-\[\]-~]*)", ?"type": ?"(?:order|payment)", '
    rb'?"order_id": ?-?(?:0|[1-9][0-9]{0,17})\}'
)

flow = cart_flow().key_lines_by(CART_LINE)

FLOW_PATH = "tasks.cartjoin:flow"
