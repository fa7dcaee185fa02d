"""The seed's cart join: orders and payments joined per user.

``key_off_user_id``, ``build_state``, ``joiner`` and ``format_output`` are the
tutorial's functions with its semantics; ``validate_event`` rejects input that
is not a cart event with a precise reason before it reaches them.
"""

from __future__ import annotations

from typing import Any

from tasks.errors import InvalidEvent
from tasks.flow import Dataflow

REQUIRED_FIELDS = ("user_id", "type", "order_id")


def validate_event(event: Any) -> dict[str, Any]:
    """Return the event unchanged if it is a JSON object with the fields the join needs.

    Raises:
        InvalidEvent: the event is not an object, lacks a field, or has a wrong-typed user_id.
    """
    if not isinstance(event, dict):
        msg = f"not a JSON object (got {_json_type(event)})"
        raise InvalidEvent(msg)
    missing = [f for f in REQUIRED_FIELDS if f not in event]
    if missing:
        msg = "missing field " + ", ".join(repr(f) for f in missing)
        raise InvalidEvent(msg)
    if not isinstance(event["user_id"], str):
        msg = f"field 'user_id' must be a string (got {_json_type(event['user_id'])})"
        raise InvalidEvent(msg)
    return event


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
    e_type = event["type"]
    order_id = event["order_id"]
    if e_type == "order":
        state["unpaid_order_ids"].append(order_id)
    elif e_type == "payment":
        state["unpaid_order_ids"].remove(order_id)
        state["paid_order_ids"].append(order_id)
    return state, state


def format_output(user_id__joined_state: tuple[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """Turn ``(user_id, state)`` into the output record."""
    user_id, joined_state = user_id__joined_state
    return {
        "user_id": user_id,
        "paid_order_ids": joined_state["paid_order_ids"],
        "unpaid_order_ids": joined_state["unpaid_order_ids"],
    }


flow = (
    Dataflow()
    .map(validate_event)
    .map(key_off_user_id)
    .stateful_map("joiner", build_state, joiner)
    .map(format_output)
    .capture()
)

FLOW_PATH = "tasks.cartjoin:flow"
